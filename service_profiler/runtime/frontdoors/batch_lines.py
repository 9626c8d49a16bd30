"""The scheduler-profiling JSONL: one JSON object per scheduler step, with exactly these fields.

    batch_id, timestamp (Unix seconds when the step's scheduling began), schedule_duration_ms,
    model_run_duration_ms, total_step_duration_ms, num_prefill_reqs, num_decode_reqs,
    total_scheduled_tokens, prefill_chunk_sizes, decode_chunk_sizes, avg_prefill_chunk_size,
    max_prefill_chunk_size, min_prefill_chunk_size, avg_decode_chunk_size, num_waiting_reqs,
    num_running_reqs, kv_cache_usage

The durations are `analyze`'s `schedule_ms`, `model_run_ms` and `step_ms` of the same batch; a part that
was not observed (a step without a model run) is null, as are the chunk statistics of an empty list.
"""

from __future__ import annotations

import json
from typing import Any

from .batch_join import JoinedBatch

FIELDS = ("batch_id", "timestamp", "schedule_duration_ms", "model_run_duration_ms", "total_step_duration_ms",
          "num_prefill_reqs", "num_decode_reqs", "total_scheduled_tokens", "prefill_chunk_sizes",
          "decode_chunk_sizes", "avg_prefill_chunk_size", "max_prefill_chunk_size", "min_prefill_chunk_size",
          "avg_decode_chunk_size", "num_waiting_reqs", "num_running_reqs", "kv_cache_usage")

_PREFILL = 0


def _ms(start: int | None, end: int | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start) / 1e6, 6)


def _avg(values: list[int]) -> float | None:
    return round(sum(values) / len(values), 2) if values else None


def chunk_sizes(reqs: Any) -> tuple[list[int], list[int]]:
    """(prefill, decode) scheduled tokens per request, from a schedule span's `reqs` entries."""
    prefill: list[int] = []
    decode: list[int] = []
    for entry in reqs or ():
        (prefill if entry[1] == _PREFILL else decode).append(int(entry[2]))
    return prefill, decode


def batch_line(batch: JoinedBatch, wall_offset_ns: int) -> dict[str, Any]:
    """The JSONL object of one step; `wall_offset_ns` turns the batch's clock into Unix ns."""
    attrs = batch.attrs
    prefill, decode = chunk_sizes(attrs.get("reqs"))
    return {
        "batch_id": batch.batch_id,
        "timestamp": round((batch.sched_start + wall_offset_ns) / 1e9, 6),
        "schedule_duration_ms": _ms(batch.sched_start, batch.sched_end),
        "model_run_duration_ms": _ms(batch.model_start, batch.model_end),
        "total_step_duration_ms": _ms(batch.step_start, batch.step_end),
        "num_prefill_reqs": len(prefill),
        "num_decode_reqs": len(decode),
        "total_scheduled_tokens": batch.total_tokens,
        "prefill_chunk_sizes": prefill,
        "decode_chunk_sizes": decode,
        "avg_prefill_chunk_size": _avg(prefill),
        "max_prefill_chunk_size": max(prefill) if prefill else None,
        "min_prefill_chunk_size": min(prefill) if prefill else None,
        "avg_decode_chunk_size": _avg(decode),
        "num_waiting_reqs": attrs.get("waiting"),
        "num_running_reqs": attrs.get("running"),
        "kv_cache_usage": attrs.get("kv_usage"),
    }


def encode(line: dict[str, Any]) -> str:
    # Compact, so that `grep '"schedule_duration_ms":[0-9][0-9]\.'` finds the steps that took 10 ms or more.
    return json.dumps(line, separators=(",", ":"), ensure_ascii=False)
