"""Tolerant reader for raw profiler files (format v1, see docs/DESIGN.md "Raw file format").

`read_run(paths)` accepts run directories, directories of runs (searched recursively for
`*.sprof.jsonl`), single files, or several hosts' copies of a run, and returns one `RunData` whose
timestamps are all epoch ns: each process's monotonic timestamps are shifted by its own header
anchor (`wall_offset_ns = clock.wall_ns - clock.mono_ns`), so processes from different hosts line up;
processes of one host and boot (header `boot_id`) share one monotonic clock and take the anchor of the
first of them to start (`shared_clock_offsets`).

Nothing here raises on bad data. A torn or corrupt line is skipped and listed in
`RunData.problems` as `file:line: what was wrong`; a file without a header is reported and skipped;
a second copy of the same process file (same host, pid and clock anchor) is reported and skipped.

Per-request entries (the `reqs` of batch and tokens records) that do not have the documented shape
are dropped and counted in one problem per file (rawentries.py): every consumer of the entries indexes
and sums them.

`service-profiler inspect` and the front doors' files (`analyze --scheduler-logs`) read a run this way;
the analysis tables come from DuckDB (service_profiler/columnar/). Each line is parsed once (by orjson
where it is installed, rawcheck.parse_line), a line's records are appended in one call
(`rawentries.add_records`), and the lists are sorted once at the end. A `rec` line that does not fit
that path is re-read record by record so one bad record costs only itself.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any, NamedTuple

from service_profiler.rawdata.control import ControlReader, channel, channel_problem, redeclared_problem
from service_profiler.rawdata.losses import ProcessLoss
from service_profiler.rawdata.rawcheck import (
    FORMAT_VERSION,
    MAX_TS,
    clock_anchor,
    header_problems,
    int_or_none,
    lone_surrogates_replaced,
    non_finite_spelled,
    parse_line,
    process_identity,
    same_host_offsets,
    short_text,
)
from service_profiler.rawdata.rawentries import (
    BATCH_REQS,
    COUNTER,
    EVENT,
    NO_IDS,
    RID,
    SPAN,
    TOKEN_REQS,
    add_records,
    valid_record,
)

RAW_SUFFIX = ".sprof.jsonl"

_KIND_CODES = {"span": SPAN, "event": EVENT, "counter": COUNTER}
# The records whose per-request entries are checked (and whose ids are shared: see rawentries.py);
# events of these domains have their `rid` interned.
_ENTRY_FIELDS = {("BatchSchedule", "batchFrameworkProcessing"): BATCH_REQS, ("Request", "tokens"): TOKEN_REQS}
_RID_DOMAINS = frozenset({"Request", "KVCache"})
# lines whose repetition would count something twice (records, losses, switches): a repeat is skipped
_COUNTED_LINES = frozenset({"rec", "dropped", "lost", "state", "flushed", "close"})
_LINE_END_BYTES = 4096
_CHAN_PREFIXES = (b'{"t":"chan"', b'{"t": "chan"')


def line_identity(line: bytes | str) -> int:
    """What identifies a counted line among a file's lines: its length and both ends (a few dozen records
    each; hashing all of it would cost more than the scan). These lines carry ns timestamps, so the same
    identity twice is a copy (a file concatenated with itself, a line written twice), not new data."""
    return hash((len(line), line[:_LINE_END_BYTES], line[-_LINE_END_BYTES:]))


class SpanRecord(NamedTuple):
    proc: int
    domain: str
    name: str
    start_ns: int
    end_ns: int
    tid: int
    attrs: dict[str, Any] | None


class EventRecord(NamedTuple):
    proc: int
    domain: str
    name: str
    ts_ns: int
    tid: int
    attrs: dict[str, Any] | None


class CounterRecord(NamedTuple):
    proc: int
    domain: str
    name: str
    ts_ns: int
    values: dict[str, float]


RECORD_CLASSES = (SpanRecord, EventRecord, CounterRecord)  # in rawentries' SPAN, EVENT, COUNTER order


@dataclass
class ProcessInfo:
    """One raw file, i.e. one engine/API process."""

    index: int
    key: str
    hostname: str
    pid: int
    ppid: int
    role: str
    argv: list[str]
    engine: dict[str, Any] | None
    profiler_version: str
    wall_offset_ns: int
    meta: dict[str, object] = field(default_factory=dict)
    patch: dict[str, Any] | None = None
    dropped: int = 0
    warnings: list[str] = field(default_factory=list)
    path: str = ""
    format: int = FORMAT_VERSION
    channels: list[dict[str, Any]] = field(default_factory=list)
    loss: ProcessLoss = field(default_factory=ProcessLoss)  # closed cleanly? what is missing (losses.py)


@dataclass
class RunData:
    processes: list[ProcessInfo] = field(default_factory=list)
    spans: list[SpanRecord] = field(default_factory=list)
    events: list[EventRecord] = field(default_factory=list)
    counters: list[CounterRecord] = field(default_factory=list)
    states: list[tuple[int, int, bool, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def num_records(self) -> int:
        return len(self.spans) + len(self.events) + len(self.counters)


def discover_files(paths: Iterable[Path | str], problems: list[str]) -> list[Path]:
    """Expand run dirs / dirs of runs / files into raw files, each once, in a stable order."""
    found: list[Path] = []
    seen: set[str] = set()
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            candidates = [path]
        elif path.is_dir():
            candidates = sorted(p for p in path.rglob(f"*{RAW_SUFFIX}") if p.is_file())
            if not candidates:
                problems.append(f"{path}: no raw files (*{RAW_SUFFIX}) found under this directory")
        else:
            problems.append(f"{path}: no such file or directory")
            continue
        for cand in candidates:
            real = os.path.realpath(cand)
            if real not in seen:
                seen.add(real)
                found.append(cand)
    return found


def _read_header(path: Path) -> dict[str, Any] | None:
    with path.open("rb") as fh:
        first = fh.readline()
    try:
        obj = json.loads(lone_surrogates_replaced(first))
    except (ValueError, RecursionError):
        return None
    if isinstance(obj, dict) and obj.get("t") == "header":
        spelled: dict[str, Any] = non_finite_spelled(obj)
        return spelled
    return None


def _dedupe_copies(files: list[Path], problems: list[str]) -> list[tuple[Path, dict[str, Any]]]:
    """Keep one copy per process: the same file collected from several hosts counts once (the largest)."""
    best: dict[tuple[Any, ...], tuple[Path, dict[str, Any], int]] = {}
    order: list[tuple[Any, ...]] = []
    for path in files:
        try:
            header = _read_header(path)
            size = path.stat().st_size
        except OSError as exc:
            problems.append(f"{path}: unreadable ({exc.strerror or exc}); file skipped")
            continue
        if header is None:
            problems.append(
                f"{path}:1: no valid header line (expected a JSON object with \"t\": \"header\"); file skipped"
            )
            continue
        key = process_identity(header)
        if key in best:
            kept, _, kept_size = best[key]
            if size > kept_size:
                problems.append(f"{kept}: duplicate copy of {path} (smaller); skipped")
                best[key] = (path, header, size)
            else:
                problems.append(f"{path}: duplicate copy of {kept}; skipped")
            continue
        best[key] = (path, header, size)
        order.append(key)
    return [(best[k][0], best[k][1]) for k in order]


class _FileReader:
    """Reads one raw file into the shared output lists."""

    def __init__(self, run: RunData, proc: ProcessInfo, header: dict[str, Any], shared: dict[int, int]) -> None:
        """`shared`: the ints shared by the whole read (rawentries.clean_attrs)."""
        self.run = run
        self.shared = shared
        self.proc = proc
        self.offset = proc.wall_offset_ns
        # channel id -> (kind code, domain, name, which ids / entries to check: rawentries.clean_attrs)
        self.chans: dict[int, tuple[int, str, str, int]] = {}
        self.unknown_chan: dict[str, int] = {}
        self.bad_records = 0
        self.bad_lines: list[int] = []  # the first few lines holding malformed records
        self.bad_line_count = 0
        self.seen_recs: set[int] = set()  # hashes of the rec lines read: a repeated line counts once
        self.repeated: list[int] = [0, 0]  # repeated rec lines skipped, the first one's line number
        self.dropped = [0]  # malformed per-request entries dropped (rawentries.clean_attrs counts them)
        self.control = ControlReader(proc.index, self.offset, proc.loss, proc.meta, run.states, run.problems)

    def read(self, path: Path) -> None:
        run = self.run
        problems = run.problems
        loads = parse_line
        self._declare_channels(path)
        with path.open("rb") as fh:
            lines = iter(fh)
            next(lines, None)  # header, already parsed
            lineno = 1
            for line in lines:
                lineno += 1
                try:
                    obj = loads(line)
                    kind = obj["t"]
                    hash(kind)
                except (ValueError, TypeError, KeyError, RecursionError):
                    if not line.strip():
                        continue
                    if not line.endswith(b"\n"):
                        problems.append(f"{path}:{lineno}: torn last line ({len(line)} bytes, cut mid-record)"
                                        "; skipped")
                    else:
                        problems.append(f"{path}:{lineno}: corrupt line (not a JSON object with \"t\", or nested "
                                        "too deep); skipped")
                    continue
                if kind in _COUNTED_LINES:
                    key = line_identity(line)
                    if key in self.seen_recs:
                        self.repeated[0] += 1
                        self.repeated[1] = self.repeated[1] or lineno
                        continue
                    self.seen_recs.add(key)
                if kind == "rec":
                    r = obj.get("r")
                    if isinstance(r, list):
                        try:
                            self._records_fast(r)
                        except (KeyError, TypeError, IndexError, ValueError):
                            self._records_slow(r, path, lineno)
                    else:
                        problems.append(f"{path}:{lineno}: rec line without a list 'r'; skipped")
                elif kind == "chan":
                    if not line.startswith(_CHAN_PREFIXES):  # else declared before the records were read
                        self._channel(obj, path, lineno)
                else:
                    self.control.line(kind, obj, path, lineno)
        control = self.control
        self.proc.dropped += control.dropped
        self.proc.warnings = list(control.warnings.values())
        if control.patch is not None:
            self.proc.patch = control.patch
        for chan_id, count in self.unknown_chan.items():
            problems.append(f"{path}: {count} records of undeclared channel {chan_id}; skipped")
        if self.bad_records:
            where = ", ".join(map(str, self.bad_lines)) + (", ..." if self.bad_line_count > len(self.bad_lines) else "")
            problems.append(f"{path}: {self.bad_records} malformed records (line {where}; a record is [channel id, "
                            "timestamps (ints in [0, 2^62), end >= start), tid, attrs], see docs/DESIGN.md); skipped")
        if self.repeated[0]:
            problems.append(f"{path}:{self.repeated[1]}: {self.repeated[0]} line(s) repeating an earlier line "
                            "of this file (a copy); counted once")
        if self.dropped[0]:
            problems.append(f"{path}: {self.dropped[0]} malformed per-request entries (`reqs` of batch or tokens "
                            "records; see docs/DESIGN.md for their shape); dropped")

    def _declare_channels(self, path: Path) -> None:
        """The file's channels, before its records: a channel is the file's, wherever its line is (as
        analyze reads it), so a record line copied ahead of its channels' lines costs nothing."""
        with path.open("rb") as fh:
            for lineno, line in enumerate(fh, 1):
                if lineno > 1 and line.startswith(_CHAN_PREFIXES):
                    try:
                        obj = parse_line(line)
                    except (ValueError, RecursionError):
                        continue  # listed as corrupt when the file is read
                    if isinstance(obj, dict) and obj.get("t") == "chan":
                        self._channel(obj, path, lineno)

    def _channel(self, obj: dict[str, Any], path: Path, lineno: int) -> None:
        declared = channel(obj)
        if declared is None:
            self.run.problems.append(channel_problem(path, lineno))
            return
        chan_id, kind, domain, name = declared
        code = _KIND_CODES[kind]
        if chan_id in self.chans:
            if self.chans[chan_id][:3] != (code, domain, name):
                self.run.problems.append(redeclared_problem(path, lineno, declared))
            return
        domain, name = sys.intern(domain), sys.intern(name)
        ids = _ENTRY_FIELDS.get((domain, name), NO_IDS)
        if not ids and code == EVENT and domain in _RID_DOMAINS:
            ids = RID
        self.chans[chan_id] = (code, domain, name, ids)
        self.proc.channels.append(obj)

    def _records_fast(self, records: list[Any]) -> None:
        # All-or-nothing for the line's records: on any exception the caller re-reads it record by
        # record, so undo what this attempt appended first (see rawentries.add_records).
        run = self.run
        spans, events, counters = run.spans, run.events, run.counters
        n_s, n_e, n_c = len(spans), len(events), len(counters)
        try:
            add_records(records, self.chans, self.offset, self.proc.index, spans, events, counters, RECORD_CLASSES,
                        self.shared, self.dropped)
        except BaseException:
            del spans[n_s:], events[n_e:], counters[n_c:]
            raise

    def _records_slow(self, records: list[Any], path: Path, lineno: int) -> None:
        chans = self.chans
        good = []
        bad = self.bad_records
        for rec in records:
            if not isinstance(rec, list) or not rec:
                self.bad_records += 1
                continue
            chan_id = rec[0]
            chan = chans.get(chan_id) if chan_id.__class__ is int else None
            if chan is None:
                label = short_text(chan_id)
                self.unknown_chan[label] = self.unknown_chan.get(label, 0) + 1
                continue
            if not valid_record(chan[0], rec):
                self.bad_records += 1
                continue
            good.append(rec)
        if self.bad_records > bad:
            self.bad_line_count += 1
            if len(self.bad_lines) < 5:
                self.bad_lines.append(lineno)
        run = self.run
        add_records(good, chans, self.offset, self.proc.index, run.spans, run.events, run.counters, RECORD_CLASSES,
                    self.shared, self.dropped)


