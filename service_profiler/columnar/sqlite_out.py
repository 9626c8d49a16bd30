"""`profiler.db`: the run and its analysis tables in one SQLite file (the stdlib's sqlite3, fed from DuckDB
a batch of rows at a time), with the same tables, indexes and views as before.

Raw tables (timestamps epoch ns, `attrs`/`values` as JSON text): process, process_meta, span, event,
counter, run_state, problem; a batchFrameworkProcessing span's `reqs` is not repeated in its attrs: it is
the batch_req table. Analysis tables: request (+ req_row), batch (+ batch_row), batch_req (one row per
request in each batch, as per_iteration_requests.csv, clustered by (batch_row, pos)), kvcache,
state_transition, lifecycle_event. The file replaces the target only when complete.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import threading
from pathlib import Path

from service_profiler.outputs import scratch_dir
from service_profiler.rawdata.losses import OPEN_END

from .batch import BATCH_COLUMNS
from .breakdown import BREAKDOWN_COLUMNS
from .completeness import COMPLETE_COLUMNS
from .kvcache import KVCACHE_COLUMNS
from .lifecycle import EVENT_COLUMNS, STATE_COLUMNS
from .requests import REQUEST_COLUMNS
from .run import AnalysisRun

ROWS_PER_FETCH = 16_384

VIEWS = {
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
INDEXES = [
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

# DuckDB type -> SQLite column type
_SQLITE_TYPES = {"BIGINT": "INTEGER", "INTEGER": "INTEGER", "HUGEINT": "INTEGER", "DOUBLE": "REAL",
                 "BOOLEAN": "INTEGER", "VARCHAR": "TEXT", "JSON": "TEXT"}
_LIST = "'[' || array_to_string({}, ',') || ']'"  # a list of numbers as JSON text

# table -> (its CREATE TABLE, the DuckDB query giving its columns in that order). A raw table's `id` is
# given as NULL: SQLite numbers the rows 1, 2, ... in the order they are inserted, which is the query's
# ORDER BY (an INSERT keeps it). Numbering them in DuckDB (`row_number()`) sorted the rows once more.
RAW_TABLES = {
    "span": ("CREATE TABLE span (id INTEGER PRIMARY KEY, proc INTEGER, domain TEXT, name TEXT, start_ns INTEGER, "
             "end_ns INTEGER, dur_ns INTEGER, tid INTEGER, batch_id INTEGER, attrs TEXT)",
             "SELECT NULL, proc, domain, name, start_ns, end_ns, "
             "end_ns - start_ns, tid, TRY_CAST(batch_id AS BIGINT), "
             "CASE WHEN name = 'batchFrameworkProcessing' AND json_exists(attrs, '$.reqs') "
             "THEN CAST(json_merge_patch(attrs, '{\"reqs\": null}') AS VARCHAR) ELSE CAST(attrs AS VARCHAR) END "
             "FROM span ORDER BY start_ns, proc, pos"),
    "event": ("CREATE TABLE event (id INTEGER PRIMARY KEY, proc INTEGER, domain TEXT, name TEXT, ts_ns INTEGER, "
              "tid INTEGER, rid TEXT, batch_id INTEGER, attrs TEXT)",
              "SELECT NULL, proc, domain, name, ts_ns, tid, attrs->>'rid', "
              "TRY_CAST(attrs->>'batch_id' AS BIGINT), CAST(attrs AS VARCHAR) FROM event ORDER BY ts_ns, proc, pos"),
    "counter": ('CREATE TABLE counter (id INTEGER PRIMARY KEY, proc INTEGER, domain TEXT, name TEXT, ts_ns INTEGER, '
                '"values" TEXT)',
                "SELECT NULL, proc, domain, name, ts_ns, "
                "CAST(vals AS VARCHAR) FROM counter ORDER BY ts_ns, proc, pos"),
    "batch_req": ("CREATE TABLE batch_req (batch_row INTEGER, pos INTEGER, req_row INTEGER, rid TEXT, phase INTEGER, "
                  "scheduled_tokens INTEGER, computed_tokens_before INTEGER, prompt_tokens INTEGER, resumed INTEGER, "
                  "state TEXT, iteration INTEGER, generated_tokens_before INTEGER, time_in_state_ms REAL, "
                  "PRIMARY KEY (batch_row, pos)) WITHOUT ROWID",
                  "SELECT i.batch_row, i.pos - 1, r.row_no - 1, i.rid, i.phase_code, i.scheduled_tokens, "
                  "i.computed_tokens_before, i.prompt_tokens, i.resumed, i.state, i.iteration, "
                  "i.generated_tokens_before, i.time_in_state_ms FROM iteration i "
                  "LEFT JOIN request r ON r.rid = i.rid WHERE i.kind = 0 ORDER BY i.batch_row, i.pos"),
}
# analysis tables: (DuckDB table, leading row-number column or None, its order, list columns)
ANALYSIS_TABLES = {
    "request": ("request", "req_row", "row_no", [*REQUEST_COLUMNS, *BREAKDOWN_COLUMNS, *COMPLETE_COLUMNS], ()),
    "batch": ("batch", "batch_row", "batch_row", [*BATCH_COLUMNS, *COMPLETE_COLUMNS],
              ("prefill_chunk_sizes", "decode_chunk_sizes")),
    "kvcache": ("kvcache", None, "row_no", KVCACHE_COLUMNS, ()),
    "state_transition": ("state_transition", None, "row_no", STATE_COLUMNS, ()),
    "lifecycle_event": ("lifecycle_event", None, "row_no", EVENT_COLUMNS, ()),
}


def _copy(run: AnalysisRun, db: sqlite3.Connection, table: str, query: str) -> None:
    cursor = run.con.execute(query)
    width = len(cursor.description or ())
    insert = f"INSERT INTO {table} VALUES ({', '.join('?' * width)})"
    while rows := cursor.fetchmany(ROWS_PER_FETCH):
        db.executemany(insert, rows)


def _analysis_table(run: AnalysisRun, name: str) -> tuple[str, str]:
    """The analysis table `name`: its CREATE TABLE and the DuckDB query giving its rows."""
    source, first, order, columns, lists = ANALYSIS_TABLES[name]
    types = dict(run.con.execute(f"SELECT column_name, data_type FROM information_schema.columns "
                                 f"WHERE table_name = '{source}'").fetchall())
    # a column without any value has no type (as the current analysis writes it)
    counts = run.con.execute(f"SELECT {', '.join(f'count({c})' for c in columns)} FROM {source}").fetchone() or ()
    types.update({c: "" for c, n in zip(columns, counts, strict=True) if not n})
    defs = [f'"{c}" {"TEXT" if c in lists else _SQLITE_TYPES.get(str(types[c]), "")}'.strip() for c in columns]
    select = [_LIST.format(c) if c in lists else f'"{c}"' for c in columns]
    if first:
        defs.insert(0, f"{first} INTEGER PRIMARY KEY")
        select.insert(0, f"{order} - {1 if order == 'row_no' else 0}")
    return f"CREATE TABLE {name} ({', '.join(defs)})", f"SELECT {', '.join(select)} FROM {source} ORDER BY {order}"


def _process_tables(run: AnalysisRun, db: sqlite3.Connection) -> None:
    def dumps(value: object) -> str:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)

    db.execute("CREATE TABLE process (proc INTEGER PRIMARY KEY, key TEXT, hostname TEXT, pid INTEGER, "
               "ppid INTEGER, role TEXT, argv TEXT, engine TEXT, profiler_version TEXT, wall_offset_ns INTEGER, "
               "dropped INTEGER, warnings TEXT, patch TEXT, path TEXT)")
    db.executemany("INSERT INTO process VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", [
        (p.index, p.key, p.hostname, p.pid, p.ppid, p.role, dumps(p.argv), dumps(p.engine), p.profiler_version,
         p.wall_offset_ns, p.dropped, dumps(list(p.warnings.values())), dumps(p.patch), p.path) for p in run.processes])
    # what each file says about its completeness (losses.py): closed / not closed / unknown, and the
    # time ranges whose records are missing or uncertain (end_ns NULL: to the end of the run)
    db.execute("CREATE TABLE process_completeness (proc INTEGER PRIMARY KEY, status TEXT, close_reason TEXT, "
               "flushed_until_ns INTEGER)")
    db.executemany("INSERT INTO process_completeness VALUES (?,?,?,?)", [
        (p.index, p.loss.status, p.loss.close_reason, p.loss.flushed_until_ns) for p in run.processes])
    db.execute("CREATE TABLE process_gap (proc INTEGER, start_ns INTEGER, end_ns INTEGER, reason TEXT, "
               "count INTEGER)")
    db.executemany("INSERT INTO process_gap VALUES (?,?,?,?,?)", [
        (p.index, g.start_ns, None if g.end_ns == OPEN_END else g.end_ns, g.reason, g.count)
        for p in run.processes for g in p.loss.all_gaps()])
    db.execute("CREATE TABLE process_meta (proc INTEGER, key TEXT, value TEXT)")
    db.executemany("INSERT INTO process_meta VALUES (?,?,?)",
                   [(p.index, k, dumps(v)) for p in run.processes for k, v in p.meta.items()])
    db.execute("CREATE TABLE run_state (proc INTEGER, ts_ns INTEGER, enabled INTEGER, reason TEXT)")
    db.executemany("INSERT INTO run_state VALUES (?,?,?,?)", run.states)
    db.execute("CREATE TABLE problem (message TEXT)")
    db.executemany("INSERT INTO problem VALUES (?)", [(p,) for p in run.problems])


def _load_sqlite_extension(run: AnalysisRun) -> bool:
    """Load DuckDB's SQLite extension from its PyPI package (`duckdb-extension-sqlite-scanner`, installed
    with this tool; DuckDB would otherwise download it). False where that package is missing, was built
    for another DuckDB version, or its file could be written by another user (`_trusted_file`):
    profiler.db is then written through Python's sqlite3, a few times slower (every row becomes Python
    objects on the way)."""
    try:
        import duckdb_extension_sqlite_scanner as package
    except ImportError:
        return False
    row = run.con.execute("PRAGMA version").fetchone()
    version = str(row[0]) if row else ""
    found = Path(package.__file__).parent / "extensions" / version / "sqlite_scanner.duckdb_extension"
    if not _trusted_file(found):
        return False
    try:
        run.con.execute("LOAD '" + str(found).replace("'", "''") + "'")
    except Exception:  # a damaged or unsigned file: the slower path still writes the same tables
        return False
    return True


def _trusted_file(path: Path) -> bool:
    """A regular file (not a link) that only its owner, this user or root, can write: DuckDB loads the
    extension without checking its signature (run.connect), so it must be as safe to load as this
    package's own modules."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid in (0, os.getuid()) and not st.st_mode & 0o022


