"""What the diagnosis reads: the run's step and request rows, the engine limits it ran under, and the
prefix overlap its workload allowed.

Input: an `analyze` output directory (batch.csv, request.csv) or a raw run directory (*.sprof.jsonl).
Engine limits come, in this order, from the caller, the workload generator's job file next to the run,
or the `vllm serve` command line the profiler recorded in each process header.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The knobs the diagnosis needs to know, by their `vllm serve` flag.
_INT_FLAGS = {"--max-num-seqs": "max_num_seqs", "--max-num-batched-tokens": "max_num_batched_tokens",
              "--block-size": "block_size", "--num-gpu-blocks-override": "num_gpu_blocks_override",
              "--max-model-len": "max_model_len", "--long-prefill-token-threshold": "long_prefill_token_threshold"}
_BOOL_FLAGS = {"enable-prefix-caching": "enable_prefix_caching", "enable-chunked-prefill": "enable_chunked_prefill"}


class DiagnoseError(ValueError):
    """Input the diagnosis cannot use; the message names the path and the fix."""


@dataclass
class RunView:
    batches: list[dict[str, Any]]
    requests: list[dict[str, Any]]
    engine: dict[str, Any] = field(default_factory=dict)
    workload_path: Path | None = None
    source: str = ""


def _number(text: str) -> Any:
    if text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def _read_csv(path: Path, aliases: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Rows of an analyze CSV; `aliases` (CSV column -> table column) also gives each aliased value under
    the analysis table's name, which the rules use."""
    with open(path, newline="") as fh:
        rows = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(fh)]
    for row in rows:
        for column, name in (aliases or {}).items():
            if column in row and name not in row:
                row[name] = row[column]
    return rows


def parse_serve_args(argv: Sequence[str]) -> dict[str, Any]:
    """The knobs above from a `vllm serve` style argument list (`--flag value`, `--flag=value`, `--no-flag`)."""
    out: dict[str, Any] = {}
    items = list(argv)
    for i, item in enumerate(items):
        flag, eq, inline = item.partition("=")
        if flag in _INT_FLAGS:
            value = inline if eq else (items[i + 1] if i + 1 < len(items) else "")
            try:
                out[_INT_FLAGS[flag]] = int(value)
            except ValueError:
                continue
        if flag == "--scheduling-policy":
            value = inline if eq else (items[i + 1] if i + 1 < len(items) else "")
            if value in ("fcfs", "priority"):
                out["scheduling_policy"] = value
        for name, key in _BOOL_FLAGS.items():
            if flag == f"--{name}":
                out[key] = inline.lower() not in ("false", "0") if eq else True
            elif flag == f"--no-{name}":
                out[key] = False
    return out


def _engine_from_job(run_dir: Path) -> tuple[dict[str, Any], Path | None]:
    for parent in (run_dir.parent.parent, run_dir.parent):
        job = parent / "job.json"
        if job.is_file():
            try:
                data = json.loads(job.read_text())
            except (OSError, ValueError):
                return {}, None
            engine = {k: v for k, v in (data.get("engine") or {}).items() if v is not None and k != "extra"}
            requests = data.get("requests")
            return engine, Path(requests) if requests else None
    return {}, None


def _engine_from_headers(run_dir: Path) -> dict[str, Any]:
    engine: dict[str, Any] = {}
    for path in sorted(run_dir.glob("*.sprof.jsonl")):
        try:
            with open(path) as fh:
                header = json.loads(fh.readline())
        except (OSError, ValueError):
            continue
        argv = header.get("argv") if isinstance(header, dict) else None
        if isinstance(argv, list):
            engine.update(parse_serve_args([str(a) for a in argv]))
    return engine


def _find_run_dir(out: Path) -> Path | None:
    if any(out.glob("*.sprof.jsonl")):
        return out
    summary = out / "run_dir.txt"
    if summary.is_file():
        candidate = Path(summary.read_text().strip())
        return candidate if candidate.is_dir() else None
    return None


def load_run(path: Path, engine_args: Sequence[str] | None = None, workload: Path | None = None) -> RunView:
    """Rows and limits of a run; `path` is an analyze output directory or a raw run directory."""
    if not path.is_dir():
        raise DiagnoseError(f"{path}: not a directory; pass an `analyze` output directory or a run directory")
    run_dir = _find_run_dir(path)
    if (path / "batch.csv").is_file() and (path / "request.csv").is_file():
        from ..columnar.rows import BATCH_ALIASES

        # batch.csv names the columns it shares with msserviceprofiler by that tool's names
        batches, requests = _read_csv(path / "batch.csv", BATCH_ALIASES), _read_csv(path / "request.csv")
        source = "analyze CSVs"
    elif run_dir is not None:
        from ..columnar.rows import load_rows

        rows = load_rows(run_dir)
        batches, requests, source = rows.batches, rows.requests, "raw run"
    else:
        raise DiagnoseError(f"{path}: has neither batch.csv + request.csv (run `service-profiler analyze` first) "
                            "nor *.sprof.jsonl files")
    engine: dict[str, Any] = {}
    found_workload: Path | None = None
    if run_dir is not None:
        engine.update(_engine_from_headers(run_dir))
        job_engine, found_workload = _engine_from_job(run_dir)
        engine.update(job_engine)
    engine.update(parse_serve_args(engine_args or []))
    if not batches:
        raise DiagnoseError(f"{path}: the run has no scheduler steps; profile a run that served requests")
    return RunView(batches, requests, engine, workload or found_workload, source)


def prefix_overlap(workload: Path | None, block_size: int) -> float | None:
    """Share of prompt tokens an unbounded prefix cache could serve for this workload, replayed in order
    (full blocks only, as vLLM caches): the ceiling for the run's prefix hit rate."""
    if workload is None or not workload.is_file():
        return None
    seen: set[tuple[int, ...]] = set()
    hit = total = 0
    for line in workload.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        ids = row.get("token_ids") if isinstance(row, dict) else None
        if not isinstance(ids, list):
            continue
        total += len(ids)
        # vLLM never serves the last prompt token from cache (it must compute one token to sample).
        usable = (len(ids) - 1) // block_size
        matched = 0
        for b in range(usable):
            key = tuple(ids[: (b + 1) * block_size])
            if key in seen:
                matched = b + 1
            else:
                break
        hit += matched * block_size
        for b in range(len(ids) // block_size):
            seen.add(tuple(ids[: (b + 1) * block_size]))
    return hit / total if total else None
