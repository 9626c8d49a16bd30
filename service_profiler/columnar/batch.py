"""The batch table and the per-request entries of every batch, as DuckDB queries.

Metric definitions are those of the analysis tables (docs/DESIGN.md "Analysis tables"):
one row per `BatchSchedule/batchFrameworkProcessing` span; `model_run_ms`, `step_ms`, `update_ms` from the
`modelExec`, `step`, `updateFromOutput` span with the same batch_id, looked up in the same process first,
then by (hostname, dp_rank) (an executor worker may record it); the longest span wins a shared key.
`blocks_allocated` / `blocks_freed`: KVCache allocate / free blocks of the same process in
[this batch's start, the next batch's start) (an as-of join).

Tables made: `batch_span` (the spans with their attrs, `batch_row` = position in time order),
`batch_entry` (one row per entry of a batch's `reqs`), `batch_finished` (the rids each batch reported
finished), `batch` (the table itself, columns as tables.BATCH_COLUMNS).

An entry without a request id, an integer phase or an integer count of scheduled tokens (docs/DESIGN.md
"Vocabulary") is malformed: it is left out of every table and counted per process in `bad_entry`, which
`malformed_entry_problems` reports (the API server's `tokens` entries are counted there too, requests.py).
"""

from __future__ import annotations

import duckdb

from .completeness import mark_batches
from .raw import SPAN_RECORD, Process

_BAD_BATCH_ENTRY = "rid IS NULL OR phase IS NULL OR scheduled IS NULL"

BATCH_COLUMNS = [
    "batch_id", "dp_rank", "proc", "start_ns", "end_ns", "schedule_ms", "model_run_ms", "step_ms",
    "batch_size", "num_prefill_reqs", "num_decode_reqs", "prefill_tokens", "decode_tokens",
    "total_scheduled_tokens", "prefill_chunk_sizes", "decode_chunk_sizes", "avg_prefill_chunk",
    "min_prefill_chunk", "max_prefill_chunk", "avg_decode_chunk", "running", "waiting", "kv_total_blocks",
    "kv_used_blocks", "kv_free_blocks", "kv_usage", "num_preempted", "num_finished", "batch_type",
    "model_start_ns", "model_end_ns", "update_ms", "update_end_ns", "blocks_allocated", "blocks_freed",
    "num_resumed",
]

_ATTRS = ('{"dp_rank": "VARCHAR", "reqs": [["VARCHAR"]], "total_tokens": "VARCHAR", "running": "VARCHAR", '
          '"waiting": "VARCHAR", "kv_total_blocks": "VARCHAR", "kv_used_blocks": "VARCHAR", "kv_usage": "VARCHAR", '
          '"preempted": ["VARCHAR"], "finished": "JSON"}')
_BATCH_SPAN_RECORD = f"{SPAN_RECORD} AND domain = 'BatchSchedule' AND name = 'batchFrameworkProcessing'"
# dp_rank of a record: its attrs, else its process's meta, else 0
_DP = "coalesce(TRY_CAST(s.attrs->>'dp_rank' AS INTEGER), p.dp_rank, 0)"