def _fill_through_duckdb(run: AnalysisRun, path: Path, tables: list[tuple[str, str]]) -> None:
    """Each `(table, query)`: DuckDB inserts the query's rows into the SQLite file itself (its SQLite
    extension binds them in C), in the query's order."""
    alias = f"profiler_db_{os.getpid()}_{threading.get_ident()}"
    run.con.execute(f"ATTACH '{str(path).replace(chr(39), chr(39) * 2)}' AS {alias} (TYPE sqlite, READ_ONLY false)")
    try:
        for table, query in tables:
            run.con.execute(f"INSERT INTO {alias}.{table} {query}")
    finally:
        run.con.execute(f"DETACH {alias}")


def write_db(run: AnalysisRun, path: Path, through_duckdb: bool | None = None) -> Path:
    """profiler.db at `path`, replacing it only once complete. `through_duckdb`: rows written by DuckDB's
    SQLite extension (default: when it loads) or by Python's sqlite3."""
    if through_duckdb is not False:
        loaded = _load_sqlite_extension(run)
        if through_duckdb and not loaded:
            raise RuntimeError("DuckDB's SQLite extension (duckdb-extension-sqlite-scanner) did not load")
        through_duckdb = loaded
    with scratch_dir(path.parent, path.name) as scratch:
        return _write_db(run, path, scratch / path.name, through_duckdb)


