"""`profiler.db`: the run and its analysis tables in one SQLite file.

Raw tables (timestamps epoch ns, `attrs`/`values` as JSON text, queryable with json_extract):
  process, process_meta, span, event, counter, run_state, problem. The `reqs` list of a
  batchFrameworkProcessing span is not repeated in its attrs: it is the batch_req table, in order.
Analysis tables (columns as in `tables`; list cells as JSON text):
  request (+ req_row), batch (+ batch_row), batch_req (one row per request in each batch: batch_row,
  pos in the batch, req_row, rid, the batch entry and the request's state / iteration / tokens generated
  so far, as in per_iteration_requests.csv; clustered by (batch_row, pos), indexed by req_row),
  kvcache, state_transition, lifecycle_event.
Views: v_batch_size_curve, v_batch_exec, v_ttft, v_request_latency, v_kv_usage, v_queue_curve.

Written with executemany in one transaction into a temporary file that replaces the target at the end,
so a failed export never leaves a half-written database behind.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from service_profiler.fastjson import json_text
from service_profiler.rawfile import EventRecord, RunData, SpanRecord

from .entries import EntryChunk
from .tables import AnalysisTables, Table

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
    "v_kv_usage": "SELECT ts_ns, proc, dp_rank, total_blocks, used_blocks, free_blocks, usage FROM kvcache "
                  "WHERE name = 'kvcache' ORDER BY ts_ns",
    "v_queue_curve": "SELECT start_ns, dp_rank, running, waiting FROM batch ORDER BY start_ns",
}

_INDEXES = [
    "CREATE INDEX ix_span_name ON span(name, start_ns)",
    "CREATE INDEX ix_span_batch ON span(batch_id, proc)",
    "CREATE INDEX ix_event_name ON event(name, ts_ns)",
    "CREATE INDEX ix_event_rid ON event(rid)",
    "CREATE INDEX ix_counter_name ON counter(name, ts_ns)",
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


def _write_table(db: sqlite3.Connection, name: str, table: Table, first: str | None = None) -> None:
    cols = list(table.columns)
    types = [_sql_type(r[i] for r in table.rows) for i in range(len(cols))]
    json_cols = [i for i in range(len(cols))
                 if any(isinstance(r[i], tuple | list | dict) for r in table.rows[:50])]
    defs = [f'"{c}" {t}'.strip() for c, t in zip(cols, types, strict=True)]
    if first:
        defs.insert(0, f"{first} INTEGER PRIMARY KEY")
    db.execute(f"CREATE TABLE {name} ({', '.join(defs)})")
    marks = ",".join("?" * (len(cols) + (1 if first else 0)))
    if json_cols:
        def rows() -> Iterable[Any]:
            for k, r in enumerate(table.rows):
                out = list(r)
                for i in json_cols:
                    if out[i] is not None:
                        out[i] = json_text(out[i])
                yield [k, *out] if first else out
    elif first:
        def rows() -> Iterable[Any]:
            for k, r in enumerate(table.rows):
                yield (k, *r)
    else:
        def rows() -> Iterable[Any]:
            return iter(table.rows)
    db.executemany(f"INSERT INTO {name} VALUES ({marks})", rows())


def _write_raw(db: sqlite3.Connection, run: RunData) -> None:
    dumps = json_text
    db.execute("CREATE TABLE process (proc INTEGER PRIMARY KEY, key TEXT, hostname TEXT, pid INTEGER, "
               "ppid INTEGER, role TEXT, argv TEXT, engine TEXT, profiler_version TEXT, wall_offset_ns INTEGER, "
               "dropped INTEGER, warnings TEXT, patch TEXT, path TEXT)")
    db.executemany("INSERT INTO process VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", [
        (p.index, p.key, p.hostname, p.pid, p.ppid, p.role, dumps(p.argv), dumps(p.engine), p.profiler_version,
         p.wall_offset_ns, p.dropped, dumps(p.warnings), dumps(p.patch), p.path) for p in run.processes])
    db.execute("CREATE TABLE process_meta (proc INTEGER, key TEXT, value TEXT)")
    db.executemany("INSERT INTO process_meta VALUES (?,?,?)",
                   [(p.index, k, dumps(v)) for p in run.processes for k, v in p.meta.items()])
    db.execute("CREATE TABLE span (id INTEGER PRIMARY KEY, proc INTEGER, domain TEXT, name TEXT, "
               "start_ns INTEGER, end_ns INTEGER, dur_ns INTEGER, tid INTEGER, batch_id INTEGER, attrs TEXT)")
    db.executemany("INSERT INTO span VALUES (NULL,?,?,?,?,?,?,?,?,?)", _span_rows(run.spans))
    db.execute("CREATE TABLE event (id INTEGER PRIMARY KEY, proc INTEGER, domain TEXT, name TEXT, ts_ns INTEGER, "
               "tid INTEGER, rid TEXT, batch_id INTEGER, attrs TEXT)")
    db.executemany("INSERT INTO event VALUES (NULL,?,?,?,?,?,?,?,?)", _event_rows(run.events))
    db.execute('CREATE TABLE counter (id INTEGER PRIMARY KEY, proc INTEGER, domain TEXT, name TEXT, '
               'ts_ns INTEGER, "values" TEXT)')
    db.executemany("INSERT INTO counter VALUES (NULL,?,?,?,?,?)", (
        (c.proc, c.domain, c.name, c.ts_ns, dumps(c.values)) for c in run.counters))
    db.execute("CREATE TABLE run_state (proc INTEGER, ts_ns INTEGER, enabled INTEGER, reason TEXT)")
    db.executemany("INSERT INTO run_state VALUES (?,?,?,?)", run.states)
    db.execute("CREATE TABLE problem (message TEXT)")
    db.executemany("INSERT INTO problem VALUES (?)", [(p,) for p in run.problems])


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


def _scalar(v: Any) -> Any:
    return v if v is None or isinstance(v, int | float | str) else json_text(v)


def _write_batch_req(db: sqlite3.Connection, tables: AnalysisTables,
                     on_chunk: Callable[[EntryChunk], None] | None = None) -> None:
    """batch_req: one row per request in each batch, in primary-key order, columns zipped in C."""
    from .entries import iter_entry_chunks

    # clustered by (batch_row, pos): the batch -> requests lookup needs no separate index
    db.execute("CREATE TABLE batch_req (batch_row INTEGER, pos INTEGER, req_row INTEGER, rid TEXT, phase INTEGER, "
               "scheduled_tokens INTEGER, computed_tokens_before INTEGER, prompt_tokens INTEGER, resumed INTEGER, "
               "state TEXT, iteration INTEGER, generated_tokens_before INTEGER, time_in_state_ms REAL, "
               "PRIMARY KEY (batch_row, pos)) WITHOUT ROWID")
    req_row = {rid: i for i, rid in enumerate(tables.requests.values("rid"))}
    sql = "INSERT INTO batch_req VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
    for c in iter_entry_chunks(tables):
        db.executemany(sql, zip(c.batch_row, c.pos, map(req_row.get, c.rid), c.rid, c.phase, c.scheduled, c.computed,
                                c.prompt, c.resumed, c.state, c.iteration, c.generated_before, c.time_in_state_ms,
                                strict=True))
        if on_chunk is not None:
            on_chunk(c)


class SqliteExport:
    """Writes profiler.db in two halves: `start()` inserts every row (Python-bound), then builds the
    indexes and views on a background thread, which SQLite runs without holding the GIL, so the next
    exporter overlaps with it; `finish()` waits and moves the file into place."""

    def __init__(self, run: RunData, tables: AnalysisTables, path: Path,
                 on_entry_chunk: Callable[[EntryChunk], None] | None = None, raw_elsewhere: bool = False) -> None:
        """`on_entry_chunk`: also given each chunk of per-request entries built for batch_req (the
        per-iteration CSV is made from the same chunks). `raw_elsewhere`: the raw tables are written by
        another process (`write_raw_db`) and copied in by `finish(raw_db)`; indexes are built there."""
        self.run, self.tables, self.path = run, tables, path
        self.on_entry_chunk = on_entry_chunk
        self.raw_elsewhere = raw_elsewhere
        self._db: sqlite3.Connection | None = None
        self.tmp = path.with_name(path.name + ".tmp")
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self) -> SqliteExport:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.unlink(missing_ok=True)
        db = _connect(self.tmp)
        try:
            db.execute("BEGIN")
            self._insert(db)
            if self.raw_elsewhere:
                db.execute("COMMIT")  # ATTACH (in finish) is refused inside a transaction
        except BaseException:
            db.close()
            self.tmp.unlink(missing_ok=True)
            raise
        if self.raw_elsewhere:
            self._db = db
            return self
        self._thread = threading.Thread(target=self._build_indexes, args=(db,), name="sqlite-indexes",
                                        daemon=True)
        self._thread.start()
        return self

    def _insert(self, db: sqlite3.Connection) -> None:
        tables = self.tables
        if not self.raw_elsewhere:
            _write_raw(db, self.run)
        _write_table(db, "request", tables.requests, first="req_row")
        _write_table(db, "batch", tables.batches, first="batch_row")
        _write_batch_req(db, tables, self.on_entry_chunk)
        _write_table(db, "kvcache", tables.kvcache)
        _write_table(db, "state_transition", tables.state_transitions)
        _write_table(db, "lifecycle_event", tables.events)

    def _build_indexes(self, db: sqlite3.Connection) -> None:
        try:
            for stmt in _INDEXES:
                db.execute(stmt)
            for name, select in _VIEWS.items():
                db.execute(f"CREATE VIEW {name} AS {select}")
            db.execute("COMMIT")
        except BaseException as exc:
            self._error = exc
        finally:
            db.close()

    def finish(self, raw_db: Path | None = None) -> Path:
        """Wait for the indexes and move the file into place. With `raw_elsewhere`: first copy the raw
        tables in from `raw_db` (SQLite's transfer path copies records without decoding them)."""
        if self._db is not None:
            db, self._db = self._db, None
            try:
                if raw_db is None or not raw_db.exists():
                    raise RuntimeError("the raw tables (span, event, ...) were not written; see the error above")
                db.execute("ATTACH DATABASE ? AS raw", (str(raw_db),))
                db.execute("BEGIN")
                names = db.execute("SELECT name, sql FROM raw.sqlite_master WHERE type = 'table' ORDER BY rowid")
                for name, sql in names.fetchall():
                    db.execute(sql)
                    db.execute(f'INSERT INTO main."{name}" SELECT * FROM raw."{name}"')
                db.execute("COMMIT")
                db.execute("DETACH DATABASE raw")
                db.execute("BEGIN")
            except BaseException:
                db.close()
                self.tmp.unlink(missing_ok=True)
                raise
            finally:
                if raw_db is not None:
                    raw_db.unlink(missing_ok=True)
            self._build_indexes(db)
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            self.tmp.unlink(missing_ok=True)
            raise self._error
        os.replace(self.tmp, self.path)
        return self.path


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


def write_raw_db(run: RunData, path: Path) -> Path:
    """The raw tables alone, in a separate file, for `SqliteExport(raw_elsewhere=True).finish(path)`."""
    path.unlink(missing_ok=True)
    db = _connect(path)
    try:
        db.execute("BEGIN")
        _write_raw(db, run)
        db.execute("COMMIT")
    except BaseException:
        db.close()
        path.unlink(missing_ok=True)
        raise
    db.close()
    return path


def write_sqlite(run: RunData, tables: AnalysisTables, path: Path) -> Path:
    """Write `profiler.db` at `path` (replaced if it exists)."""
    return SqliteExport(run, tables, path).start().finish()
