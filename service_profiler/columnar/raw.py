"""Raw files (docs/DESIGN.md "Raw file format") into DuckDB relations.

Two passes per file, each doing what it is good at:
- Python reads the few control lines (header, chan, meta, state, dropped, lost, flushed, close, warn)
  and only counts the `rec` lines (a prefix test per line, no parse);
- DuckDB parses the `rec` lines (its JSON reader, in parallel, out of core) and unnests each line's
  records into the table `record`, a quarter of the memory limit's worth of files per
  statement (a larger file in pieces of whole lines, copied out one at a time).
The views `span`, `event`, `counter` then give every record its channel's kind/domain/name and an epoch
timestamp (the process's clock anchor added), as docs/DESIGN.md's reader output describes. `pos` is a
record's position in its line: records of one process with the same time are ordered by it (records of
one time in two different lines are ordered arbitrarily: DuckDB's reader gives no line number).

Bad input costs only itself: a corrupt control line is listed in `problems`; a `rec` line DuckDB cannot
parse is skipped (a line that does not end as a `rec` line ends, e.g. the torn last line of a killed
process, is listed by its number; a corrupt line that ends well is counted per file, since DuckDB's reader
names no line; one with an escaped lone surrogate, which the writer makes of such a text and DuckDB's
reader rejects, is read with U+FFFD in its place, as inspect reads it); a record whose channel is
undeclared or whose timestamp is not an integer is dropped and counted per file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from service_profiler.rawdata.control import ControlReader, channel, channel_problem, redeclared_problem
from service_profiler.rawdata.losses import ProcessLoss
from service_profiler.rawdata.rawcheck import MAX_TS, lone_surrogates_replaced, non_finite_spelled
from service_profiler.rawdata.rawfile import (
    _COUNTED_LINES,
    _dedupe_copies,
    _process_from_header,
    discover_files,
    line_identity,
    shared_wall_offsets,
)

from .literals import insert_rows

_REC_PREFIXES = (b'{"t":"rec"', b'{"t": "rec"')
_EMPTY_REC_ENDS = (b'"r":[]}', b'"r": []}')  # a `rec` line without records (the writer writes none)
# The longest `rec` line read. DuckDB's JSON reader holds a buffer of twice this per thread; the writer
# flushes at least every second, so a line this long would be a second of several hundred thousand records.
MAX_LINE_BYTES = 16 << 20
_COPY_BLOCK = 8 << 20  # a large file is copied into its pieces this much at a time
# the normalized records: epoch times, each with its channel's kind/domain/name
RECORD_COLUMNS = ("proc INTEGER, kind VARCHAR, domain VARCHAR, name VARCHAR, ts_ns BIGINT, end_ns BIGINT, tid BIGINT, "
                  "attrs JSON, pos INTEGER, batch_id VARCHAR")
# Lines that carry ns timestamps: the same line twice in a file is a copy (a file concatenated with itself,
# a line written twice), not new data, and counts once.
_COUNTED_PREFIXES = tuple(f'{{"t"{sep}"{kind}"'.encode() for kind in sorted(_COUNTED_LINES) for sep in (":", ": "))
# brackets in one record's attributes from which its nesting depth is checked (deeper than Python's
# recursion limit: malformed); the writer's own records stay far below it
_DEEP_SUSPECT = 512


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
    ppid: int = 0
    argv: list[str] = field(default_factory=list)
    engine: dict[str, Any] | None = None
    profiler_version: str = ""
    warnings: dict[str, str] = field(default_factory=dict)  # message -> "message (xN)" with the last total
    patch: dict[str, Any] | None = None
    header: dict[str, Any] = field(default_factory=dict, repr=False)  # the file's header line
    repeated_recs: list[int] = field(default_factory=list, repr=False)  # `rec` lines repeating an earlier one
    # `rec` lines with an escaped lone surrogate (DuckDB's reader rejects the whole line), by number: the
    # line with each replaced by U+FFFD, as `service-profiler inspect` reads it
    mended_recs: dict[int, bytes] = field(default_factory=dict, repr=False)

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
    scan_problems_from: int = 0  # problems before this index are about finding the files, not reading them


def rec_line_problem(path: str, lineno: int, line: bytes, stripped: bytes) -> str | None:
    """What is wrong with a `rec` line DuckDB's reader will skip, None when it reads (`stripped`: the line
    without its trailing whitespace)."""
    if len(line) > MAX_LINE_BYTES:
        return f"{path}:{lineno}: record line longer than {MAX_LINE_BYTES} bytes; skipped"
    if not stripped.endswith(b"]}"):  # DuckDB's reader skips it (ignore_errors)
        return f"{path}:{lineno}: torn or corrupt record line; skipped"
    return None


def scan_lines(proc: Process, lines: Iterable[tuple[int, bytes | None, str | None]],
               chans: list[tuple[Any, ...]], states: list[tuple[int, int, bool, str]], problems: list[str]) -> None:
    """One file's control lines, in order: (lineno, line, None), or (lineno, None, problem) for a `rec`
    line DuckDB skips. `load_raw` feeds them from the raw file (`_file_lines`), the Parquet reader
    (parquet_in.py) from the lines a conversion kept."""
    control = ControlReader(proc.index, proc.wall_offset_ns, proc.loss, proc.meta, states, problems)
    path = Path(proc.path)
    declared_here: dict[int, tuple[int, str, str, str]] = {}
    for lineno, line, rec_problem in lines:
        if line is None:
            if rec_problem:
                problems.append(rec_problem)
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            problems.append(f"{proc.path}:{lineno}: not valid JSON, or nested too deep (torn or corrupt line); "
                            "skipped")
            continue
        if b"\\ud" in line or b"\\uD" in line:  # an escaped lone surrogate cannot be stored as UTF-8 text
            obj = _without_surrogates(obj)
        if not isinstance(obj, dict):
            problems.append(f"{proc.path}:{lineno}: not a JSON object; skipped")
        elif not isinstance(obj.get("t"), str):
            problems.append(f"{proc.path}:{lineno}: line type {obj.get('t')!r} is not a text; skipped")
        elif obj["t"] == "chan":
            # a channel of another kind would keep its records out of every view and out of the malformed count
            declared = channel(obj)
            if declared is None:
                problems.append(channel_problem(proc.path, lineno))
            elif declared[0] not in declared_here:
                declared_here[declared[0]] = declared
                chans.append((proc.index, *declared))
            elif declared_here[declared[0]] != declared:
                problems.append(redeclared_problem(proc.path, lineno, declared))
        else:
            control.line(obj["t"], obj, path, lineno)
    proc.dropped += control.dropped
    proc.warnings.update(control.warnings)
    if control.patch is not None:
        proc.patch = control.patch
    role = proc.meta.get("role")
    if isinstance(role, str) and role:
        proc.role = role


def _without_surrogates(value: Any) -> Any:
    """`value` with each lone surrogate in its texts written as its escape (`\\ud800`)."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, list):
        return [_without_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {_without_surrogates(k): _without_surrogates(v) for k, v in value.items()}
    return value


def _file_lines(proc: Process, kept: list[tuple[int, bytes | None, str | None]] | None
                ) -> Iterator[tuple[int, bytes | None, str | None]]:
    """The control lines of one file; `rec` lines are only counted (DuckDB parses them). `kept`: a copy
    of what is yielded goes there too (a conversion stores it). A line carrying timestamps that repeats an
    earlier line of the file is a copy: it is left out (`rec` lines: listed in `proc.repeated_recs`, for
    DuckDB to skip), and one problem at the end says how many there were."""
    seen: set[int] = set()
    repeated: list[int] = []
    header = b""

    def emit(item: tuple[int, bytes | None, str | None]) -> tuple[int, bytes | None, str | None]:
        if kept is not None:
            kept.append(item)
        return item

    with open(proc.path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            is_rec = line.startswith(_REC_PREFIXES)
            if is_rec or line.startswith(_COUNTED_PREFIXES):
                key = line_identity(line)
                if key in seen:
                    repeated.append(lineno)
                    if is_rec:
                        proc.repeated_recs.append(lineno)
                    continue
                seen.add(key)
            if is_rec:
                stripped = line.rstrip()  # one copy of the line for both checks
                problem = rec_line_problem(proc.path, lineno, line, stripped)
                if problem:
                    yield emit((lineno, None, problem))
                    continue
                if not stripped.endswith(_EMPTY_REC_ENDS):
                    proc.rec_lines += 1  # a line DuckDB is to read records from (`count_bad_records`)
                if (mended := lone_surrogates_replaced(line)) != line:
                    proc.mended_recs[lineno] = mended
            elif lineno == 1:
                header = line
            elif line == header:  # the file again after itself
                repeated.append(lineno)
            elif line.strip():
                yield emit((lineno, line, None))
    if repeated:
        yield emit((repeated[0], None, f"{proc.path}:{repeated[0]}: {len(repeated)} line(s) repeating an earlier "
                                      "line of this file (a copy); counted once"))


def load_raw(con: duckdb.DuckDBPyConnection, paths: Sequence[Path | str],
             kept_lines: dict[int, list[tuple[int, bytes | None, str | None]]] | None = None,
             scratch_root: Path | None = None) -> RawRun:
    """Read the run under `paths` (run dirs, dirs of runs, files) into `con`: tables `process`,
    `channel`, `record`, and the views `span`, `event`, `counter` (epoch ns). `kept_lines`: each process's
    control lines are kept there too, by process index (a conversion stores them). `scratch_root`: where
    the copies made for reading go (the work directory; default: the system's temporary directory)."""
    problems: list[str] = []
    files = discover_files(paths, problems)
    kept = _dedupe_copies(files, problems)
    scan_problems_from = len(problems)
    processes = new_processes(kept)
    chans: list[tuple[Any, ...]] = []
    states: list[tuple[int, int, bool, str]] = []
    for proc in processes:
        lines = kept_lines.setdefault(proc.index, []) if kept_lines is not None else None
        try:
            scan_lines(proc, _file_lines(proc, lines), chans, states, problems)
        except OSError as exc:
            problems.append(f"{proc.path}: read failed ({exc.strerror or exc}); kept what was read")
            if lines is not None:  # after the lines kept, as it came
                lines.append(((lines[-1][0] if lines else 0) + 1, None, problems[-1]))
    states.sort(key=lambda s: s[1])
    load_process_tables(con, processes, chans)
    # private (0700), gone once read: copies of files without their repeated lines, pieces of large files
    copies = Path(tempfile.mkdtemp(prefix="sprof-raw-copies-", dir=scratch_root))
    try:
        sources = {p.index: _mended_copy(p, copies) if p.repeated_recs or p.mended_recs else p.path
                   for p in processes}
        _load_records(con, processes, sources, copies)
    finally:
        shutil.rmtree(copies, ignore_errors=True)
    count_bad_records(con, processes, problems)
    return RawRun(processes, states, problems, scan_problems_from)


def _mended_copy(proc: Process, directory: Path) -> str:
    """A copy of the process's file without its repeated `rec` lines and with its mended ones, for DuckDB
    to read instead."""
    copy = directory / f"{proc.index}.sprof.jsonl"
    skip = set(proc.repeated_recs)
    with open(proc.path, "rb") as src, open(copy, "xb") as dst:
        for lineno, line in enumerate(src, 1):
            if lineno not in skip:
                dst.write(proc.mended_recs.get(lineno, line))
    return str(copy)


def new_processes(kept: Sequence[tuple[Path, dict[str, Any]]]) -> list[Process]:
    """One `Process` per kept file (path, header), indexed in that order, on its clock's shared anchor."""
    processes: list[Process] = []
    for (path, header), offset in zip(kept, shared_wall_offsets([h for _, h in kept]), strict=True):
        info = _process_from_header(len(processes), path, header)
        wall_offset_ns = info.wall_offset_ns if offset is None else offset
        processes.append(Process(info.index, info.key, info.hostname, info.pid, info.role, str(path), wall_offset_ns,
                                 ppid=info.ppid, argv=info.argv, engine=info.engine,
                                 profiler_version=info.profiler_version, header=header))
    return processes


def load_process_tables(con: duckdb.DuckDBPyConnection, processes: list[Process], chans: list[tuple[Any, ...]]
                        ) -> None:
    con.execute("CREATE OR REPLACE TABLE process (proc INTEGER, key VARCHAR, hostname VARCHAR, pid BIGINT, "
                "role VARCHAR, dp_rank INTEGER, wall_offset BIGINT, path VARCHAR)")
    if processes:
        insert_rows(con, "process", [(p.index, p.key, p.hostname, p.pid, p.role, p.dp_rank, p.wall_offset_ns, p.path)
                                     for p in processes])
    con.execute("CREATE OR REPLACE TABLE channel (proc INTEGER, id INTEGER, kind VARCHAR, domain VARCHAR, "
                "name VARCHAR)")
    if chans:
        insert_rows(con, "channel", chans)  # each id once per file (`scan_lines`)


def _load_records(con: duckdb.DuckDBPyConnection, processes: list[Process], sources: dict[int, str],
                  scratch: Path) -> None:
    """One pass: each record with its channel's kind/domain/name, its epoch times, attrs, a span's batch_id.
    Records without a declared channel or an integer time stay out of the views (`count_bad_records`).
    `sources`: the file read for each process (its own, or a copy without repeated lines); `scratch`: a
    private directory for the pieces of a file too large for one statement."""
    con.execute(f"CREATE OR REPLACE TABLE record ({RECORD_COLUMNS})")
    files = [(p.index, sources[p.index]) for p in processes if p.rec_lines]
    budget = [_statement_bytes(con)]
    for group in _statements(files, budget[0], scratch):
        _insert_records(con, group, budget, scratch)
    _drop_too_deep(con)
    _spell_out_non_finite(con)
    create_record_views(con)


def _insert_records(con: duckdb.DuckDBPyConnection, group: list[tuple[int, str]], budget: list[int], scratch: Path,
                    depth: int = 0) -> None:
    """The records of `group`'s files in one statement; where that statement runs out of memory (it failed
    as a whole: nothing was inserted), the same files again in statements of half the bytes, and the
    statements after it no larger (`budget[0]`, lowered). A statement's memory grows with its bytes several
    times over, by more than a fixed share of the limit allows for under a few hundred MB
    (benchmarks/README.md)."""
    size = sum(os.path.getsize(path) for _, path in group)
    # a group cut from a larger one is tried as it is (a piece may end a line past the budget); one of the
    # first cut is cut again first where a statement before it had to be smaller
    if depth > 0 or size <= budget[0]:
        try:
            _insert_statement(con, group)
            return
        except duckdb.OutOfMemoryException:
            if min(budget[0], size) // 2 < _SMALLEST_STATEMENT_BYTES:
                raise
            budget[0] = min(budget[0], size) // 2
    for part in _statements(group, budget[0], scratch, f"-{depth + 1}"):
        _insert_records(con, part, budget, scratch, depth + 1)


def _insert_statement(con: duckdb.DuckDBPyConnection, group: list[tuple[int, str]]) -> None:
    con.execute("CREATE OR REPLACE TEMP TABLE source (proc INTEGER, path VARCHAR)")
    insert_rows(con, "source", group)
    names = ", ".join("'" + path.replace("'", "''") + "'" for _, path in group)
    con.execute(f"""
        INSERT INTO record
        WITH line AS (
            -- one parse per line: the records as lists of JSON values
            SELECT p.proc, p.wall_offset, json_transform(l.json, '{{"r": [["JSON"]]}}').r AS r
            FROM read_json_objects([{names}], format='newline_delimited', filename=true,
                                   ignore_errors=true, maximum_object_size={MAX_LINE_BYTES}) AS l
            JOIN source AS f ON f.path = l.filename JOIN process AS p ON p.proc = f.proc
            WHERE starts_with(l.json, '{{"t":"rec"') OR starts_with(l.json, '{{"t": "rec"')),
        item AS (SELECT proc, wall_offset, unnest(r) AS x, unnest(generate_series(1, len(r))) AS pos FROM line),
        -- a time outside [0, 2^62), as recorded or as an epoch time, or a span ending before it starts
        -- makes the record malformed, as in inspect's reader (rawentries.valid_record): any two times
        -- then differ by less than 2^62, which no sum or difference of them overflows
        timed AS (SELECT *, CASE WHEN start BETWEEN 0 AND {MAX_TS - 1}
                                 AND start + wall_offset BETWEEN 0 AND {MAX_TS - 1} THEN start + wall_offset END AS ts
                  FROM (SELECT *, TRY_CAST(x[2] AS BIGINT) AS start, TRY_CAST(x[3] AS BIGINT) AS ending FROM item))
        SELECT i.proc, c.kind, c.domain, c.name, i.ts AS ts_ns,
               CASE WHEN c.kind = 'span' AND i.ending BETWEEN i.start AND {MAX_TS - 1}
                     AND i.ending + i.wall_offset < {MAX_TS} THEN i.ending + i.wall_offset END AS end_ns,
               TRY_CAST(CASE c.kind WHEN 'span' THEN x[4] WHEN 'event' THEN x[3] END AS BIGINT) AS tid,
               CASE c.kind WHEN 'span' THEN x[5] WHEN 'event' THEN x[4] ELSE x[3] END AS attrs,
               i.pos::INTEGER AS pos, CASE WHEN c.kind = 'span' THEN x[5]->>'batch_id' END AS batch_id
        FROM timed i LEFT JOIN channel c ON c.proc = i.proc AND c.id = TRY_CAST(x[1] AS INTEGER)
    """)


_SMALLEST_STATEMENT_BYTES = 1 << 20
"""A statement that runs out of memory with fewer raw bytes than this is not cut again: the error stands."""


def _statement_bytes(con: duckdb.DuckDBPyConnection) -> int:
    """Raw bytes one statement reads at most: a 1.5 GB file (one engine's 10 M-record run) read in one
    statement did not fit in 1 GB, where statements of a quarter of the limit each did. (Which operator
    ran out was not isolated: a bare parse and unnest of the same file in one statement fit.)"""
    return max(memory_limit_bytes(con) // 4, 1)


def _statements(files: list[tuple[int, str]], budget: int, scratch: Path, tag: str = ""
                ) -> Iterator[list[tuple[int, str]]]:
    """The (process, file) pairs each statement reads: files of at most `budget` bytes together, and as
    many files as `budget` holds DuckDB's JSON buffers for (it sets aside twice the longest line it
    accepts for each file a statement names, whatever the file's size: 60 files of a 30 M-record run in
    one statement did not fit in 1 GB). A file larger than `budget` is read a piece at a time (`_pieces`,
    in `scratch`, its name ending in `tag`), one statement each."""
    per_statement = max(1, budget // (2 * MAX_LINE_BYTES))
    group: list[tuple[int, str]] = []
    size = 0
    for proc, path in files:
        file_size = os.path.getsize(path)
        if group and (len(group) == per_statement or size + file_size > budget):
            yield group
            group, size = [], 0
        if file_size <= budget:
            group.append((proc, path))
            size += file_size
            continue
        for piece in _pieces(path, budget, scratch / f"piece-{proc}{tag}.sprof.jsonl"):
            yield [(proc, piece)]
    if group:
        yield group


def _pieces(path: str, max_bytes: int, piece: Path) -> Iterator[str]:
    """`path` in consecutive pieces of whole lines of about `max_bytes` each (at most twice that, plus a
    line), each written to `piece` when the one before has been read (disk: one piece at a time)."""
    block_size = min(_COPY_BLOCK, max_bytes)
    with open(path, "rb") as src:
        carry = b""
        while True:
            with open(piece, "wb") as dst:  # in a private directory this process made: no link there
                dst.write(carry)
                written, carry = len(carry), b""
                while written < max_bytes and (block := src.read(block_size)):
                    dst.write(block)
                    written += len(block)
                # the piece ends with the line under way
                while written >= max_bytes and (block := src.read(block_size)):
                    end = block.find(b"\n") + 1
                    if end:
                        dst.write(block[:end])
                        carry = block[end:]
                        break
                    dst.write(block)
                    written += len(block)
            if not written:
                return
            yield str(piece)


_UNITS = {"bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def memory_limit_bytes(con: duckdb.DuckDBPyConnection) -> int:
    """DuckDB's memory limit (it shows it as e.g. '953.6 MiB'); 1 GiB where it cannot be read."""
    shown = str(con.execute("SELECT current_setting('memory_limit')").fetchone()[0])  # type: ignore[index]
    number, _, unit = shown.partition(" ")
    try:
        return int(float(number) * _UNITS[unit])
    except (KeyError, ValueError):
        return 1 << 30


def _drop_too_deep(con: duckdb.DuckDBPyConnection) -> None:
    """Attributes nested deeper than a JSON reader's recursion allows (the writer cannot produce them: a
    corrupt or crafted line) would make every output carrying them unreadable: such a record counts as
    malformed. Only records with that many brackets at all are parsed to find their depth."""
    # The byte length first: JSON that deep opens and closes that many brackets, so it is at least twice
    # as long, and most records are far shorter. Then whether it opens that many brackets at all: RE2 stops
    # at the count and copies nothing, where counting them by removing them built a copy of every long
    # text (most of this check's time: the batch spans' entry lists are long).
    suspects = con.execute(f"""SELECT rowid, attrs::VARCHAR FROM record
                               WHERE strlen(attrs::VARCHAR) >= {2 * _DEEP_SUSPECT}
                                 AND regexp_matches(attrs::VARCHAR, '(?:[\\[{{][^\\[{{]*){{{_DEEP_SUSPECT}}}')""")
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
        con.execute("CREATE OR REPLACE TEMP TABLE too_deep (id BIGINT)")
        insert_rows(con, "too_deep", [(rowid,) for rowid in deep])
        con.execute("UPDATE record SET kind = NULL WHERE rowid IN (SELECT id FROM too_deep)")


def _spell_out_non_finite(con: duckdb.DuckDBPyConnection) -> None:
    """Attributes holding NaN or ±Infinity (the writer writes a float that is not finite as JavaScript
    does; DuckDB's reader takes it) have them as the texts "NaN", "Infinity", "-Infinity": JSON has no such
    number, and one of them in the trace left the whole file unreadable by a strict JSON parser, e.g. a
    browser's. A number read from such a text is the same float again (`TRY_CAST(... AS DOUBLE)`)."""
    found = con.execute("SELECT rowid, attrs::VARCHAR FROM record WHERE contains(attrs::VARCHAR, 'NaN') "
                        "OR contains(attrs::VARCHAR, 'Infinity')")
    spelled = []
    while rows := found.fetchmany(1024):
        for rowid, text in rows:
            try:
                value = json.loads(text)
            except (ValueError, RecursionError):
                continue
            spelled_out = non_finite_spelled(value)
            if spelled_out != value:  # only where a number was spelled out: other texts stay as written
                spelled.append((rowid, json.dumps(spelled_out, separators=(",", ":"), ensure_ascii=False)))
    if spelled:
        con.execute("CREATE OR REPLACE TEMP TABLE spelled (id BIGINT, attrs VARCHAR)")
        insert_rows(con, "spelled", spelled)
        con.execute("UPDATE record SET attrs = s.attrs::JSON FROM spelled s WHERE record.rowid = s.id")


# the records the `span` view holds (a span without an integer start or end is kept out), as a condition on
# `record` for the queries that read the table itself
SPAN_RECORD = "kind = 'span' AND ts_ns IS NOT NULL AND end_ns IS NOT NULL"
EVENT_RECORD = "kind = 'event' AND ts_ns IS NOT NULL"


def create_record_views(con: duckdb.DuckDBPyConnection) -> None:
    # a record without a declared channel, an integer time, or (a span) an integer end is kept out of the views
    valid = "kind IS NOT NULL AND ts_ns IS NOT NULL AND (kind <> 'span' OR end_ns IS NOT NULL)"
    con.execute("""CREATE OR REPLACE VIEW span AS SELECT proc, domain, name, ts_ns AS start_ns, end_ns, tid, attrs,
                   pos, batch_id FROM record WHERE """ + SPAN_RECORD)
    con.execute("CREATE OR REPLACE VIEW event AS SELECT proc, domain, name, ts_ns, tid, attrs, pos FROM record "
                "WHERE " + EVENT_RECORD)
    con.execute("CREATE OR REPLACE VIEW counter AS SELECT proc, domain, name, ts_ns, attrs AS vals, pos FROM record "
                "WHERE kind = 'counter' AND " + valid)


def count_bad_records(con: duckdb.DuckDBPyConnection, processes: list[Process], problems: list[str]) -> None:
    """Per file, one problem line with the count of: `rec` lines DuckDB's reader skipped that the scan did
    not list (not valid JSON, though they end as a `rec` line ends; their records are missing), and
    malformed records (`_insert_statement`)."""
    counts = {proc: (lines, bad) for proc, lines, bad in con.execute(
        "SELECT proc, count(*) FILTER (WHERE pos = 1), count(*) FILTER (WHERE kind IS NULL OR ts_ns IS NULL "
        "OR (kind = 'span' AND end_ns IS NULL)) FROM record GROUP BY proc").fetchall()}
    for proc in processes:
        lines_read, bad = counts.get(proc.index, (0, 0))
        # every line read has a record at position 1; the scan counted the lines it expects to be read
        if proc.rec_lines > lines_read:
            problems.append(f"{proc.path}: {proc.rec_lines - lines_read} record line(s) not valid JSON, their "
                            f"records missing; `service-profiler inspect {proc.path}` lists them by line number")
        if bad:
            problems.append(f"{proc.path}: {bad} malformed records (undeclared channel, a time that is not an "
                            "integer in [0, 2^62), a span ending before it starts, or attributes nested too deep) "
                            "skipped")
