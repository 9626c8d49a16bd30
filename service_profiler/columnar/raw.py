"""Raw files (docs/DESIGN.md "Raw file format") into DuckDB relations.

Two passes per file, each doing what it is good at:
- Python reads the few control lines (header, chan, meta, state, dropped, lost, flushed, close, warn)
  and only counts the `rec` lines (a prefix test per line, no parse);
- DuckDB parses the `rec` lines (its JSON reader, in parallel, out of core) and unnests each line's
  records into `rec(proc, chan, t1, f2, f3, f4)`.
The views `span`, `event`, `counter` then give every record its channel's kind/domain/name and an epoch
timestamp (the process's clock anchor added), as docs/DESIGN.md's reader output describes. `pos` is a
record's position in its line: records of one process with the same time are ordered by it (records of
one time in two different lines are ordered arbitrarily: DuckDB's reader gives no line number).

Bad input costs only itself: a corrupt control line is listed in `problems`; a `rec` line DuckDB cannot
parse is skipped (a line that does not end as a `rec` line ends, e.g. the torn last line of a killed
process, is listed; a corrupt line that ends well is skipped unlisted); a record whose channel
is undeclared or whose timestamp is not an integer is dropped and counted per file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from service_profiler.rawdata.losses import LOSS_LINES, LossReader, ProcessLoss
from service_profiler.rawdata.rawcheck import MAX_TS
from service_profiler.rawdata.rawfile import (
    _COUNTED_LINES,
    _LINE_END_BYTES,
    _dedupe_copies,
    _process_from_header,
    discover_files,
    shared_wall_offsets,
)

_REC_PREFIXES = (b'{"t":"rec"', b'{"t": "rec"')
# The longest `rec` line read. DuckDB's JSON reader holds a buffer of twice this per thread; the writer
# flushes at least every second, so a line this long would be a second of several hundred thousand records.
MAX_LINE_BYTES = 16 << 20
# brackets in one record's attributes from which its nesting depth is checked (deeper than Python's
# recursion limit: malformed); the writer's own records stay far below it
_DEEP_SUSPECT = 512
_CONTROL_LINES = frozenset({"chan", "meta", "state", "dropped", "lost", "flushed", "close", "warn", "patch"})


@dataclass
class Process:
    index: int
    key: str  # host:pid, how the CSVs name a process
    hostname: str
    pid: int
    role: str
    path: str
    wall_offset_ns: int
    meta: dict[str, Any] = field(default_factory=dict)
    dropped: int = 0
    loss: ProcessLoss = field(default_factory=ProcessLoss)  # closed cleanly? what is missing (losses.py)
    rec_lines: int = 0
    source: str = ""  # the file DuckDB reads: `path`, or a copy without its repeated `rec` lines
    ppid: int = 0
    argv: list[str] = field(default_factory=list)
    engine: dict[str, Any] | None = None
    profiler_version: str = ""
    warnings: dict[str, str] = field(default_factory=dict)  # message -> "message (xN)" with the last total
    patch: dict[str, Any] | None = None

    @property
    def dp_rank(self) -> int:
        try:
            return int(self.meta.get("dp_rank", 0))
        except (TypeError, ValueError):
            return 0


@dataclass
class RawRun:
    processes: list[Process]
    states: list[tuple[int, int, bool, str]]  # (proc, epoch ns, enabled, reason)
    problems: list[str]


def _control(proc: Process, obj: dict[str, Any], chans: list[tuple[Any, ...]],
             states: list[tuple[int, int, bool, str]], losses: LossReader, lineno: int) -> None:
    kind = obj.get("t")
    if kind == "chan" and isinstance(obj.get("id"), int) and 0 <= obj["id"] < 2 ** 31:
        chans.append((proc.index, obj["id"], str(obj.get("kind", "")), str(obj.get("domain", "")),
                      str(obj.get("name", ""))))
    elif kind == "meta" and isinstance(obj.get("key"), str):
        proc.meta[obj["key"]] = obj.get("value")
    elif kind == "state" and isinstance(obj.get("ts"), int) and 0 <= obj["ts"] < MAX_TS:
        states.append((proc.index, obj["ts"] + proc.wall_offset_ns, bool(obj.get("enabled")),
                       str(obj.get("reason", ""))))
    elif kind == "dropped":
        count = obj.get("count")
        if count.__class__ is int and 0 <= count < MAX_TS:
            proc.dropped += count
            if count:
                losses.dropped(count, obj.get("ts"))
        else:
            losses.problems.append(f"{proc.path}:{lineno}: dropped line without a valid count; skipped")
    elif kind in LOSS_LINES:  # flushed, close, lost: the file's completeness (losses.py)
        losses.line(kind, obj, Path(proc.path), lineno)
    elif kind == "warn":
        # written when a problem first happens and again with its running total: the last total wins
        msg, count = str(obj.get("msg", "")), obj.get("count", 1)
        proc.warnings[msg] = f"{msg} (x{count})" if count != 1 else msg
    elif kind == "patch":
        proc.patch = {k: obj.get(k, []) for k in ("applied", "pending", "skipped", "failed")}


def _scan_file(proc: Process, chans: list[tuple[Any, ...]], states: list[tuple[int, int, bool, str]],
               problems: list[str]) -> list[int]:
    """The control lines of one file; `rec` lines are only counted (DuckDB parses them). Returns the
    numbers of the `rec` lines that repeat an earlier line of the file (a file concatenated with itself,
    a line written twice): they carry timestamps, so a repeat is a copy, not new data, and counts once."""
    path = proc.path
    losses = LossReader(proc.loss, proc.wall_offset_ns, problems)
    seen: set[int] = set()
    repeated: list[int] = []  # every repeated line; the `rec` ones are left out of what DuckDB reads
    repeated_recs: list[int] = []
    with open(path, "rb") as fh:
        header = b""
        for lineno, line in enumerate(fh, 1):
            if line.startswith(_REC_PREFIXES):
                # the length and both ends of a line (a few dozen records each) identify it; hashing all
                # of it would cost more than the scan
                key = hash((len(line), line[:_LINE_END_BYTES], line[-_LINE_END_BYTES:]))
                if key in seen:
                    repeated.append(lineno)
                    repeated_recs.append(lineno)
                    continue
                seen.add(key)
                proc.rec_lines += 1
                if len(line) > MAX_LINE_BYTES:
                    problems.append(f"{path}:{lineno}: record line longer than {MAX_LINE_BYTES} bytes; skipped")
                elif not line.rstrip().endswith(b"]}"):  # DuckDB's reader skips it (ignore_errors)
                    problems.append(f"{path}:{lineno}: torn or corrupt record line; skipped")
                continue
            if lineno == 1:
                header = line
                continue
            if not line.strip():
                continue
            if line == header:  # the file again after itself
                repeated.append(lineno)
                continue
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError):
                problems.append(f"{path}:{lineno}: not valid JSON, or nested too deep (torn or corrupt line); "
                                "skipped")
                continue
            if b"\\ud" in line or b"\\uD" in line:  # an escaped lone surrogate cannot be stored as UTF-8 text
                obj = _without_surrogates(obj)
            if isinstance(obj, dict) and not isinstance(obj.get("t"), str):
                problems.append(f"{path}:{lineno}: line type {obj.get('t')!r} is not a text; skipped")
                continue
            if isinstance(obj, dict) and obj.get("t") in _COUNTED_LINES:
                key = hash((len(line), line[:_LINE_END_BYTES], line[-_LINE_END_BYTES:]))
                if key in seen:
                    repeated.append(lineno)
                    continue
                seen.add(key)
            if isinstance(obj, dict) and obj.get("t") in _CONTROL_LINES:
                _control(proc, obj, chans, states, losses, lineno)
            elif isinstance(obj, dict):
                problems.append(f"{path}:{lineno}: unknown line type {obj.get('t')!r}; skipped")
            else:
                problems.append(f"{path}:{lineno}: not a JSON object; skipped")
    if repeated:
        problems.append(f"{path}:{repeated[0]}: {len(repeated)} line(s) repeating an earlier line of this file "
                        "(a copy); counted once")
    role = proc.meta.get("role")
    if isinstance(role, str) and role:
        proc.role = role
    return repeated_recs


def _without_surrogates(value: Any) -> Any:
    """`value` with each lone surrogate in its texts written as its escape (`\\ud800`)."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, list):
        return [_without_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {_without_surrogates(k): _without_surrogates(v) for k, v in value.items()}
    return value


def _without_lines(proc: Process, skip: list[int], scratch: Path) -> str:
    """A private copy of the process's file without the lines `skip` (1-based), for DuckDB to read."""
    scratch.mkdir(mode=0o700, exist_ok=True)
    copy = scratch / f"{proc.index}.sprof.jsonl"
    drop = set(skip)
    with open(proc.path, "rb") as src, open(copy, "xb") as dst:
        for lineno, line in enumerate(src, 1):
            if lineno not in drop:
                dst.write(line)
    return str(copy)


def load_raw(con: duckdb.DuckDBPyConnection, paths: Sequence[Path | str], scratch: Path) -> RawRun:
    """Read the run under `paths` (run dirs, dirs of runs, files) into `con`: tables `process`,
    `channel`, `rec`, and the views `span`, `event`, `counter` (epoch ns). `scratch`: a private directory
    for copies of files that repeat their own lines."""
    problems: list[str] = []
    files = discover_files(paths, problems)
    processes: list[Process] = []
    chans: list[tuple[Any, ...]] = []
    states: list[tuple[int, int, bool, str]] = []
    kept = _dedupe_copies(files, problems)
    for (path, header), offset in zip(kept, shared_wall_offsets([h for _, h in kept]), strict=True):
        info = _process_from_header(len(processes), path, header)
        wall_offset_ns = info.wall_offset_ns if offset is None else offset
        proc = Process(info.index, info.key, info.hostname, info.pid, info.role, str(path), wall_offset_ns,
                       ppid=info.ppid, argv=info.argv, engine=info.engine, profiler_version=info.profiler_version)
        processes.append(proc)
        proc.source = proc.path
        try:
            repeated_recs = _scan_file(proc, chans, states, problems)
            if repeated_recs:
                proc.source = _without_lines(proc, repeated_recs, scratch)
        except OSError as exc:
            problems.append(f"{path}: read failed ({exc.strerror or exc}); kept what was read")
    states.sort(key=lambda s: s[1])
    con.execute("CREATE OR REPLACE TABLE process (proc INTEGER, key VARCHAR, hostname VARCHAR, pid BIGINT, "
                "role VARCHAR, dp_rank INTEGER, wall_offset BIGINT, path VARCHAR)")
    if processes:  # `path`: the file DuckDB reads
        con.executemany("INSERT INTO process VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        [(p.index, p.key, p.hostname, p.pid, p.role, p.dp_rank, p.wall_offset_ns, p.source)
                         for p in processes])
    con.execute("CREATE OR REPLACE TABLE channel (proc INTEGER, id INTEGER, kind VARCHAR, domain VARCHAR, "
                "name VARCHAR)")
    if chans:
        # a channel declared twice in one file: the last declaration wins, as in the reader
        con.executemany("INSERT INTO channel VALUES (?, ?, ?, ?, ?)", list({c[:2]: c for c in chans}.values()))
    _load_records(con, processes)
    _count_bad_records(con, processes, problems)
    return RawRun(processes, states, problems)


