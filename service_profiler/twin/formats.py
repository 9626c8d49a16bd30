"""Public workload traces in, `vllm bench serve` datasets out.

Importers (each returns TraceRequests sorted by arrival, the first at 0 s; a bad row raises TraceError
naming the file, the line and the column):
- Azure LLM inference traces (CSV): `TIMESTAMP` (a datetime), `ContextTokens`, `GeneratedTokens`.
- BurstGPT (CSV): `Timestamp` (s), `Request tokens`, `Response tokens` (rows with 0 response tokens, the
  failures in BurstGPT's logs, are skipped and counted in the returned notes).
- Mooncake (JSONL): `timestamp` (ms), `input_length`, `output_length`, `hash_ids` (one per 512-token
  block: equal ids mean equal blocks, which the twin replays as prefix-cache hits).

Exporters for replaying a trace against a real server:
- `timed_trace`: JSONL of {timestamp (s), input_length, output_length, hash_ids}, for
  `vllm bench serve --dataset-name timed_trace --dataset-path F --timed-trace-chunk-hash-size <hash_block>`
  (arrival times and shared prefixes kept).
- `custom`: JSONL of {prompt, output_tokens}, for `--dataset-name custom` (lengths only: the prompt is
  filler text of about the trace's length in words; arrivals come from `--request-rate`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from ..trace_rows import jsonl_rows
from .trace import TraceError, TraceRequest, rebased

MOONCAKE_BLOCK = 512


def _number(row: dict[str, Any], column: str, where: str, *, minimum: float = 0.0) -> float:
    value = row.get(column)
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TraceError(f"{where}: column '{column}' must be a number, got {value!r}") from None
    if not number >= minimum:
        raise TraceError(f"{where}: column '{column}' must be >= {minimum:g}, got {value!r}")
    return number


def _csv_rows(path: Path, required: Sequence[str]) -> list[tuple[str, dict[str, str]]]:
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in reader.fieldnames or []]
            missing = [c for c in required if c not in header]
            if missing:
                found = ", ".join(header) or "none"
                raise TraceError(f"{path}: missing column(s) {', '.join(missing)} (found {found})")
            return [(f"{path}:{n}", {k.strip(): (v or "").strip() for k, v in row.items() if k})
                    for n, row in enumerate(reader, start=2)]
    except FileNotFoundError:
        raise TraceError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TraceError(f"{path}: cannot read it as CSV ({exc})") from None


def _azure_time(text: str, where: str) -> float:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")[:26] if "." in text else text).timestamp()
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise TraceError(f"{where}: column 'TIMESTAMP' must be a datetime or seconds, got {text!r}") from None


def read_azure(path: str | Path) -> list[TraceRequest]:
    p = Path(path)
    out = []
    for i, (where, row) in enumerate(_csv_rows(p, ("TIMESTAMP", "ContextTokens", "GeneratedTokens"))):
        out.append(TraceRequest(rid=f"azure-{i}", arrival_s=_azure_time(row["TIMESTAMP"], where),
                                prompt_tokens=int(_number(row, "ContextTokens", where, minimum=1)),
                                output_tokens=int(_number(row, "GeneratedTokens", where, minimum=1))))
    return _finish(out, p)


def read_burstgpt(path: str | Path) -> list[TraceRequest]:
    p = Path(path)
    out = []
    for i, (where, row) in enumerate(_csv_rows(p, ("Timestamp", "Request tokens", "Response tokens"))):
        response = int(_number(row, "Response tokens", where))
        if response == 0:
            continue  # a failed request in BurstGPT's logs
        out.append(TraceRequest(rid=f"burstgpt-{i}", arrival_s=_number(row, "Timestamp", where),
                                prompt_tokens=int(_number(row, "Request tokens", where, minimum=1)),
                                output_tokens=response))
    return _finish(out, p)


def read_mooncake(path: str | Path) -> list[TraceRequest]:
    p = Path(path)
    out = []
    for n, (where, row) in enumerate(jsonl_rows(p, TraceError), start=1):
        prompt = int(_number(row, "input_length", where, minimum=1))
        hashes = row.get("hash_ids", [])
        if not isinstance(hashes, list) or not all(isinstance(h, int) and not isinstance(h, bool) for h in hashes):
            raise TraceError(f"{where}: 'hash_ids' must be a list of integers")
        full = prompt // MOONCAKE_BLOCK
        out.append(TraceRequest(rid=f"mooncake-{n}", arrival_s=_number(row, "timestamp", where) / 1000.0,
                                prompt_tokens=prompt,
                                output_tokens=int(_number(row, "output_length", where, minimum=1)),
                                hash_block=MOONCAKE_BLOCK if hashes[:full] else None,
                                block_hashes=_chained(hashes[:full]) if hashes[:full] else None))
    return _finish(out, p)


def _chained(ids: Sequence[int]) -> tuple[int, ...]:
    # Mooncake's ids name blocks (equal id = equal block at that position, given equal ids before it);
    # chaining makes a hash stand for the whole prefix, as the trace format says.
    out, previous = [], 0
    for block_id in ids:
        previous = hash((previous, block_id))
        out.append(previous)
    return tuple(out)


def _finish(requests: list[TraceRequest], path: Path) -> list[TraceRequest]:
    if not requests:
        raise TraceError(f"{path}: no requests in the file")
    return rebased(requests)


IMPORTERS: dict[str, Callable[[str | Path], list[TraceRequest]]] = {
    "azure": read_azure, "burstgpt": read_burstgpt, "mooncake": read_mooncake}


def export_vllm_bench(requests: Sequence[TraceRequest], path: str | Path, kind: str = "timed_trace") -> Path:
    """Write a dataset `vllm bench serve` replays (see the module docstring for the flags)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for r in requests:
        row: dict[str, Any]
        if kind == "timed_trace":
            row = {"timestamp": r.arrival_s, "input_length": r.prompt_tokens, "output_length": r.output_tokens,
                   "hash_ids": list(r.block_hashes or ())}
        elif kind == "custom":
            words = " ".join(("token" if i % 2 else "word") for i in range(max(r.prompt_tokens - 1, 1)))
            row = {"prompt": words, "output_tokens": r.output_tokens}
        else:
            raise ValueError(f"unknown export kind {kind!r}: use 'timed_trace' or 'custom'")
        lines.append(json.dumps(row, separators=(",", ":")))
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p