def _clock_key(header: dict[str, Any]) -> tuple[str, str] | None:
    """(hostname, boot id): the processes that share one monotonic clock; None when not recorded."""
    boot_id, hostname = header.get("boot_id"), header.get("hostname")
    return (hostname, boot_id) if isinstance(boot_id, str) and boot_id and isinstance(hostname, str) else None


def shared_clock_offsets(headers: Sequence[dict[str, Any]]) -> dict[tuple[str, str], int]:
    """One wall-clock offset per monotonic clock: the anchor of the process that started first.

    Each process anchors its monotonic timestamps to the wall clock once, when it starts. A wall
    clock that is slewed or stepped meanwhile (seen: a VM stepping it 0.5 ms every 0.1 s) would
    shift processes started at different times against each other, though their timestamps come
    from one clock; processes of one host and boot therefore share the first one's anchor."""
    first: dict[tuple[str, str], tuple[int, int]] = {}
    for header in headers:
        key, clock = _clock_key(header), clock_anchor(header)
        if key is None or clock is None:
            continue
        wall, mono = clock
        if key not in first or mono < first[key][0]:
            first[key] = (mono, wall - mono)
    return {key: offset for key, (_, offset) in first.items()}


def shared_wall_offsets(headers: Sequence[dict[str, Any]]) -> list[int | None]:
    """Each file's wall-clock offset as shared with the processes on its monotonic clock
    (`shared_clock_offsets`; by hostname for files written before headers carried the boot id);
    None where there is none to share (the process's own anchor applies)."""
    boot_offsets = shared_clock_offsets(headers)
    host_offsets = same_host_offsets([h for h in headers if _clock_key(h) is None])
    offsets: list[int | None] = []
    for header in headers:
        clock_key = _clock_key(header)
        if clock_key is not None:
            offsets.append(boot_offsets.get(clock_key))
        else:
            hostname = header.get("hostname")
            offsets.append(host_offsets.get(hostname) if isinstance(hostname, str) else None)
    return offsets