def _matched(con: duckdb.DuckDBPyConnection, table: str, domain: str, name: str) -> None:
    """`table`: per batch_row, the span of (domain, name) with the batch's batch_id (same process first,
    then same host and dp_rank; the longest span of a key)."""
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE {table} AS
        WITH cand AS (
            SELECT s.proc, p.hostname, {_DP} AS dp, s.batch_id AS bid, s.start_ns, s.end_ns
            FROM span s JOIN process p USING (proc)
            WHERE s.domain = '{domain}' AND s.name = '{name}' AND s.batch_id IS NOT NULL),
        by_proc AS (SELECT proc, bid, arg_max(start_ns, end_ns - start_ns) AS start_ns,
                           max(end_ns - start_ns) AS dur FROM cand GROUP BY proc, bid),
        by_dp AS (SELECT hostname, dp, bid, arg_max(start_ns, end_ns - start_ns) AS start_ns,
                         max(end_ns - start_ns) AS dur FROM cand GROUP BY hostname, dp, bid)
        SELECT b.batch_row, CASE WHEN x.proc IS NULL THEN y.start_ns ELSE x.start_ns END AS start_ns,
               CASE WHEN x.proc IS NULL THEN y.start_ns + y.dur ELSE x.start_ns + x.dur END AS end_ns
        FROM batch_span b
        LEFT JOIN by_proc x ON x.proc = b.proc AND x.bid = b.bid
        LEFT JOIN by_dp y ON y.hostname = b.hostname AND y.dp = b.dp_rank AND y.bid = b.bid
        WHERE b.bid IS NOT NULL""")


def build_batches(con: duckdb.DuckDBPyConnection) -> None:
    # `batch_row`, the spans' order in time, comes from a sort of their keys alone, joined back by row id: a
    # sort of the whole spans carried their attributes (a step's entry lists, most of their bytes) through
    # it, and on a large run spilled them. The attributes are parsed once into typed columns (a value of
    # another type becomes NULL).
    con.execute(f"""
        CREATE OR REPLACE TABLE batch_span AS
        WITH o AS (SELECT rowid AS rec, row_number() OVER (ORDER BY ts_ns, proc, pos) - 1 AS batch_row
                   FROM record WHERE {_BATCH_SPAN_RECORD}),
        s AS (SELECT o.batch_row, r.proc, r.ts_ns AS start_ns, r.end_ns, r.batch_id, r.attrs,
                     json_transform(r.attrs, '{_ATTRS}') AS a
              FROM record r JOIN o ON o.rec = r.rowid WHERE {_BATCH_SPAN_RECORD})
        SELECT s.batch_row, s.proc, p.hostname, coalesce(TRY_CAST(a.dp_rank AS INTEGER), p.dp_rank, 0) AS dp_rank,
               s.start_ns, s.end_ns, s.batch_id AS bid, a.reqs,
               TRY_CAST(a.total_tokens AS BIGINT) AS total_tokens, TRY_CAST(a.running AS BIGINT) AS running,
               TRY_CAST(a.waiting AS BIGINT) AS waiting, TRY_CAST(a.kv_total_blocks AS BIGINT) AS kv_total_blocks,
               TRY_CAST(a.kv_used_blocks AS BIGINT) AS kv_used_blocks, TRY_CAST(a.kv_usage AS DOUBLE) AS kv_usage,
               len(a.preempted) AS num_preempted, a.preempted, a.finished,
               CAST(s.attrs->'reqs' AS VARCHAR) AS res_list
        FROM s JOIN process p USING (proc)""")
    con.execute("""
        CREATE OR REPLACE TABLE batch_entry AS
        WITH e AS (
            SELECT batch_row, unnest(reqs) AS x, unnest(generate_series(1, len(reqs))) AS pos
            FROM batch_span WHERE reqs IS NOT NULL)
        SELECT batch_row, pos::INTEGER AS pos, x[1] AS rid, TRY_CAST(x[2] AS INTEGER) AS phase,
               TRY_CAST(x[3] AS BIGINT) AS scheduled, TRY_CAST(x[4] AS BIGINT) AS computed,
               TRY_CAST(x[5] AS BIGINT) AS prompt, coalesce(TRY_CAST(x[6] AS INTEGER), 0) AS resumed
        FROM e""")
    # the entries' lists are in batch_entry now; kept in batch_span too, they would count against the
    # memory limit until the end (on a large run, pushing the tables still needed out to disk)
    con.execute("ALTER TABLE batch_span DROP COLUMN reqs")
    con.execute(f"""CREATE OR REPLACE TEMP TABLE bad_entry AS SELECT b.proc, count(*) AS n
                    FROM batch_entry e JOIN batch_span b USING (batch_row) WHERE {_BAD_BATCH_ENTRY} GROUP BY b.proc""")
    if con.execute("SELECT count(*) FROM bad_entry").fetchone() != (0,):
        con.execute(f"DELETE FROM batch_entry WHERE {_BAD_BATCH_ENTRY}")
    _matched(con, "m_model", "ModelExecute", "modelExec")
    _matched(con, "m_step", "EngineCore", "step")
    _matched(con, "m_update", "BatchSchedule", "updateFromOutput")
    # the rids a batch finished: its updateFromOutput's `finished` ([[rid, reason]]), else its own `finished`
    con.execute("""
        CREATE OR REPLACE TEMP TABLE upd_finished AS
        WITH cand AS (
            SELECT s.proc, s.batch_id AS bid, s.end_ns - s.start_ns AS dur, s.attrs->'finished' AS fin
            FROM span s WHERE s.domain = 'BatchSchedule' AND s.name = 'updateFromOutput'
                          AND s.batch_id IS NOT NULL)
        SELECT proc, bid, arg_max(fin, dur) AS fin FROM cand GROUP BY proc, bid""")
    con.execute("""
        CREATE OR REPLACE TABLE batch_finished AS
        WITH src AS (
            SELECT b.batch_row, coalesce(u.fin, b.finished) AS fin
            FROM batch_span b LEFT JOIN upd_finished u ON u.proc = b.proc AND u.bid = b.bid),
        item AS (SELECT batch_row, unnest(CAST(fin AS JSON[])) AS x,
                        unnest(generate_series(1, json_array_length(fin)::BIGINT)) AS pos
                 FROM src WHERE json_type(fin) = 'ARRAY')
        SELECT batch_row, pos::INTEGER AS pos,
               CASE WHEN json_type(x) = 'ARRAY' THEN x->>0 ELSE x->>'$' END AS rid,
               CASE WHEN json_type(x) = 'ARRAY' THEN x->>1 END AS reason
        FROM item""")
    con.execute("""
        CREATE OR REPLACE TEMP TABLE batch_kv AS
        WITH ev AS (
            SELECT proc, ts_ns, name, TRY_CAST(attrs->>'blocks' AS BIGINT) AS blocks FROM event
            WHERE domain = 'KVCache' AND name IN ('allocate', 'free')
              AND json_type(attrs, '$.blocks') IN ('UBIGINT', 'BIGINT'))
        SELECT b.batch_row, sum(blocks) FILTER (WHERE ev.name = 'allocate') AS alloc,
               sum(blocks) FILTER (WHERE ev.name = 'free') AS freed
        FROM ev ASOF JOIN batch_span b ON b.proc = ev.proc AND ev.ts_ns >= b.start_ns
        GROUP BY b.batch_row""")
    _batch_reqs(con)
    con.execute("""
        CREATE OR REPLACE TEMP TABLE batch_timing AS
        WITH f AS (SELECT batch_row, count(*) AS n FROM batch_finished GROUP BY batch_row)
        SELECT b.batch_row,
               TRY_CAST(b.bid AS BIGINT) AS batch_id, b.dp_rank, b.proc, b.start_ns, b.end_ns,
               (b.end_ns - b.start_ns) / 1e6 AS schedule_ms,
               (m.end_ns - m.start_ns) / 1e6 AS model_run_ms, (st.end_ns - st.start_ns) / 1e6 AS step_ms,
               coalesce(r.n, 0) AS batch_size, coalesce(r.n_pf, 0) AS num_prefill_reqs,
               coalesce(r.n_dc, 0) AS num_decode_reqs, coalesce(r.pf_tok, 0) AS prefill_tokens,
               coalesce(r.dc_tok, 0) AS decode_tokens,
               coalesce(b.total_tokens, coalesce(r.pf_tok, 0) + coalesce(r.dc_tok, 0))
                   AS total_scheduled_tokens,
               coalesce(r.pf_sizes, []) AS prefill_chunk_sizes, coalesce(r.dc_sizes, []) AS decode_chunk_sizes,
               CASE WHEN r.n_pf > 0 THEN r.pf_tok / r.n_pf END AS avg_prefill_chunk,
               r.pf_min AS min_prefill_chunk, r.pf_max AS max_prefill_chunk,
               CASE WHEN r.n_dc > 0 THEN r.dc_tok / r.n_dc END AS avg_decode_chunk,
               b.running, b.waiting, b.kv_total_blocks, b.kv_used_blocks,
               b.kv_total_blocks - b.kv_used_blocks AS kv_free_blocks, b.kv_usage,
               coalesce(b.num_preempted, 0) AS num_preempted,
               coalesce(f.n, 0) AS num_finished,
               CASE WHEN r.n_pf > 0 AND r.n_dc > 0 THEN 'Prefill,Decode' WHEN r.n_pf > 0 THEN 'Prefill'
                    WHEN r.n_dc > 0 THEN 'Decode' ELSE '' END AS batch_type,
               m.start_ns AS model_start_ns, m.end_ns AS model_end_ns,
               (u.end_ns - u.start_ns) / 1e6 AS update_ms, u.end_ns AS update_end_ns,
               coalesce(kv.alloc, 0) AS blocks_allocated, coalesce(kv.freed, 0) AS blocks_freed,
               coalesce(r.resumed, 0) AS num_resumed
        FROM batch_span b
        LEFT JOIN batch_reqs r USING (batch_row) LEFT JOIN f USING (batch_row)
        LEFT JOIN m_model m USING (batch_row) LEFT JOIN m_step st USING (batch_row)
        LEFT JOIN m_update u USING (batch_row) LEFT JOIN batch_kv kv USING (batch_row)""")
    mark_batches(con, "batch_timing", "batch")
    drop_tables(con, "batch_timing", "m_model", "m_step", "m_update", "upd_finished", "batch_kv", "batch_reqs")


def create_numbered(con: duckdb.DuckDBPyConnection, table: str, rows: str, order_by: str, columns: str) -> None:
    """CREATE TABLE `table` AS `row_no` (1, 2, ... in `order_by` order over the rows of the query `rows`), then
    `columns` (expressions over `r`, those rows). As `batch_row` in build_batches, the numbers come from a
    sort of the keys alone, joined back by row id: a window over the whole rows held every row's columns in
    memory at once, and a 29 M-record run's KV cache table did not fit in the 1 GB limit that way."""
    con.execute(f"CREATE OR REPLACE TEMP TABLE numbered_rows AS {rows}")
    con.execute(f"""
        CREATE OR REPLACE TABLE {table} AS
        WITH o AS (SELECT rowid AS row_id, row_number() OVER (ORDER BY {order_by}) AS row_no FROM numbered_rows)
        SELECT o.row_no, {columns} FROM numbered_rows r JOIN o ON o.row_id = r.rowid""")
    drop_tables(con, "numbered_rows")