def _write_db(run: AnalysisRun, path: Path, partial: Path, through_duckdb: bool) -> Path:
    tables = [(name, query) for name, (_, query) in RAW_TABLES.items()]
    creates = [create for create, _ in RAW_TABLES.values()]
    for name in ANALYSIS_TABLES:
        create, query = _analysis_table(run, name)
        tables.append((name, query))
        creates.append(create)
    db = sqlite3.connect(partial)
    try:
        # 16 KB pages, not 4 KB (set before the first table; kept in the file, any reader reads it): SQLite's
        # inserts and index builds touch a quarter of the pages. Writing profiler.db of a 1 M-record run took
        # 15 % less wall and CPU time, three runs alternated (benchmarks/README.md); 64 KB pages were no faster
        db.execute("PRAGMA page_size = 16384")
        db.execute("PRAGMA journal_mode = OFF")
        db.execute("PRAGMA synchronous = OFF")
        with db:
            _process_tables(run, db)
            for create in creates:
                db.execute(create)
            if not through_duckdb:
                for name, query in tables:
                    _copy(run, db, name, query)
        if through_duckdb:
            db.close()
            _fill_through_duckdb(run, partial, tables)
            db = sqlite3.connect(partial)
        # SQLite sorts each index's keys with helper threads where allowed (its sorter's worker threads,
        # off by default): the index builds are the largest single-threaded part of writing the file
        db.execute(f"PRAGMA threads = {min(os.cpu_count() or 1, 8)}")
        with db:
            for index in INDEXES:
                db.execute(index)
            for view, query in VIEWS.items():
                db.execute(f"CREATE VIEW {view} AS {query}")
        db.close()
        os.replace(partial, path)
    except BaseException:
        db.close()
        raise
    return path


class SqliteExporter:
    name = "db"

    def export(self, run: AnalysisRun, out_dir: Path) -> list[Path]:
        return [write_db(run, out_dir / "profiler.db")]