def _load_records(con: duckdb.DuckDBPyConnection, processes: list[Process]) -> None:
    """One pass: each record with its channel's kind/domain/name, its epoch times, attrs, a span's batch_id.
    Records without a declared channel or an integer time stay out of the views (`_count_bad_records`)."""
    con.execute("CREATE OR REPLACE TABLE record (proc INTEGER, kind VARCHAR, domain VARCHAR, name VARCHAR, "
                "ts_ns BIGINT, end_ns BIGINT, tid BIGINT, attrs JSON, pos INTEGER, batch_id VARCHAR)")
    with_recs = [p for p in processes if p.rec_lines]
    if with_recs:
        files = ", ".join("'" + p.source.replace("'", "''") + "'" for p in with_recs)
        con.execute(f"""
            INSERT INTO record
            WITH line AS (
                -- one parse per line: the records as lists of JSON values
                SELECT p.proc, p.wall_offset, json_transform(l.json, '{{"r": [["JSON"]]}}').r AS r
                FROM read_json_objects([{files}], format='newline_delimited', filename=true,
                                       ignore_errors=true, maximum_object_size={MAX_LINE_BYTES}) AS l
                JOIN process AS p ON p.path = l.filename
                WHERE starts_with(l.json, '{{"t":"rec"') OR starts_with(l.json, '{{"t": "rec"')),
            item AS (SELECT proc, wall_offset, unnest(r) AS x, unnest(generate_series(1, len(r))) AS pos FROM line)
            SELECT i.proc, c.kind, c.domain, c.name, TRY_CAST(x[2] AS BIGINT) + i.wall_offset AS ts_ns,
                   CASE WHEN c.kind = 'span' THEN TRY_CAST(x[3] AS BIGINT) + i.wall_offset END AS end_ns,
                   TRY_CAST(CASE c.kind WHEN 'span' THEN x[4] WHEN 'event' THEN x[3] END AS BIGINT) AS tid,
                   CASE c.kind WHEN 'span' THEN x[5] WHEN 'event' THEN x[4] ELSE x[3] END AS attrs,
                   i.pos::INTEGER AS pos, CASE WHEN c.kind = 'span' THEN x[5]->>'batch_id' END AS batch_id
            FROM item i LEFT JOIN channel c ON c.proc = i.proc AND c.id = TRY_CAST(x[1] AS INTEGER)
        """)
        _drop_too_deep(con)
    # a record without a declared channel, an integer time, or (a span) an integer end is kept out of the views
    valid = "kind IS NOT NULL AND ts_ns IS NOT NULL AND (kind <> 'span' OR end_ns IS NOT NULL)"
    con.execute("""CREATE OR REPLACE VIEW span AS SELECT proc, domain, name, ts_ns AS start_ns, end_ns, tid, attrs,
                   pos, batch_id FROM record WHERE kind = 'span' AND """ + valid)
    con.execute("CREATE OR REPLACE VIEW event AS SELECT proc, domain, name, ts_ns, tid, attrs, pos FROM record "
                "WHERE kind = 'event' AND " + valid)
    con.execute("CREATE OR REPLACE VIEW counter AS SELECT proc, domain, name, ts_ns, attrs AS vals, pos FROM record "
                "WHERE kind = 'counter' AND " + valid)


