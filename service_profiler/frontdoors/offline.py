"""The front doors' files from a raw run, by the same code the engine runs live.

`analyze --scheduler-logs` calls `write_front_door_outputs`: `<out>/scheduler_profiling.jsonl` and the five CSVs under
`<out>/scheduler_logs/`, so a run recorded the msserviceprofiler way (`SERVICE_PROF_CONFIG_PATH`) gives
the same tables as the environment-variable front doors. Records are replayed per engine process in the
order the handlers emitted them (a record's end time; at equal times spans before events, as each handler
records its span before the events it derives from it). Times: relative ones count from the moment
collection started in that process (its first `state` line), as they do live; `ts_ns` and the JSONL's
`timestamp` are Unix time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from service_profiler.rawdata.rawfile import RunData

from ..runtime.frontdoors.batch_join import BatchJoiner
from ..runtime.frontdoors.batch_lines import batch_line, encode
from ..runtime.frontdoors.options import DEFAULT_LOG_DIR, DEFAULT_PROFILING_LOG
from ..runtime.frontdoors.scheduler_tables import COLUMNS, SchedulerTables
from ..runtime.frontdoors.sinks import CsvTablesWriter, JsonlWriter

_SPAN, _EVENT = 0, 1
_LINE_PARTS = {"batchFrameworkProcessing": "schedule", "modelExec": "model", "updateFromOutput": "update",
               "step": "step"}


def _engine_records(data: RunData) -> dict[int, list[tuple[int, int, int, str, str, int, int, Any]]]:
    """Per process that scheduled: (emitted at, kind, seq, domain, name, start, end, attrs), in order."""
    wanted = SchedulerTables.WANTED
    schedulers = {s.proc for s in data.spans if s.name == "batchFrameworkProcessing" and s.domain == "BatchSchedule"}
    per_proc: dict[int, list[tuple[int, int, int, str, str, int, int, Any]]] = {p: [] for p in schedulers}
    seq = 0
    for s in data.spans:
        if s.proc in per_proc and (s.domain, s.name) in wanted:
            per_proc[s.proc].append((s.end_ns, _SPAN, seq, s.domain, s.name, s.start_ns, s.end_ns, s.attrs))
            seq += 1
    for e in data.events:
        if e.proc in per_proc and (e.domain, e.name) in wanted:
            per_proc[e.proc].append((e.ts_ns, _EVENT, seq, e.domain, e.name, e.ts_ns, e.ts_ns, e.attrs))
            seq += 1
    for records in per_proc.values():
        records.sort(key=lambda r: (r[0], r[1], r[2]))
    return per_proc


def _collection_start(data: RunData, proc: int, records: list[Any]) -> int:
    starts = [ts for p, ts, enabled, _ in data.states if p == proc and enabled]
    return min(starts) if starts else records[0][5]


def _block_bytes(data: RunData, proc: int) -> int | None:
    value = data.processes[proc].meta.get("kv_block_bytes")
    return value if isinstance(value, int) else None


def replay(data: RunData) -> Iterator[tuple[int, list[str], SchedulerTables]]:
    """(dp_rank, JSONL lines, finished tables) per engine process of the run."""
    for proc, records in sorted(_engine_records(data).items()):
        if not records:
            continue
        tables = SchedulerTables(_collection_start(data, proc, records), 0)
        tables.block_bytes = _block_bytes(data, proc)
        joiner = BatchJoiner()
        lines: list[str] = []
        for _, _, _, domain, name, start, end, attrs in records:
            if not isinstance(attrs, dict):
                continue
            tables.feed(domain, name, start, end, attrs)
            part = _LINE_PARTS.get(name)
            if part is not None:
                getattr(joiner, part)(start, end, attrs)
                lines.extend(encode(batch_line(b, 0)) for b in joiner.release())
        lines.extend(encode(batch_line(b, 0)) for b in joiner.release(final=True))
        tables.release(final=True)
        yield tables.dp_rank or 0, lines, tables


def write_front_door_outputs(data: RunData, out_dir: Path) -> list[Path]:
    """Write the scheduler-profiling JSONL and the scheduler-logging CSVs of a run; returns the files."""
    written: list[Path] = []
    problems: list[str] = []
    for dp_rank, lines, tables in replay(data):
        jsonl = JsonlWriter(out_dir / DEFAULT_PROFILING_LOG, problems.append)
        jsonl.write(lines, dp_rank)
        jsonl.close()
        csvs = CsvTablesWriter(out_dir / DEFAULT_LOG_DIR, COLUMNS, problems.append)
        csvs.write(tables.take(), dp_rank)
        written += [jsonl.path, *csvs.paths]
        csvs.close()
    if problems:
        raise OSError("; ".join(problems))
    return written
