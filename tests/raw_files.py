"""Small raw runs written by hand for the analysis tests: `write_run(run, directory)` writes an in-memory
`RunData` (processes, spans, events, counters) as the raw files the runtime writes (docs/DESIGN.md "Raw
file format"), one per process, so a scenario a few records long can go through the real reader and
analysis (`service-profiler analyze`, `columnar.run.analyze_run`). `dicts` reads an analysis table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from service_profiler.columnar.run import AnalysisRun
from service_profiler.rawdata.rawfile import RunData

# each process's monotonic clock reads 0 at its wall_offset_ns (the records are given in epoch ns)
_MONO_AT_ANCHOR = 0


def write_run(run: RunData, directory: Path) -> Path:
    """One raw file per process of `run` under `directory` (created); returns `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    for proc in run.processes:
        off = proc.wall_offset_ns
        channels: dict[tuple[str, str, str], int] = {}
        records: list[list[Any]] = []

        def chan(kind: str, domain: str, name: str, channels: dict[tuple[str, str, str], int] = channels) -> int:
            return channels.setdefault((kind, domain, name), len(channels) + 1)

        for s in run.spans:
            if s.proc == proc.index:
                records.append([chan("span", s.domain, s.name), s.start_ns - off, s.end_ns - off, s.tid, s.attrs])
        for e in run.events:
            if e.proc == proc.index:
                records.append([chan("event", e.domain, e.name), e.ts_ns - off, e.tid, e.attrs])
        for c in run.counters:
            if c.proc == proc.index:
                records.append([chan("counter", c.domain, c.name), c.ts_ns - off, c.values])
        header = {"t": "header", "format": 1, "hostname": proc.hostname, "pid": proc.pid, "ppid": proc.ppid,
                  "role": proc.role, "argv": proc.argv, "profiler_version": proc.profiler_version or "test",
                  "engine": proc.engine, "clock": {"wall_ns": off + _MONO_AT_ANCHOR, "mono_ns": _MONO_AT_ANCHOR}}
        lines = [header, *({"t": "meta", "key": k, "value": v} for k, v in proc.meta.items())]
        lines += [{"t": "chan", "id": i, "kind": k, "domain": d, "name": n} for (k, d, n), i in channels.items()]
        if records:
            lines.append({"t": "rec", "r": records})
        path = directory / f"{proc.hostname}-{proc.pid}.sprof.jsonl"
        path.write_text("".join(json.dumps(obj) + "\n" for obj in lines), encoding="utf-8")
    return directory


def dicts(run: AnalysisRun, query: str) -> list[dict[str, Any]]:
    """The rows of `query` on the analysis database, as dicts by column name."""
    cursor = run.con.execute(query)
    names = [d[0] for d in cursor.description or ()]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
