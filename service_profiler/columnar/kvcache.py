"""The KV cache table as a DuckDB query.

One row per `KVCache/allocate` / `free` event and per `KVCache/kvcache` status sample, in time order.
Every row carries its process's latest status (total / used / free / usage, from the counter or, for a
process without the counter, from its batch spans' kv_* attrs) next to its own allocated / freed blocks,
so a mix of event kinds never zeroes the status.
"""

from __future__ import annotations

import duckdb

KVCACHE_COLUMNS = [
    "ts_ns", "proc", "dp_rank", "domain", "name", "rid", "total_blocks", "used_blocks", "free_blocks",
    "blocks_allocated", "blocks_freed", "usage",
]

_KVCACHE = """
    CREATE OR REPLACE TABLE kvcache AS
    WITH status AS (
        SELECT proc, ts_ns, pos, TRY_CAST(vals->>'total_blocks' AS BIGINT) AS total,
               TRY_CAST(vals->>'used_blocks' AS BIGINT) AS used, TRY_CAST(vals->>'usage' AS DOUBLE) AS usage
        FROM counter WHERE domain = 'KVCache' AND name = 'kvcache'
        UNION ALL
        SELECT proc, end_ns, batch_row, kv_total_blocks, kv_used_blocks, kv_usage FROM batch_span
        WHERE kv_total_blocks IS NOT NULL AND proc NOT IN (
            SELECT proc FROM counter WHERE domain = 'KVCache' AND name = 'kvcache')),
    item AS (
        SELECT proc, ts_ns, 0 AS ord, pos, 'kvcache' AS name, NULL AS rid, total, used,
               total - used AS free, coalesce(usage, CASE WHEN total <> 0 THEN used::DOUBLE / total END) AS usage,
               0 AS blocks
        FROM status
        UNION ALL
        SELECT proc, ts_ns, CASE name WHEN 'allocate' THEN 1 ELSE 2 END, pos, name, attrs->>'rid', NULL, NULL, NULL, NULL,
               coalesce(TRY_CAST(attrs->>'blocks' AS BIGINT), 0)
        FROM event WHERE domain = 'KVCache' AND name IN ('allocate', 'free')),
    grouped AS (  -- each row with the number of status rows of its process up to it
        SELECT *, count(*) FILTER (WHERE ord = 0)
                      OVER (PARTITION BY proc ORDER BY ts_ns, ord, pos ROWS UNBOUNDED PRECEDING) AS status_no
        FROM item),
    filled AS (
        SELECT *, first_value(total) OVER w AS s_total, first_value(used) OVER w AS s_used,
               first_value(free) OVER w AS s_free, first_value(usage) OVER w AS s_usage
        FROM grouped WINDOW w AS (PARTITION BY proc, status_no ORDER BY ts_ns, ord, pos))
    SELECT row_number() OVER (ORDER BY f.ts_ns, f.ord, f.proc, f.pos) AS row_no, f.ts_ns, f.proc, p.dp_rank, 'KVCache' AS domain, f.name, f.rid,
           CASE WHEN f.status_no > 0 THEN f.s_total END AS total_blocks,
           CASE WHEN f.status_no > 0 THEN f.s_used END AS used_blocks,
           CASE WHEN f.status_no > 0 THEN f.s_free END AS free_blocks,
           CASE WHEN f.name = 'allocate' THEN f.blocks ELSE 0 END AS blocks_allocated,
           CASE WHEN f.name = 'free' THEN f.blocks ELSE 0 END AS blocks_freed,
           CASE WHEN f.status_no > 0 THEN f.s_usage END AS usage
    FROM filled f JOIN process p USING (proc)
"""


def build_kvcache(con: duckdb.DuckDBPyConnection) -> None:
    """`kvcache` (batch.build_batches first: a process without the counter takes its status from them)."""
    con.execute(_KVCACHE)
