"""Request-level workloads: prompts made of token ids (so prefix sharing is exact) and arrival processes.

The request rows are the twin's trace format (one JSON object per line: `rid`, `arrival_s`,
`prompt_tokens`, `output_tokens`, optional `token_ids`), so a generated workload replays in the twin
exactly as it ran on the engine.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..trace_rows import trace_header, trace_rows

# Token ids below this are the tiny tokenizers' special tokens (<unk>, <s>, </s>); prompts avoid them.
FIRST_PLAIN_TOKEN = 3
ARRIVALS = ("closed", "poisson", "gamma", "burst", "trace")


class WorkloadError(ValueError):
    """A workload that cannot be built or read; the message names the file, line or key and the fix."""


@dataclass(frozen=True)
class WorkloadRequest:
    rid: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    token_ids: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {"rid": self.rid, "arrival_s": round(self.arrival_s, 6),
                               "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens}
        if self.token_ids is not None:
            row["token_ids"] = list(self.token_ids)
        return row


def token_block(rng: random.Random, count: int, vocab_size: int) -> list[int]:
    """`count` random plain token ids: two such blocks share a KV block hash with negligible probability."""
    return [rng.randrange(FIRST_PLAIN_TOKEN, vocab_size) for _ in range(count)]


def shared_prefix_prompts(count: int, prompt_tokens: int, prefix_tokens: int, vocab_size: int, seed: int,
                          prefix: Sequence[int] | None = None) -> tuple[list[int], list[list[int]]]:
    """(prefix, prompts): `count` prompts of `prompt_tokens` ids starting with the same `prefix_tokens` ids
    and continuing with ids of their own."""
    rng = random.Random(seed)
    shared = list(prefix) if prefix is not None else token_block(rng, prefix_tokens, vocab_size)
    return shared, [shared + token_block(rng, prompt_tokens - prefix_tokens, vocab_size) for _ in range(count)]


@dataclass(frozen=True)
class ArrivalSpec:
    """When requests arrive: `closed` (a fixed number in flight), `poisson` (rate req/s),
    `gamma` (rate req/s with burstiness: shape of the gamma inter-arrival; 1 = Poisson, < 1 burstier),
    `burst` (all at time 0), `trace` (each request's own `arrival_s`, as a replayed trace gives them)."""

    process: str = "poisson"
    rate: float = 4.0
    burstiness: float = 1.0
    concurrency: int = 4

    def __post_init__(self) -> None:
        if self.process not in ARRIVALS:
            raise WorkloadError(f"arrival process {self.process!r}: use one of {', '.join(ARRIVALS)}")
        if self.process in ("poisson", "gamma") and self.rate <= 0:
            raise WorkloadError(f"request rate {self.rate}: must be > 0 req/s")
        if self.burstiness <= 0 or self.concurrency < 1:
            raise WorkloadError("burstiness must be > 0 and concurrency >= 1")

    def arrival_times(self, count: int, seed: int) -> list[float]:
        """Seconds from the start, computed up front from `seed` (the same seed gives the same schedule); a
        closed loop has no schedule (all zero: the clients pace it)."""
        if self.process == "trace":
            raise WorkloadError("arrival process 'trace' takes the times from the trace; replay one with --trace")
        if self.process in ("closed", "burst"):
            return [0.0] * count
        rng = random.Random(seed)
        shape = 1.0 if self.process == "poisson" else self.burstiness
        scale = 1.0 / (self.rate * shape)
        now, times = 0.0, []
        for _ in range(count):
            times.append(now)
            now += rng.gammavariate(shape, scale)
        return times

    def to_dict(self) -> dict[str, Any]:
        return {"process": self.process, "rate": self.rate, "burstiness": self.burstiness,
                "concurrency": self.concurrency}


@dataclass(frozen=True)
class RequestMix:
    """A synthetic request population: prompt and output lengths (uniform in [min, max]) and a shared
    prefix of `prefix_tokens` ids for a fraction `prefix_share` of the requests."""

    num_requests: int = 32
    prompt_tokens: tuple[int, int] = (64, 256)
    output_tokens: tuple[int, int] = (8, 32)
    prefix_tokens: int = 0
    prefix_share: float = 1.0
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def build(self, arrivals: ArrivalSpec, vocab_size: int) -> list[WorkloadRequest]:
        rng = random.Random(self.seed)
        prefix = token_block(rng, self.prefix_tokens, vocab_size)
        times = arrivals.arrival_times(self.num_requests, self.seed + 1)
        out = []
        for i, at in enumerate(times):
            length = rng.randint(*self.prompt_tokens)
            shared = prefix if self.prefix_tokens and rng.random() < self.prefix_share else []
            shared = shared[: max(0, length - 1)]
            ids = shared + token_block(rng, length - len(shared), vocab_size)
            out.append(WorkloadRequest(f"w{i}", at, length, rng.randint(*self.output_tokens), tuple(ids)))
        return out


def retime(requests: Sequence[WorkloadRequest], arrivals: ArrivalSpec, seed: int) -> list[WorkloadRequest]:
    """The requests in their order with arrival times from `arrivals` (a trace replayed at another rate or
    burstiness); unchanged for `trace`."""
    if arrivals.process == "trace":
        return list(requests)
    times = arrivals.arrival_times(len(requests), seed)
    return [replace(r, arrival_s=at) for r, at in zip(requests, times, strict=True)]


def write_requests(requests: Sequence[WorkloadRequest], path: Path) -> Path:
    with open(path, "w") as fh:
        fh.write(json.dumps(trace_header()) + "\n")
        for request in requests:
            fh.write(json.dumps(request.to_dict()) + "\n")
    return path


def read_requests(path: Path, vocab_size: int, seed: int = 0) -> list[WorkloadRequest]:
    """Read a trace (JSONL, the twin's format). Rows without `token_ids` get random ids of their length."""
    rng = random.Random(seed)
    out: list[WorkloadRequest] = []
    for number, (where, row) in enumerate(trace_rows(path, WorkloadError), start=1):
        try:
            prompt, output = int(row["prompt_tokens"]), int(row["output_tokens"])
            arrival = float(row.get("arrival_s", 0.0))
        except (KeyError, TypeError, ValueError) as exc:
            raise WorkloadError(f"{where}: needs numeric prompt_tokens, output_tokens and arrival_s "
                                f"({exc})") from exc
        if prompt < 1 or output < 1 or arrival < 0:
            raise WorkloadError(f"{where}: prompt_tokens and output_tokens must be >= 1, arrival_s >= 0")
        ids = row.get("token_ids")
        token_ids = tuple(int(t) for t in ids) if isinstance(ids, list) else tuple(token_block(rng, prompt, vocab_size))
        out.append(WorkloadRequest(str(row.get("rid", f"t{number}")), arrival, len(token_ids), output, token_ids))
    if not out:
        raise WorkloadError(f"{path}: no requests in the trace")
    return sorted(out, key=lambda r: r.arrival_s)
