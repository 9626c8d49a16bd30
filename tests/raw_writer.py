"""Hand-built raw runs for tests: processes and their records, with times in epoch ns, written as the raw
files the runtime writes (docs/DESIGN.md "Raw file format"), so tests go through the same reader as users.

    run = RawRun()
    api = run.process("host-a", 100, "api_server")
    api.event("Request", "httpReq", BASE + 5 * MS, 100, {"rid": "r1"})
    run.write(tmp_path)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MONO_START = 1_000_000_000  # every process's monotonic clock at its anchor


@dataclass
class RawProcess:
    hostname: str
    pid: int
    role: str
    anchor_ns: int  # the epoch time at MONO_START
    ppid: int = 1
    argv: list[str] = field(default_factory=lambda: ["test"])
    profiler_version: str = "0.1.0"
    engine: dict[str, Any] | None = None
    closed: bool = True  # ends with `flushed` and `close` lines, as a process that exited cleanly
    dropped: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    states: list[tuple[int, bool, str]] = field(default_factory=list)  # (epoch ns, enabled, reason)
    records: list[tuple[tuple[str, str, str], list[Any], int]] = field(default_factory=list)  # chan, rec, order
    lines: list[list[int]] = field(default_factory=list)  # record indexes written together in one `rec` line

    def _mono(self, epoch_ns: int) -> int:
        return epoch_ns - self.anchor_ns + MONO_START

    def span(self, domain: str, name: str, start_ns: int, end_ns: int, tid: int, attrs: dict[str, Any] | None
             ) -> int:
        """Add a span; returns its index (for `lines`)."""
        self.records.append((("span", domain, name), [self._mono(start_ns), self._mono(end_ns), tid, attrs], end_ns))
        return len(self.records) - 1

    def event(self, domain: str, name: str, ts_ns: int, tid: int, attrs: dict[str, Any] | None) -> int:
        self.records.append((("event", domain, name), [self._mono(ts_ns), tid, attrs], ts_ns))
        return len(self.records) - 1

    def counter(self, domain: str, name: str, ts_ns: int, values: dict[str, Any]) -> int:
        self.records.append((("counter", domain, name), [self._mono(ts_ns), values], ts_ns))
        return len(self.records) - 1

    def write(self, directory: Path) -> Path:
        path = directory / f"{self.hostname}-{self.pid}.sprof.jsonl"
        header = {"t": "header", "format": 1, "hostname": self.hostname, "pid": self.pid, "ppid": self.ppid,
                  "role": self.role, "argv": self.argv, "profiler_version": self.profiler_version,
                  "engine": self.engine,
                  "clock": {"wall_ns": self.anchor_ns, "mono_ns": MONO_START}}
        out = [header, *({"t": "meta", "key": k, "value": v} for k, v in self.meta.items())]
        out += [{"t": "state", "enabled": on, "ts": self._mono(ts), "reason": why} for ts, on, why in self.states]
        chans: dict[tuple[str, str, str], int] = {}
        order = sorted(range(len(self.records)), key=lambda i: self.records[i][2])  # as recorded: spans at their end
        alone = {i for line in self.lines for i in line}
        groups = [[i for i in order if i not in alone], *self.lines]
        last = MONO_START
        for group in groups:
            recs = []
            for i in group:
                chan, rec, at = self.records[i]
                if chan not in chans:
                    chans[chan] = len(chans) + 1
                    out.append({"t": "chan", "id": chans[chan], "kind": chan[0], "domain": chan[1], "name": chan[2]})
                recs.append([chans[chan], *rec])
                last = max(last, self._mono(at))
            if recs:
                out.append({"t": "rec", "r": recs})
        if self.dropped:
            out.append({"t": "dropped", "count": self.dropped, "ts": last})
        if self.closed:
            out += [{"t": "flushed", "until": last}, {"t": "close", "ts": last + 1, "reason": "exit"}]
        path.write_text("".join(json.dumps(line, allow_nan=True) + "\n" for line in out), encoding="utf-8")
        return path


@dataclass
class RawRun:
    processes: list[RawProcess] = field(default_factory=list)

    def process(self, hostname: str, pid: int, role: str, anchor_ns: int) -> RawProcess:
        proc = RawProcess(hostname, pid, role, anchor_ns)
        self.processes.append(proc)
        return proc

    def write(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        for proc in self.processes:
            proc.write(directory)
        return directory
