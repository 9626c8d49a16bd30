"""Drive vLLM's real v1 `Scheduler` on CPU without a model, through the service-profiler handlers.

The way vLLM's own scheduler tests do it: a `VllmConfig` for a tiny local Llama config (no weights, no
tokenizer, no network), a `KVCacheConfig` with one full-attention group, real `Request`s, `schedule()`
and `update_from_output()` with a made-up `ModelRunnerOutput` (one sampled token per request that
finished its prefill, none for a partial prefill chunk, as the GPU model runner does).

Every call goes through the handlers exactly as the runtime makes it:
`handler(original_func, this, *args)` with `original_func` the unbound class function.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutputs
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output import StructuredOutputManager

from service_profiler.engines.vllm import vllm_v1
from service_profiler.runtime import patching, probes

BLOCK_SIZE = 16
TOKEN = 7
"""What the made-up model samples, unless told otherwise."""
STOP_TOKEN = 99

_TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
    "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 2,
    "vocab_size": 1000, "max_position_embeddings": 4096, "torch_dtype": "float32", "rms_norm_eps": 1e-6,
}


@functools.lru_cache(maxsize=1)
def model_dir() -> str:
    path = Path(tempfile.mkdtemp(prefix="sp-tiny-llama-"))
    (path / "config.json").write_text(json.dumps(_TINY_LLAMA), encoding="utf-8")
    return str(path)


def make_scheduler(*, num_blocks: int = 1000, max_num_seqs: int = 16, max_num_batched_tokens: int = 8192,
                   max_model_len: int = 2048, enable_prefix_caching: bool = False,
                   long_prefill_token_threshold: int = 0, scheduler_class: type[Scheduler] = Scheduler
                   ) -> Scheduler:
    """A real v1 Scheduler with `num_blocks` KV blocks of `BLOCK_SIZE` tokens (block 0 is vLLM's null
    block, so `num_blocks - 1` are usable)."""
    model_config = ModelConfig(model=model_dir(), skip_tokenizer_init=True, max_model_len=max_model_len,
                               dtype="float32")
    scheduler_config = SchedulerConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
        enable_chunked_prefill=True, long_prefill_token_threshold=long_prefill_token_threshold,
        is_encoder_decoder=False)
    cache_config = CacheConfig(block_size=BLOCK_SIZE, cache_dtype="auto",
                               enable_prefix_caching=enable_prefix_caching)
    vllm_config = VllmConfig(model_config=model_config, scheduler_config=scheduler_config,
                             cache_config=cache_config)
    kv_cache_config = KVCacheConfig(
        num_blocks=num_blocks, kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(["layer"], FullAttentionSpec(
            block_size=BLOCK_SIZE, num_kv_heads=1, head_size=1, dtype=torch.float32))])
    cache_config.num_gpu_blocks = num_blocks
    return scheduler_class(vllm_config=vllm_config, kv_cache_config=kv_cache_config,
                           structured_output_manager=StructuredOutputManager(vllm_config),
                           block_size=BLOCK_SIZE, log_stats=True)


def make_async_scheduler(**config: Any) -> AsyncScheduler:
    """The scheduler vLLM uses with `--async-scheduling` (same configuration as `make_scheduler`)."""
    scheduler = make_scheduler(scheduler_class=AsyncScheduler, **config)
    assert isinstance(scheduler, AsyncScheduler)
    return scheduler


def make_request(request_id: str, prompt: Sequence[int], max_tokens: int = 4, *,
                 prefix_caching: bool = False) -> Request:
    params = SamplingParams(max_tokens=max_tokens, stop_token_ids=[STOP_TOKEN])
    hasher = None
    if prefix_caching:
        init_none_hash(sha256)
        hasher = get_request_block_hasher(BLOCK_SIZE, sha256)
    return Request(request_id=request_id, prompt_token_ids=list(prompt), sampling_params=params,
                   pooling_params=None, block_hasher=hasher)


def prompt_of(length: int, start: int = 1) -> list[int]:
    """Distinct token ids (so that no two prompts share a block by accident)."""
    return list(range(start, start + length))


def made_up_output(scheduler: Scheduler, out: SchedulerOutput,
                   tokens: dict[str, int] | None = None) -> ModelRunnerOutput:
    """What the model runner would return: a token for each request whose prompt is now computed."""
    req_ids = list(out.num_scheduled_tokens)
    sampled = []
    for rid in req_ids:
        request = scheduler.requests[rid]
        done = request.num_computed_tokens >= request.num_tokens
        sampled.append([(tokens or {}).get(rid, TOKEN)] if done else [])
    return ModelRunnerOutput(req_ids=req_ids, req_id_to_index={rid: i for i, rid in enumerate(req_ids)},
                             sampled_token_ids=sampled)


def add(scheduler: Scheduler, request: Request) -> None:
    vllm_v1.add_request_handler(Scheduler.add_request, scheduler, request)


def abort(scheduler: Scheduler, request_ids: list[str]) -> list[Request]:
    # What EngineCore.abort_requests does.
    result: list[Request] = vllm_v1.finish_requests_handler(Scheduler.finish_requests, scheduler, request_ids,
                                                            RequestStatus.FINISHED_ABORTED)
    return result


def _execute(executor: Any, scheduler_output: SchedulerOutput) -> None:
    """Stands for `Executor.execute_model` with a runner that samples later (returns None)."""
    return None


def step(scheduler: Scheduler, tokens: dict[str, int] | None = None) -> tuple[SchedulerOutput,
                                                                             dict[int, EngineCoreOutputs]]:
    """One EngineCore step: schedule, execute, update_from_output, each through its handler."""
    holder: dict[str, Any] = {}

    def engine_step(engine: Any) -> tuple[dict[int, EngineCoreOutputs], bool]:
        out = vllm_v1.schedule_handler(Scheduler.schedule, scheduler)
        vllm_v1.execute_model_handler(_execute, None, out)
        result = vllm_v1.update_from_output_handler(Scheduler.update_from_output, scheduler, out,
                                                    made_up_output(scheduler, out, tokens))
        holder["out"] = out
        return result, out.total_num_scheduled_tokens > 0

    result, _ = vllm_v1.engine_step_handler(engine_step, None)
    return holder["out"], result


def run_with_batch_queue(scheduler: Scheduler, steps: int, depth: int = 2) -> None:
    """What `EngineCore.step_with_batch_queue` does: schedule and launch a batch each step, and
    process the oldest batch's output once `depth` are in flight; then drain the queue."""
    queue: list[tuple[SchedulerOutput, ModelRunnerOutput]] = []

    def update_oldest() -> None:
        out, model_output = queue.pop(0)
        vllm_v1.update_from_output_handler(Scheduler.update_from_output, scheduler, out, model_output)

    def engine_step(engine: Any) -> None:
        out = vllm_v1.schedule_handler(Scheduler.schedule, scheduler)
        vllm_v1.execute_model_handler(_execute, None, out)
        queue.append((out, made_up_output(scheduler, out)))  # the device computes it now
        if len(queue) == depth:
            update_oldest()

    for _ in range(steps):
        vllm_v1.engine_step_handler(engine_step, None)
    while queue:
        update_oldest()


