"""What a profiling cell asks for: C, M, B, block_size, the profiling type and the repetitions.

Names follow the workload-generator vocabulary users know:
- C: prompt tokens per request,
- M: KV blocks of precomputed (shared, already cached) prefix per request, i.e. M x block_size tokens,
- B: batch size (requests scheduled together),
- block_size: the KV cache block size the engine runs with.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

PROFILING_TYPES = ("prefill", "decode", "mixed")


class WorkloadConfigError(ValueError):
    """A profiling parameter that cannot run; the message names it and the fix."""


@dataclass(frozen=True)
class ProfilingConfig:
    """One profiling cell: B requests of C prompt tokens sharing M cached blocks, run repeatedly."""

    C: int = 256
    M: int = 0
    B: int = 8
    block_size: int = 32
    profiling_type: str = "mixed"
    num_warmup: int = 1
    num_measurements: int = 3
    decode_tokens: int = 16
    """Output tokens per request for decode and mixed profiling (prefill profiling produces one)."""

    def __post_init__(self) -> None:
        if self.profiling_type not in PROFILING_TYPES:
            raise WorkloadConfigError(f"profiling_type {self.profiling_type!r}: "
                                      f"use one of {', '.join(PROFILING_TYPES)}")
        for name in ("C", "B", "block_size", "num_measurements", "decode_tokens"):
            if int(getattr(self, name)) < 1:
                raise WorkloadConfigError(f"{name}={getattr(self, name)}: must be at least 1")
        if self.M < 0 or self.num_warmup < 0:
            raise WorkloadConfigError("M and num_warmup must be >= 0")
        if self.prefix_tokens >= self.C:
            raise WorkloadConfigError(
                f"M={self.M} blocks of {self.block_size} tokens = {self.prefix_tokens} prefix tokens, not fewer than "
                f"C={self.C}: every request needs at least one token of its own; lower M or raise C")

    @property
    def prefix_tokens(self) -> int:
        return self.M * self.block_size

    @property
    def output_tokens(self) -> int:
        return 1 if self.profiling_type == "prefill" else self.decode_tokens

    @property
    def name(self) -> str:
        return f"{self.profiling_type}_C{self.C}_M{self.M}_B{self.B}_bs{self.block_size}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProfilingConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise WorkloadConfigError(f"unknown profiling parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(data))


def expand_sweep(base: ProfilingConfig, sweep: Mapping[str, Sequence[Any]]) -> list[ProfilingConfig]:
    """Every combination of the swept values (the cross product), in a stable order."""
    names = [name for name, values in sweep.items() if values]
    if not names:
        return [base]
    cells = []
    for combo in itertools.product(*(sweep[name] for name in names)):
        cells.append(replace(base, **dict(zip(names, combo, strict=True))))
    return cells


@dataclass(frozen=True)
class EngineSettings:
    """The engine arguments a workload runs with (vLLM `LLM(...)` / `vllm serve` names)."""

    model: str
    max_model_len: int = 2048
    block_size: int = 32
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool | None = None
    enable_prefix_caching: bool = True
    long_prefill_token_threshold: int | None = None
    scheduling_policy: str | None = None
    num_gpu_blocks_override: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def llm_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"model": self.model, "max_model_len": self.max_model_len,
                                  "block_size": self.block_size, "enable_prefix_caching": self.enable_prefix_caching,
                                  "dtype": "bfloat16", "seed": 0}
        for name in ("max_num_seqs", "max_num_batched_tokens", "enable_chunked_prefill",
                     "long_prefill_token_threshold", "scheduling_policy", "num_gpu_blocks_override"):
            value = getattr(self, name)
            if value is not None:
                kwargs[name] = value
        kwargs.update(self.extra)
        return kwargs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EngineSettings:
        return cls(**dict(data))


def engine_for_cells(model: str, cells: Sequence[ProfilingConfig], **overrides: Any) -> EngineSettings:
    """Engine settings under which every cell runs as asked: B fits the sequence slots, all B prompts fit
    one step's token budget (so a prefill batch is not split into chunks), every request fits the context."""
    block_sizes = {cell.block_size for cell in cells}
    if len(block_sizes) != 1:
        raise WorkloadConfigError(f"cells with block sizes {sorted(block_sizes)} cannot share one engine: "
                                  "run one engine per block_size (the runner does this for sweeps)")
    longest = max(cell.C + cell.output_tokens for cell in cells)
    max_len = max(2048, longest)
    batch = max(cell.B for cell in cells)
    budget = max(max(cell.B * (cell.C - cell.prefix_tokens) for cell in cells), max_len, batch)
    settings: dict[str, Any] = {"model": model, "max_model_len": max_len, "block_size": block_sizes.pop(),
                                "max_num_seqs": batch, "max_num_batched_tokens": budget}
    settings.update(overrides)
    return EngineSettings(**settings)