def _process_from_header(index: int, path: Path, header: dict[str, Any]) -> ProcessInfo:
    """Every field checked: a malformed one reads as unknown (`header_problems` says which)."""
    clock = clock_anchor(header)
    offset = clock[0] - clock[1] if clock is not None else 0
    host = header.get("hostname")
    hostname = host if isinstance(host, str) else "?"
    pid = int_or_none(header.get("pid"))
    pid = pid if pid is not None and -MAX_TS < pid < MAX_TS else 0
    ppid = int_or_none(header.get("ppid"))
    argv = header.get("argv")
    engine = header.get("engine")
    role, version = header.get("role"), header.get("profiler_version")
    fmt = header.get("format")
    return ProcessInfo(
        index=index,
        key=f"{hostname}:{pid}",
        hostname=hostname,
        pid=pid,
        ppid=ppid if ppid is not None and -MAX_TS < ppid < MAX_TS else 0,
        role=role if isinstance(role, str) else "",
        argv=[str(a) for a in argv] if isinstance(argv, list) else [],
        engine=engine if isinstance(engine, dict) else None,
        profiler_version=version if isinstance(version, str) else "",
        wall_offset_ns=offset,
        path=str(path),
        format=fmt if fmt.__class__ is int and abs(fmt) < MAX_TS else 0,
    )