def drop_tables(con: duckdb.DuckDBPyConnection, *tables: str) -> None:
    """A builder's intermediate tables, dropped once it is done: left in place they count against the memory
    limit until the end of the analysis, and on a large run push the tables still needed out to disk."""
    for table in tables:
        con.execute(f"DROP TABLE IF EXISTS {table}")


# entries aggregated per statement: the ordered lists hold every group's entries until the end of the
# statement, which at tens of millions of entries did not fit in 1 GB
_ENTRIES_PER_STATEMENT = 4_000_000


def _batch_reqs(con: duckdb.DuckDBPyConnection) -> None:
    """Per batch: its entries counted and summed by phase, and the chunk sizes in order, by ranges of
    batch rows of about _ENTRIES_PER_STATEMENT entries each."""
    entries, batches = con.execute("SELECT (SELECT count(*) FROM batch_entry), (SELECT count(*) FROM batch_span)"
                                   ).fetchone() or (0, 0)
    step = max(1, batches * _ENTRIES_PER_STATEMENT // max(entries, 1))
    for low in range(0, max(batches, 1), step):
        con.execute(f"""
            {"CREATE OR REPLACE TEMP TABLE batch_reqs AS" if low == 0 else "INSERT INTO batch_reqs"}
            SELECT batch_row, count(*) AS n,
                   count(*) FILTER (WHERE phase = 0) AS n_pf, count(*) FILTER (WHERE phase <> 0) AS n_dc,
                   coalesce(sum(scheduled) FILTER (WHERE phase = 0), 0) AS pf_tok,
                   coalesce(sum(scheduled) FILTER (WHERE phase <> 0), 0) AS dc_tok,
                   list(scheduled ORDER BY pos) FILTER (WHERE phase = 0) AS pf_sizes,
                   list(scheduled ORDER BY pos) FILTER (WHERE phase <> 0) AS dc_sizes,
                   min(scheduled) FILTER (WHERE phase = 0) AS pf_min, max(scheduled) FILTER (WHERE phase = 0) AS pf_max,
                   sum(resumed) AS resumed
            FROM batch_entry WHERE batch_row >= {low} AND batch_row < {low + step} GROUP BY batch_row""")


def malformed_entry_problems(con: duckdb.DuckDBPyConnection, processes: list[Process]) -> list[str]:
    """One problem per file whose batch or tokens records held malformed per-request entries."""
    counts = dict(con.execute("SELECT proc, sum(n)::BIGINT FROM bad_entry GROUP BY proc").fetchall())
    return [f"{p.path}: {counts[p.index]} malformed per-request entries (`reqs` of batch or tokens records; see "
            "docs/DESIGN.md for their shape); dropped" for p in processes if counts.get(p.index)]