def _drop_too_deep(con: duckdb.DuckDBPyConnection) -> None:
    """Attributes nested deeper than a JSON reader's recursion allows (the writer cannot produce them: a
    corrupt or crafted line) would make every output carrying them unreadable: such a record counts as
    malformed. Only records with that many brackets at all are parsed to find their depth."""
    suspects = con.execute(f"""SELECT rowid, attrs::VARCHAR FROM record
                               WHERE length(attrs) - length(translate(attrs, '[{{', '')) >= {_DEEP_SUSPECT}""")
    deep = []
    while rows := suspects.fetchmany(1024):
        for rowid, text in rows:
            try:
                json.loads(text)
            except RecursionError:
                deep.append(rowid)
            except ValueError:
                pass
    if deep:
        con.execute("CREATE OR REPLACE TEMP TABLE too_deep AS SELECT unnest(?::BIGINT[]) AS id", [deep])
        con.execute("UPDATE record SET kind = NULL WHERE rowid IN (SELECT id FROM too_deep)")


def _count_bad_records(con: duckdb.DuckDBPyConnection, processes: list[Process], problems: list[str]) -> None:
    """Records without a declared channel or an integer time: one problem line per file with the count."""
    bad = dict(con.execute("SELECT proc, count(*) FROM record WHERE kind IS NULL OR ts_ns IS NULL "
                           "OR (kind = 'span' AND end_ns IS NULL) GROUP BY proc").fetchall())
    for proc in processes:
        if bad.get(proc.index):
            problems.append(f"{proc.path}: {bad[proc.index]} malformed records (undeclared channel, "
                            "non-integer time, or attributes nested too deep) skipped")
