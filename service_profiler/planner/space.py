"""The engine settings the planner searches, their candidate values, and a plan's `vllm serve` arguments.

Knobs (vLLM 0.32's scheduler honours all of them): max_num_seqs, max_num_batched_tokens,
enable_chunked_prefill with long_prefill_token_threshold, enable_prefix_caching, block_size, the KV cache
size (num_gpu_blocks_override, never above what the captured run's memory held), scheduling_policy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

KNOBS = ("max_num_seqs", "max_num_batched_tokens", "enable_chunked_prefill", "long_prefill_token_threshold",
         "enable_prefix_caching", "block_size", "num_gpu_blocks_override", "scheduling_policy")


@dataclass(frozen=True)
class Plan:
    """One engine configuration (every searched knob set)."""

    max_num_seqs: int
    max_num_batched_tokens: int
    enable_chunked_prefill: bool
    long_prefill_token_threshold: int
    enable_prefix_caching: bool
    block_size: int
    num_gpu_blocks_override: int
    scheduling_policy: str = "fcfs"

    def key(self) -> tuple[Any, ...]:
        return tuple(getattr(self, k) for k in KNOBS)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def engine_args(self) -> dict[str, Any]:
        """EngineArgs fields (what the twin and `LLM(...)` take)."""
        return self.to_dict()

    def serve_args(self) -> list[str]:
        """`vllm serve` arguments that reproduce the plan on their own: every knob, changed or not."""
        return [
            "--max-num-seqs", str(self.max_num_seqs),
            "--max-num-batched-tokens", str(self.max_num_batched_tokens),
            "--enable-chunked-prefill" if self.enable_chunked_prefill else "--no-enable-chunked-prefill",
            "--long-prefill-token-threshold", str(self.long_prefill_token_threshold),
            "--enable-prefix-caching" if self.enable_prefix_caching else "--no-enable-prefix-caching",
            "--block-size", str(self.block_size),
            "--num-gpu-blocks-override", str(self.num_gpu_blocks_override),
            "--scheduling-policy", self.scheduling_policy,
        ]

    def kv_tokens(self) -> int:
        """KV capacity in tokens (what the memory objective minimises)."""
        return (self.num_gpu_blocks_override - 1) * self.block_size

    def with_(self, **changes: Any) -> Plan:
        return replace(self, **changes)


def _geometric(low: int, high: int, factor: float = 2.0) -> list[int]:
    out, value = [], float(low)
    while value <= high:
        out.append(round(value))
        value *= factor
    if out and out[-1] != high:
        out.append(high)
    return sorted(set(out))


def block_sizes_for_platform() -> list[int]:
    """Block sizes the installed vLLM's platform runs: its CPU attention needs multiples of 32."""
    try:
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            return [32, 64, 128]
    except Exception:  # no platform detected: offer the CUDA sizes
        pass
    return [16, 32, 64, 128]


@dataclass(frozen=True)
class SearchSpace:
    """Candidate values per knob, around the captured run's settings and the workload's sizes."""

    candidates: dict[str, list[Any]]

    @classmethod
    def around(cls, base: Plan, *, max_model_len: int, longest_prompt: int, peak_concurrency: int,
               pool_tokens: int) -> SearchSpace:
        seqs_high = max(8, min(1024, 4 * max(peak_concurrency, base.max_num_seqs)))
        tokens_high = max(8192, 2 * max_model_len, 4 * longest_prompt)
        block_sizes = sorted(set(block_sizes_for_platform()) | {base.block_size})
        pool_blocks = [max(2, int(pool_tokens * share) // 1) for share in (0.125, 0.25, 0.5, 1.0)]
        return cls({
            "max_num_seqs": sorted(set(_geometric(1, seqs_high)) | {base.max_num_seqs}),
            "max_num_batched_tokens": sorted(set(_geometric(256, tokens_high)) | {base.max_num_batched_tokens}),
            "enable_chunked_prefill": [True, False],
            "long_prefill_token_threshold": sorted({0, 64, 256, 1024, base.long_prefill_token_threshold}),
            "enable_prefix_caching": [True, False],
            "block_size": block_sizes,
            # KV capacity as a share of the captured run's, in tokens; converted to blocks per block size.
            "kv_tokens": sorted(set(pool_blocks)),
            "scheduling_policy": ["fcfs", "priority"],
        })

    def neighbours(self, plan: Plan, knob: str) -> list[Plan]:
        """`plan` with `knob` set to each of its candidates (KV size moves in tokens, kept per block size)."""
        if knob == "num_gpu_blocks_override":
            return [plan.with_(num_gpu_blocks_override=tokens // plan.block_size + 1)
                    for tokens in self.candidates["kv_tokens"]]
        if knob == "block_size":  # the KV memory stays the same when the block size changes
            return [plan.with_(block_size=size, num_gpu_blocks_override=plan.kv_tokens() // size + 1)
                    for size in self.candidates["block_size"]]
        return [plan.with_(**{knob: value}) for value in self.candidates[knob]]


def plan_from_settings(settings: Mapping[str, Any]) -> Plan:
    """The plan a twin's resolved settings (TwinSettings.to_dict()) describe."""
    return Plan(
        max_num_seqs=int(settings["max_num_seqs"]), max_num_batched_tokens=int(settings["max_num_batched_tokens"]),
        enable_chunked_prefill=bool(settings.get("enable_chunked_prefill", True)),
        long_prefill_token_threshold=int(settings.get("long_prefill_token_threshold") or 0),
        enable_prefix_caching=bool(settings.get("enable_prefix_caching", False)),
        block_size=int(settings["block_size"]), num_gpu_blocks_override=int(settings["num_blocks"]),
        scheduling_policy=str(settings.get("policy") or "fcfs"))


def structurally_valid(plan: Plan, max_model_len: int) -> str | None:
    """vLLM's own rules a plan must meet before the twin builds it (the twin then builds vLLM's config,
    which checks the rest): the token budget holds a step of max_num_seqs, and a whole prompt when
    chunked prefill is off."""
    if plan.max_num_batched_tokens < plan.max_num_seqs:
        return "max_num_batched_tokens < max_num_seqs"
    if not plan.enable_chunked_prefill and plan.max_num_batched_tokens < max_model_len:
        return "chunked prefill off needs max_num_batched_tokens >= max_model_len"
    if plan.long_prefill_token_threshold and not plan.enable_chunked_prefill:
        return "long_prefill_token_threshold needs chunked prefill"
    if (plan.num_gpu_blocks_override - 1) * plan.block_size < max_model_len:
        return "the KV cache must hold one max_model_len request"
    return None