KV_HANDLERS: tuple[tuple[type, str, Callable[..., Any]], ...] = (
    (KVCacheManager, "free", vllm_v1.free_handler),
    (KVCacheManager, "get_computed_blocks", vllm_v1.cache_hit_handler),
)
"""Methods the scheduler calls on its own: their handlers only run when the method is patched."""


@contextlib.contextmanager
def patched(targets: Sequence[tuple[type, str, Callable[..., Any]]] = KV_HANDLERS) -> Iterator[None]:
    """Install handler wrappers the way the runtime does (`patching` + `probes`), then restore."""
    installed = []
    try:
        for owner, attr, handler in targets:
            target = patching.resolve(sys.modules[owner.__module__], (*owner.__qualname__.split("."), attr))
            probe = probes.Probe(symbol=f"{owner.__module__}:{owner.__name__}.{attr}", domain="KVCache",
                                 name=attr, chan=0, buffer=[], max_buffered=0, recorder_drop=lambda: None,
                                 on_problem=_raise)
            probe.active = True
            wrapper = probes.make_handler_wrapper(target.function, probe, handler, target.is_method)
            installed.append((target, patching.install(target, wrapper)))
        yield
    finally:
        for target, wrapper in reversed(installed):
            patching.uninstall(target, wrapper)


def _raise(message: str) -> None:
    raise AssertionError(f"handler problem: {message}")


def reset_state() -> None:
    """A fresh per-process handler state (batch ids from 0), as in a newly started EngineCore."""
    vllm_v1.STATE = vllm_v1.VllmProbeState(console=vllm_v1.STATE.console)


def attrs(rec: Any, domain: str, name: str) -> list[dict[str, Any]]:
    """The attrs of every record captured under one domain/name."""
    return [payload["attrs"] for payload in rec.of(domain, name)]


@contextlib.contextmanager
def capturing() -> Iterator[Any]:
    """Fresh handler state, the handlers patched in, and what they record captured."""
    from service_profiler import record

    reset_state()
    with patched(), record.capture() as captured:
        yield captured
