"""An in-memory `RunData` (processes, spans, events, counters: what the previous reader returned) written as
raw files by `raw_writer.RawRun`, so a scenario a few records long goes through the real reader and
analysis (`service-profiler analyze`, `columnar.run.analyze_run`)."""

from __future__ import annotations

from pathlib import Path

from raw_writer import RawRun

from service_profiler.rawdata.rawfile import RunData


def write_run(run: RunData, directory: Path) -> Path:
    """One raw file per process of `run` under `directory` (created), its records in one `rec` line in
    the order given (spans, events, counters) and no closing lines; returns `directory`."""
    raw = RawRun()
    for info in run.processes:
        proc = raw.process(info.hostname, info.pid, info.role, info.wall_offset_ns)
        proc.ppid, proc.argv, proc.engine = info.ppid, info.argv, info.engine
        proc.profiler_version, proc.meta, proc.closed = info.profiler_version or "test", dict(info.meta), False
        for s in run.spans:
            if s.proc == info.index:
                proc.span(s.domain, s.name, s.start_ns, s.end_ns, s.tid, s.attrs)
        for e in run.events:
            if e.proc == info.index:
                proc.event(e.domain, e.name, e.ts_ns, e.tid, e.attrs)
        for c in run.counters:
            if c.proc == info.index:
                proc.counter(c.domain, c.name, c.ts_ns, c.values)
        proc.lines = [list(range(len(proc.records)))]
    return raw.write(directory)