def read_run(paths: Sequence[Path | str] | Path | str) -> RunData:
    """Read every raw file under `paths` into one clock-aligned, time-sorted `RunData`."""
    if isinstance(paths, str | Path):
        paths = [paths]
    # The reader allocates millions of containers and no cycles; with the cyclic collector on, every
    # allocation threshold re-walks the growing heap, which doubles the read time.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _read_run(paths)
    finally:
        if was_enabled:
            gc.enable()


def _read_run(paths: Sequence[Path | str]) -> RunData:
    run = RunData()
    shared: dict[int, int] = {}
    files = discover_files(paths, run.problems)
    kept = _dedupe_copies(files, run.problems)
    offsets = shared_wall_offsets([h for _, h in kept])
    for (path, header), offset in zip(kept, offsets, strict=True):
        proc = _process_from_header(len(run.processes), path, header)
        proc.wall_offset_ns = proc.wall_offset_ns if offset is None else offset
        run.problems += header_problems(path, header)
        run.processes.append(proc)
        try:
            _FileReader(run, proc, header, shared).read(path)
        except OSError as exc:
            run.problems.append(f"{path}: read failed ({exc.strerror or exc}); kept what was read")
        # role / dp_rank given as meta override the header (the last value wins, as documented)
        role = proc.meta.get("role")
        if isinstance(role, str) and role:
            proc.role = role
    run.spans.sort(key=itemgetter(3))
    run.events.sort(key=itemgetter(3))
    run.counters.sort(key=itemgetter(3))
    run.states.sort(key=itemgetter(1))
    return run
