"""`profiler.db`: the run and its analysis tables in one SQLite file.

Raw tables (timestamps epoch ns, `attrs`/`values` as JSON text, queryable with json_extract):
  process, process_meta, span, event, counter, run_state, problem. The `reqs` list of a
  batchFrameworkProcessing span is not repeated in its attrs: it is the batch_req table, in order.
Analysis tables (columns as in `tables`; list cells as JSON text):
  request (+ req_row), batch (+ batch_row), batch_req (one row per request in each batch: batch_row,
  pos in the batch, req_row, rid, the batch entry and the request's state / iteration / tokens generated
  so far, as in per_iteration_requests.csv; clustered by (batch_row, pos), indexed by req_row),
  kvcache, state_transition, lifecycle_event.
Views: v_batch_size_curve, v_batch_exec, v_ttft, v_request_latency, v_request_breakdown, v_kv_usage,
v_queue_curve.

The raw tables are written straight from the raw files by `write_raw_db` (a stream); `SqliteExport`
adds the analysis tables to that file from `analysis_messages` (analyze runs both in a process of its
own, `db_process`, which is sent the messages through a spool file). Each half is one transaction of
multi-row INSERTs (`insert_rows`); the file replaces the target only at the end, so a failed export never leaves a
half-written database behind.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any

from service_profiler.outputs import private_dir, remove_private_dir
from service_profiler.rawdata.fastjson import JSON_ENCODERS, json_text
from service_profiler.rawdata.rawentries import add_records_py
from service_profiler.rawdata.rawfile import RECORD_CLASSES, CounterRecord, EventRecord, RunData, SpanRecord, read_run

try:
    from service_profiler.rawdata._records import add_raw_rows as _c_add_raw_rows
except ImportError:  # not built: the pure-Python rows (build_raw_rows_py)
    _c_add_raw_rows = None

from .entries import EntryChunk, EntrySource, build_chunk
from .entry_state import EntryStates
from .tables import STORED_TABLES, AnalysisTables, Table

_VIEWS = {
    "v_batch_size_curve": "SELECT batch_row, start_ns, dp_rank, batch_id, batch_size, num_prefill_reqs, "
                          "num_decode_reqs, total_scheduled_tokens, prefill_tokens, decode_tokens "
                          "FROM batch ORDER BY start_ns",
    "v_batch_exec": "SELECT batch_row, start_ns, dp_rank, batch_id, batch_type, batch_size, total_scheduled_tokens, "
                    "schedule_ms, model_run_ms, step_ms FROM batch WHERE model_run_ms IS NOT NULL "
                    "ORDER BY start_ns",
    "v_ttft": "SELECT rid, api_rid, arrival_ns, ttft_ms, input_tokens, queue_ms FROM request "
              "WHERE ttft_ms IS NOT NULL ORDER BY arrival_ns",
    "v_request_latency": "SELECT rid, arrival_ns, completion_ns, queue_ms, prefill_ms, decode_ms, ttft_ms, tpot_ms, "
                         "e2e_ms, input_tokens, output_tokens FROM request ORDER BY arrival_ns",
    # docs/METRICS.md: the parts add up to e2e_ms, the first five to ttft_ms
    "v_request_breakdown": "SELECT rid, api_rid, arrival_ns, arrival_source, stream, ttft_ms, e2e_ms, http_receive_ms, "
                           "preprocess_ms, engine_queue_ms, engine_prefill_ms, first_token_delivery_ms, "
                           "decode_delivery_ms, engine_ttft_ms, engine_e2e_ms FROM request ORDER BY arrival_ns",
    "v_kv_usage": "SELECT ts_ns, proc, dp_rank, total_blocks, used_blocks, free_blocks, usage FROM kvcache "
                  "WHERE name = 'kvcache' ORDER BY ts_ns",
    "v_queue_curve": "SELECT start_ns, dp_rank, running, waiting FROM batch ORDER BY start_ns",
}

TABLE_PART_ROWS = 4_096  # rows per part of an analysis table handed to the database process (16k: +35 MB there)

# built by `write_raw_db` with its tables
_RAW_INDEXES = [
    "CREATE INDEX ix_span_name ON span(name, start_ns)",
    "CREATE INDEX ix_span_batch ON span(batch_id, proc)",
    "CREATE INDEX ix_event_name ON event(name, ts_ns)",
    "CREATE INDEX ix_event_rid ON event(rid)",
    "CREATE INDEX ix_counter_name ON counter(name, ts_ns)",
]
_INDEXES = [
    "CREATE INDEX ix_request_rid ON request(rid)",
    "CREATE INDEX ix_request_arrival ON request(arrival_ns)",
    "CREATE INDEX ix_batch_id ON batch(batch_id, dp_rank)",
    "CREATE INDEX ix_batch_start ON batch(start_ns)",
    "CREATE INDEX ix_batch_req_request ON batch_req(req_row)",
    "CREATE INDEX ix_kvcache_ts ON kvcache(ts_ns)",
    "CREATE INDEX ix_state_rid ON state_transition(rid, seq)",
    "CREATE INDEX ix_lifecycle_ts ON lifecycle_event(ts_ns)",
]


def _sql_type(values: Iterable[Any]) -> str:
    for v in values:
        if v is None:
            continue
        if isinstance(v, bool | int):
            return "INTEGER"
        if isinstance(v, float):
            return "REAL"
        return "TEXT"
    return ""


@dataclass
class TablePart:
    """Consecutive rows of one analysis table, with what its CREATE TABLE needs (worked out on the whole
    table: a part alone could see a column empty): the database process is handed a long table a part
    at a time, so it never holds all of it (a million-record run's batch table is ~100 MB of objects)."""

    name: str
    columns: list[str]
    rows: list[tuple[Any, ...]]
    first: str | None  # name of a leading row-number column (INTEGER PRIMARY KEY), or None
    start: int  # the row number of rows[0] in the table
    last: bool  # the table's last part
    sql_types: list[str]
    json_cols: list[int]  # columns holding lists / dicts, stored as JSON text


def table_parts(name: str, table: Table, first: str | None = None) -> Iterator[TablePart]:
    """`table` as parts of at most TABLE_PART_ROWS rows (one empty part for an empty table)."""
    rows, rows_per_part = table.rows, TABLE_PART_ROWS
    n = len(rows)
    sql_types = [_sql_type(r[i] for r in rows) for i in range(len(table.columns))]
    json_cols = [i for i in range(len(table.columns)) if any(isinstance(r[i], tuple | list | dict) for r in rows[:50])]
    for lo in range(0, max(n, 1), rows_per_part):
        yield TablePart(name, list(table.columns), rows[lo:lo + rows_per_part], first, lo, lo + rows_per_part >= n,
                        sql_types, json_cols)


def _write_table_part(db: sqlite3.Connection, part: TablePart) -> None:
    cols, first, json_cols = part.columns, part.first, part.json_cols
    if part.start == 0:
        defs = [f'"{c}" {t}'.strip() for c, t in zip(cols, part.sql_types, strict=True)]
        if first:
            defs.insert(0, f"{first} INTEGER PRIMARY KEY")
        db.execute(f"CREATE TABLE {part.name} ({', '.join(defs)})")
    start = part.start
    if json_cols:
        def rows() -> Iterable[Any]:
            for k, r in enumerate(part.rows, start):
                out = list(r)
                for i in json_cols:
                    if out[i] is not None:
                        out[i] = json_text(out[i])
                yield [k, *out] if first else out
    elif first:
        def rows() -> Iterable[Any]:
            for k, r in enumerate(part.rows, start):
                yield (k, *r)
    else:
        def rows() -> Iterable[Any]:
            return iter(part.rows)
    insert_rows(db, part.name, len(cols) + (1 if first else 0), rows())


# Rows per INSERT statement of `insert_rows` (at most SQLite's historical 999 parameters a statement)
ROWS_PER_INSERT = 64
_MAX_PARAMETERS = 999


def insert_rows(db: sqlite3.Connection, table: str, width: int, rows: Iterable[Sequence[Any]]) -> None:
    """INSERT `rows` (`width` values each) into `table`, ROWS_PER_INSERT rows a statement: the cost of a
    statement (executemany's per-row setup, SQLite's step and reset) is then paid once per 64 rows, and
    only the binding is per value. Measured on 1.15M rows of batch_req: 2.2 -> 1.4 s; on 510k spans:
    1.3 -> 0.6 s. The rows go in in their order (rowids as with one statement per row); a last group
    of fewer rows takes one statement per row."""
    per = max(1, min(ROWS_PER_INSERT, _MAX_PARAMETERS // width))
    one = "(" + ",".join("?" * width) + ")"
    size = per * width
    rows = iter(rows)
    tail: list[tuple[Any, ...]] = []

    def full_groups() -> Iterator[tuple[Any, ...]]:
        flat, take = chain.from_iterable, islice
        while True:
            params = tuple(flat(take(rows, per)))
            if len(params) < size:
                tail.append(params)
                return
            yield params

    db.executemany(f"INSERT INTO {table} VALUES " + ",".join([one] * per), full_groups())
    rest = tail[0] if tail else ()
    if rest:
        db.executemany(f"INSERT INTO {table} VALUES {one}", [rest[i:i + width] for i in range(0, len(rest), width)])


_RECORD_TABLES = {
    # name: (columns after the id, time column)
    "span": ("proc INTEGER, domain TEXT, name TEXT, start_ns INTEGER, end_ns INTEGER, dur_ns INTEGER, tid INTEGER, "
             "batch_id INTEGER, attrs TEXT", "start_ns"),
    "event": ("proc INTEGER, domain TEXT, name TEXT, ts_ns INTEGER, tid INTEGER, rid TEXT, batch_id INTEGER, "
              "attrs TEXT", "ts_ns"),
    "counter": ('proc INTEGER, domain TEXT, name TEXT, ts_ns INTEGER, "values" TEXT', "ts_ns"),
}


def _write_process_tables(db: sqlite3.Connection, run: RunData) -> None:
    dumps = json_text
    db.execute("CREATE TABLE process (proc INTEGER PRIMARY KEY, key TEXT, hostname TEXT, pid INTEGER, "
               "ppid INTEGER, role TEXT, argv TEXT, engine TEXT, profiler_version TEXT, wall_offset_ns INTEGER, "
               "dropped INTEGER, warnings TEXT, patch TEXT, path TEXT)")
    db.executemany("INSERT INTO process VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", [
        (p.index, p.key, p.hostname, p.pid, p.ppid, p.role, dumps(p.argv), dumps(p.engine), p.profiler_version,
         p.wall_offset_ns, p.dropped, dumps(p.warnings), dumps(p.patch), p.path) for p in run.processes])
    # what each file says about its completeness (losses.py): closed / not closed / unknown, and the
    # time ranges whose records are missing or uncertain (end_ns NULL: to the end of the run)
    db.execute("CREATE TABLE process_completeness (proc INTEGER PRIMARY KEY, status TEXT, close_reason TEXT, "
               "flushed_until_ns INTEGER)")
    db.executemany("INSERT INTO process_completeness VALUES (?,?,?,?)", [
        (p.index, p.loss.status, p.loss.close_reason, p.loss.flushed_until_ns) for p in run.processes])
    db.execute("CREATE TABLE process_gap (proc INTEGER, start_ns INTEGER, end_ns INTEGER, reason TEXT, "
               "count INTEGER)")
    db.executemany("INSERT INTO process_gap VALUES (?,?,?,?,?)", [
        (p.index, *g.as_dict().values()) for p in run.processes for g in p.loss.all_gaps()])
    db.execute("CREATE TABLE process_meta (proc INTEGER, key TEXT, value TEXT)")
    db.executemany("INSERT INTO process_meta VALUES (?,?,?)",
                   [(p.index, k, dumps(v)) for p in run.processes for k, v in p.meta.items()])
    db.execute("CREATE TABLE run_state (proc INTEGER, ts_ns INTEGER, enabled INTEGER, reason TEXT)")
    db.executemany("INSERT INTO run_state VALUES (?,?,?,?)", run.states)
    db.execute("CREATE TABLE problem (message TEXT)")
    db.executemany("INSERT INTO problem VALUES (?)", [(p,) for p in run.problems])


class _RawTables:
    """The raw tables of one new SQLite file: records are added in reading order (`add`, any number of
    times) into temporary tables, and `finish` copies them into span / event / counter ordered by
    (time, order added), writes the process tables and the indexes, and commits."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.unlink(missing_ok=True)
        self.db = _connect(path)
        self.db.execute("BEGIN")
        for name, (columns, _) in _RECORD_TABLES.items():
            self.db.execute(f"CREATE TEMP TABLE read_{name} ({columns})")
        self.widths = {name: columns.count(",") + 1 for name, (columns, _) in _RECORD_TABLES.items()}

    def add(self, run: RunData) -> None:
        """A read run's records."""
        self.add_rows(_span_rows(run.spans), _event_rows(run.events), _counter_rows(run.counters))

    def add_rows(self, spans: Iterable[Sequence[Any]], events: Iterable[Sequence[Any]],
                 counters: Iterable[Sequence[Any]]) -> None:
        """Rows as `build_raw_rows` makes them."""
        db, widths = self.db, self.widths
        insert_rows(db, "read_span", widths["span"], spans)
        insert_rows(db, "read_event", widths["event"], events)
        insert_rows(db, "read_counter", widths["counter"], counters)

    def finish(self, run: RunData) -> Path:
        db = self.db
        _write_process_tables(db, run)
        for name, (columns, time_column) in _RECORD_TABLES.items():
            # An index on the time (its entries end with the rowid) hands the copy its rows in
            # (time, rowid) order: sorting the small index keys costs less than sorting whole rows
            # (~1.3 -> ~1.0 s for the raw tables of a million records).
            db.execute(f"CREATE INDEX temp.ix_read_{name} ON read_{name}({time_column})")
            db.execute(f"CREATE TABLE {name} (id INTEGER PRIMARY KEY, {columns})")
            db.execute(f"INSERT INTO {name} SELECT NULL, * FROM read_{name} ORDER BY {time_column}, rowid")
            # (read_* is not dropped: the temporary file goes when the connection closes below; a DROP
            # would first free its pages one by one, ~0.15 s on a million records)
        for stmt in _RAW_INDEXES:
            db.execute(stmt)
        db.execute("COMMIT")
        db.close()
        return self.path

    def abort(self) -> None:
        self.db.close()
        self.path.unlink(missing_ok=True)


def write_raw_db(paths: Sequence[Path | str], path: Path) -> Path:
    """The raw tables (process, process_meta, span, event, counter, run_state, problem) and their
    indexes, in a new SQLite file at `path`, read straight from the raw files as a stream: memory
    stays a few MB however long the run, so analyze runs this beside the rest of the analysis in a
    process forked before the run is read (`db_process`), not after it, when a child would copy every
    page of records it touched. Records go into temporary tables as they are read and are copied
    into span / event / counter ordered by (time, reading order): the same rows, ids and order as a
    stable sort of the read run (`read_run`) gives. The analysis tables are added to this file
    afterwards (`SqliteExport`)."""
    def fill(raw: _RawTables) -> RunData:
        def drain(run: RunData) -> None:
            # the lists hold rows (build_raw_rows), not records
            raw.add_rows(run.spans, run.events, run.counters)
            run.spans.clear()
            run.events.clear()
            run.counters.clear()

        return read_run(paths, drain, build_raw_rows)

    return _write_raw_tables(path, fill)


def write_raw_db_from(run: RunData, path: Path) -> Path:
    """`write_raw_db` for a run already read (its lists are time sorted, so the rows come out the same):
    for small runs, where reading the files a second time costs more than the copy-on-write pages of
    a process forked after the read."""
    def fill(raw: _RawTables) -> RunData:
        raw.add(run)
        return run

    return _write_raw_tables(path, fill)


def _write_raw_tables(path: Path, fill: Callable[[_RawTables], RunData]) -> Path:
    """A new file of raw tables at `path`, their records added by `fill`, which returns the run they came
    from; on any failure the file is removed."""
    raw = _RawTables(path)
    try:
        return raw.finish(fill(raw))
    except BaseException:
        raw.abort()
        raise


_SCALARS = frozenset({int, float, str, bool})


def _span_rows(spans: list[SpanRecord]) -> Iterator[tuple[Any, ...]]:
    """span rows: batch_id as a scalar (`_scalar`), attrs as JSON text; the checks are inlined (a million
    spans), `_scalar` is called only for the rare non-scalar value."""
    dumps, scalars = json_text, _SCALARS
    for proc, domain, name, start, end, tid, attrs in spans:
        if attrs:
            bid = attrs.get("batch_id")
            if bid is not None and bid.__class__ not in scalars:
                bid = _scalar(bid)
            if name == "batchFrameworkProcessing" and "reqs" in attrs:
                # the per-request entries are the batch_req table, row for row; not stored twice
                text = dumps({k: v for k, v in attrs.items() if k != "reqs"})
            else:
                text = dumps(attrs)
            yield proc, domain, name, start, end, end - start, tid, bid, text
        else:
            yield proc, domain, name, start, end, end - start, tid, None, None if attrs is None else dumps(attrs)


def _event_rows(events: list[EventRecord]) -> Iterator[tuple[Any, ...]]:
    dumps, scalars = json_text, _SCALARS
    for proc, domain, name, ts, tid, attrs in events:
        if attrs:
            rid, bid = attrs.get("rid"), attrs.get("batch_id")
            if rid is not None and rid.__class__ not in scalars:
                rid = _scalar(rid)
            if bid is not None and bid.__class__ not in scalars:
                bid = _scalar(bid)
            yield proc, domain, name, ts, tid, rid, bid, dumps(attrs)
        else:
            yield proc, domain, name, ts, tid, None, None, None if attrs is None else dumps(attrs)


def _counter_rows(counters: list[CounterRecord]) -> Iterator[tuple[Any, ...]]:
    dumps = json_text
    for proc, domain, name, ts, values in counters:
        yield proc, domain, name, ts, dumps(values)


def _scalar(v: Any) -> Any:
    return v if v is None or isinstance(v, int | float | str) else json_text(v)


def build_raw_rows_py(records: list[Any], chans: dict[Any, tuple[int, str, str, int]], off: int, pi: int,
                      spans: list[Any], events: list[Any], counters: list[Any], shared: dict[int, int] | None,
                      dropped: list[int]) -> None:
    """The rows of the raw tables (`_span_rows`, `_event_rows`, `_counter_rows`) straight from a line's
    records (a `rawentries.LineBuilder`): the definition of service_profiler/rawdata/_records.c's add_raw_rows,
    which makes them without the records in between, and the fallback where it was not built."""
    made: tuple[list[Any], list[Any], list[Any]] = ([], [], [])
    add_records_py(records, chans, off, pi, *made, RECORD_CLASSES, shared, dropped)
    spans += _span_rows(made[0])
    events += _event_rows(made[1])
    counters += _counter_rows(made[2])


if _c_add_raw_rows is not None:
    _ENCODERS = (*JSON_ENCODERS, _scalar)

    def build_raw_rows(records: list[Any], chans: dict[Any, tuple[int, str, str, int]], off: int, pi: int,
                       spans: list[Any], events: list[Any], counters: list[Any], shared: dict[int, int] | None,
                       dropped: list[int]) -> None:
        """`build_raw_rows_py`, in C."""
        _c_add_raw_rows(records, chans, off, pi, spans, events, counters, _ENCODERS, shared, dropped)
else:
    build_raw_rows = build_raw_rows_py


BATCH_REQ_DDL = (
    # clustered by (batch_row, pos): the batch -> requests lookup needs no separate index
    "CREATE TABLE batch_req (batch_row INTEGER, pos INTEGER, req_row INTEGER, rid TEXT, phase INTEGER, "
    "scheduled_tokens INTEGER, computed_tokens_before INTEGER, prompt_tokens INTEGER, resumed INTEGER, "
    "state TEXT, iteration INTEGER, generated_tokens_before INTEGER, time_in_state_ms REAL, "
    "PRIMARY KEY (batch_row, pos)) WITHOUT ROWID")
_BATCH_REQ_WIDTH = 13

# What `SqliteExport.apply` consumes, in order (`analysis_messages`): ("table", TablePart) for each part of
# each analysis table (request first), ("entries", EntrySource) for each chunk of batch_req (after the
# batch table's parts that hold its batches), which the consumer builds (`entries.build_chunk`). Plain
# tuples of picklable values: analyze spools them to the process that owns the database file, which
# thus also does the work of building the entries.
Message = tuple[Any, ...]


def analysis_messages(tables: AnalysisTables) -> Iterator[Message]:
    """The analysis tables (in parts) and the sources of the per-request batch entries, as
    `SqliteExport` messages; a chunk at a time, so memory stays bounded."""
    yield from core_messages(tables)
    yield from stored_messages(tables)


def core_messages(tables: AnalysisTables) -> Iterator[Message]:
    """The request and batch tables and the batches' entries: the first `analysis_messages`."""
    from .entries import iter_entry_sources

    for part in table_parts("request", tables.requests, "req_row"):
        yield "table", part
    # the batch table's parts and the entries of its batches interleaved, each chunk of entries right
    # after the parts that hold its batches: batch.csv, written from both, then holds a part or two
    parts = table_parts("batch", tables.batches, "batch_row")
    sent = 0  # batch rows sent so far
    for source in iter_entry_sources(tables):
        while sent < source.first_batch + len(source.batches):
            part = next(parts)
            yield "table", part
            sent = part.start + len(part.rows)
        yield "entries", source
    for part in parts:
        yield "table", part


def stored_messages(tables: AnalysisTables) -> Iterator[Message]:
    """The other analysis tables (STORED_TABLES): the rest of `analysis_messages`."""
    for name, attr in STORED_TABLES.items():
        for part in table_parts(name, getattr(tables, attr)):
            yield "table", part


class EntryBuilder:
    """Builds the entry chunks of `analysis_messages`' entry sources in order, with each entry's req_row
    (the request table's row of its rid, from the request parts, which come first)."""

    def __init__(self) -> None:
        self.states = EntryStates()
        self.req_row: dict[Any, int] = {}

    def see(self, part: TablePart) -> None:
        if part.name == "request":
            rid = part.columns.index("rid")
            for k, row in enumerate(part.rows, part.start):
                self.req_row[row[rid]] = k

    def chunk(self, source: EntrySource) -> tuple[EntryChunk, list[int | None]]:
        chunk = build_chunk(source, self.states)
        return chunk, list(map(self.req_row.get, chunk.rid))


class SqliteExport:
    """Completes profiler.db from the file of raw tables `write_raw_db` wrote: `start()` opens it,
    `apply()` inserts the analysis tables and batch_req from `analysis_messages` (and hands each entry
    chunk to `on_entry_chunk`: the per-iteration CSV is made from the same chunks), `finish()` builds
    their indexes and the views, commits, and moves the file into place. One transaction: a failed
    export never leaves a half-written database behind."""

    def __init__(self, path: Path, raw_db: Path) -> None:
        """`raw_db`: in a directory of this process's own (outputs.private_dir), where the database is
        also completed; `finish` then replaces whatever is at `path` (a link is replaced, never followed)."""
        self.path, self.raw_db = path, raw_db
        self.tmp = raw_db.with_name(path.name + ".tmp")
        self.db: sqlite3.Connection | None = None
        self.entries = EntryBuilder()

    def start(self) -> SqliteExport:
        if not self.raw_db.exists():
            raise RuntimeError("the raw tables (span, event, ...) were not written; see the error above")
        os.replace(self.raw_db, self.tmp)
        self.db = _connect(self.tmp)
        self.db.execute("BEGIN")
        self.db.execute(BATCH_REQ_DDL)
        return self

    def apply(self, messages: Iterable[Message], on_entry_chunk: Callable[[EntryChunk], None] | None = None) -> None:
        db = self.db
        assert db is not None, "start() first"
        builder = self.entries
        try:
            for message in messages:
                if message[0] == "entries":
                    chunk, req_rows = builder.chunk(message[1])
                    insert_rows(db, "batch_req", _BATCH_REQ_WIDTH, zip(
                        chunk.batch_row, chunk.pos, req_rows, chunk.rid, chunk.phase, chunk.scheduled,
                        chunk.computed, chunk.prompt, chunk.resumed, chunk.state, chunk.iteration,
                        chunk.generated_before, chunk.time_in_state_ms, strict=True))
                    if on_entry_chunk is not None:
                        on_entry_chunk(chunk)
                else:
                    builder.see(message[1])
                    _write_table_part(db, message[1])
        except BaseException:
            self.abort()
            raise

    def finish(self) -> Path:
        db = self.db
        assert db is not None, "start() first"
        try:
            for stmt in _INDEXES:
                db.execute(stmt)
            for name, select in _VIEWS.items():
                db.execute(f"CREATE VIEW {name} AS {select}")
            db.execute("COMMIT")
        except BaseException:
            self.abort()
            raise
        db.close()
        self.db = None
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None
        self.tmp.unlink(missing_ok=True)


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    # A fresh file written once: durability on crash does not matter, speed does.
    # 64 KiB pages: fewer B-tree pages per row of JSON text (~20% off the inserts); exclusive
    # locking skips the file-lock calls of each statement.
    db.execute("PRAGMA page_size=65536")
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("PRAGMA locking_mode=EXCLUSIVE")
    db.execute("PRAGMA cache_size=-16384")  # 16 MB: index builds spill sorted runs to temp files
    return db


def write_sqlite(paths: Sequence[Path | str], tables: AnalysisTables, path: Path) -> Path:
    """Write `profiler.db` at `path` (replaced if it exists) for the run read from `paths`."""
    work = private_dir(path.parent, path.name)
    try:
        raw_db = work / (path.name + ".raw.tmp")
        write_raw_db(paths, raw_db)
        export = SqliteExport(path, raw_db).start()
        export.apply(analysis_messages(tables))
        return export.finish()
    finally:
        remove_private_dir(work)
