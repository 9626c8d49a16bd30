"""The twin's workload trace: one request per JSONL line.

Format (`service-profiler twin` reads and writes it; docs/TWIN.md has examples)::

    {"format": "service-profiler-trace", "version": 1}              <- first line, optional
    {"rid": "r0", "arrival_s": 0.0, "prompt_tokens": 512, "output_tokens": 64}
    {"rid": "r1", "arrival_s": 0.25, "prompt_tokens": 700, "output_tokens": 12, "max_tokens": 128,
     "priority": 0, "hash_block": 16, "block_hashes": [81237, -9912, ...]}
    {"rid": "r2", "arrival_s": 0.3, "prompt_tokens": 5, "output_tokens": 3, "token_ids": [1, 2, 3, 4, 5]}

- `arrival_s`: seconds from the trace's start when the client sent the request (>= 0).
- `prompt_tokens`, `output_tokens`: lengths (output >= 1: the twin generates exactly that many).
- `max_tokens`, `min_tokens`, `priority`: the request's sampling limits and priority, when known.
- Prompt content, optional, for prefix-cache replay: `token_ids`, or `block_hashes` (chained hashes of
  consecutive `hash_block`-token blocks; equal hash i <=> equal first (i+1)*hash_block tokens). Without
  either, prompts share nothing.
- `engine_delay_ms`, `reply_delay_ms`: measured front-end time of this request (HTTP arrival -> engine,
  engine output -> client), when the capture had it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..trace_rows import TRACE_FORMAT, TRACE_VERSION, trace_header, trace_rows

FORMAT_NAME = TRACE_FORMAT
FORMAT_VERSION = TRACE_VERSION


class TraceError(ValueError):
    """A trace file or row that cannot be used; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class TraceRequest:
    """One request of a workload."""

    rid: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    max_tokens: int | None = None
    min_tokens: int | None = None
    priority: int = 0
    hash_block: int | None = None
    block_hashes: tuple[int, ...] | None = None
    token_ids: tuple[int, ...] | None = None
    engine_delay_ms: float | None = None
    reply_delay_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {"rid": self.rid, "arrival_s": self.arrival_s, "prompt_tokens": self.prompt_tokens,
                               "output_tokens": self.output_tokens}
        for key in ("max_tokens", "min_tokens", "engine_delay_ms", "reply_delay_ms"):
            value = getattr(self, key)
            if value is not None:
                row[key] = value
        if self.priority:
            row["priority"] = self.priority
        if self.block_hashes is not None:
            row["hash_block"] = self.hash_block
            row["block_hashes"] = list(self.block_hashes)
        if self.token_ids is not None:
            row["token_ids"] = list(self.token_ids)
        return row


def _int(row: dict[str, Any], key: str, where: str, *, minimum: int, required: bool = True) -> int | None:
    value = row.get(key)
    if value is None:
        if required:
            raise TraceError(f"{where}: missing '{key}' (an integer >= {minimum})")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < minimum:
        raise TraceError(f"{where}: '{key}' must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _ints(row: dict[str, Any], key: str, where: str) -> tuple[int, ...] | None:
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise TraceError(f"{where}: '{key}' must be a list of integers")
    return tuple(value)


def request_from_dict(row: Any, where: str) -> TraceRequest:
    """Validate one trace row; `where` ("file:line") prefixes every error."""
    if not isinstance(row, dict):
        raise TraceError(f"{where}: expected a JSON object, got {type(row).__name__}")
    rid = row.get("rid")
    if not isinstance(rid, str) or not rid:
        raise TraceError(f"{where}: missing 'rid' (a non-empty string)")
    arrival = row.get("arrival_s")
    if isinstance(arrival, bool) or not isinstance(arrival, (int, float)) or not arrival >= 0 \
            or arrival == float("inf"):
        raise TraceError(f"{where}: 'arrival_s' must be a finite number of seconds >= 0, got {arrival!r}")
    prompt = _int(row, "prompt_tokens", where, minimum=1)
    output = _int(row, "output_tokens", where, minimum=1)
    assert prompt is not None and output is not None
    token_ids = _ints(row, "token_ids", where)
    if token_ids is not None and len(token_ids) != prompt:
        raise TraceError(f"{where}: 'token_ids' has {len(token_ids)} ids but 'prompt_tokens' is {prompt}")
    hashes = _ints(row, "block_hashes", where)
    hash_block = _int(row, "hash_block", where, minimum=1, required=hashes is not None)
    if hashes is not None and hash_block is not None and len(hashes) > prompt // hash_block:
        raise TraceError(f"{where}: {len(hashes)} block_hashes of {hash_block} tokens exceed prompt_tokens={prompt}")
    delays = {}
    for key in ("engine_delay_ms", "reply_delay_ms"):
        value = row.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0):
            raise TraceError(f"{where}: '{key}' must be a number >= 0, got {value!r}")
        delays[key] = float(value) if value is not None else None
    priority = _int(row, "priority", where, minimum=-(1 << 62), required=False) or 0
    return TraceRequest(rid=rid, arrival_s=float(arrival), prompt_tokens=prompt, output_tokens=output,
                        max_tokens=_int(row, "max_tokens", where, minimum=1, required=False),
                        min_tokens=_int(row, "min_tokens", where, minimum=0, required=False), priority=priority,
                        hash_block=hash_block, block_hashes=hashes, token_ids=token_ids, **delays)


def read_trace(path: str | Path) -> list[TraceRequest]:
    """Read a trace file; raises TraceError naming the file and line of the first bad row."""
    requests: list[TraceRequest] = []
    seen: set[str] = set()
    for where, row in trace_rows(path, TraceError):
        request = request_from_dict(row, where)
        if request.rid in seen:
            raise TraceError(f"{where}: rid {request.rid!r} appears twice; request ids must be unique")
        seen.add(request.rid)
        requests.append(request)
    if not requests:
        raise TraceError(f"{path}: the trace holds no requests")
    return sorted(requests, key=lambda r: r.arrival_s)


def write_trace(requests: Iterable[TraceRequest], path: str | Path) -> Path:
    """Write requests as a trace file (header line first); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(trace_header())]
    lines.extend(json.dumps(r.to_dict(), separators=(",", ":")) for r in requests)
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def rebased(requests: Sequence[TraceRequest]) -> list[TraceRequest]:
    """The requests sorted by arrival, times shifted so that the first arrives at 0."""
    ordered = sorted(requests, key=lambda r: r.arrival_s)
    if not ordered:
        return []
    first = ordered[0].arrival_s
    from dataclasses import replace

    return [replace(r, arrival_s=round(r.arrival_s - first, 9)) for r in ordered]
