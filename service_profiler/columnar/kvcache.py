"""The KV cache table as a DuckDB query.

One row per `KVCache/allocate` / `free` event and per `KVCache/kvcache` status sample, in time order.
Every row carries its process's latest status (total / used / free / usage, from the counter or, for a
process without the counter, from its batch spans' kv_* attrs) next to its own allocated / freed blocks,
so a mix of event kinds never zeroes the status.
"""

from __future__ import annotations

import duckdb

from .batch import create_numbered

KVCACHE_COLUMNS = [
    "ts_ns", "proc", "dp_rank", "domain", "name", "rid", "total_blocks", "used_blocks", "free_blocks",
    "blocks_allocated", "blocks_freed", "usage",
]

_KVCACHE_ROWS = """
    WITH counted AS (SELECT DISTINCT proc FROM counter WHERE domain = 'KVCache' AND name = 'kvcache'),
    status AS (
        SELECT proc, ts_ns, pos, TRY_CAST(vals->>'total_blocks' AS BIGINT) AS total,
               TRY_CAST(vals->>'used_blocks' AS BIGINT) AS used, TRY_CAST(vals->>'usage' AS DOUBLE) AS usage
        FROM counter WHERE domain = 'KVCache' AND name = 'kvcache'
        UNION ALL
        SELECT proc, end_ns, batch_row, kv_total_blocks, kv_used_blocks, kv_usage FROM batch_span
        WHERE kv_total_blocks IS NOT NULL AND proc NOT IN (SELECT proc FROM counted)),
    full_status AS (
        SELECT proc, ts_ns, pos, total, used, total - used AS free,
               coalesce(usage, CASE WHEN total <> 0 THEN used::DOUBLE / total END) AS usage
        FROM status),
    ev AS (
        SELECT proc, ts_ns, CASE name WHEN 'allocate' THEN 1 ELSE 2 END AS ord, pos, name, attrs->>'rid' AS rid,
               coalesce(TRY_CAST(attrs->>'blocks' AS BIGINT), 0) AS blocks
        FROM event WHERE domain = 'KVCache' AND name IN ('allocate', 'free')),
    item AS (
        SELECT proc, ts_ns, 0 AS ord, pos, 'kvcache' AS name, NULL AS rid, total, used, free, usage, 0 AS blocks
        FROM full_status
        UNION ALL  -- an event carries its process's latest status at or before it (a status comes first at one time)
        SELECT ev.proc, ev.ts_ns, ev.ord, ev.pos, ev.name, ev.rid, s.total, s.used, s.free, s.usage, ev.blocks
        FROM ev ASOF LEFT JOIN full_status s ON s.proc = ev.proc AND ev.ts_ns >= s.ts_ns)
    SELECT i.*, p.dp_rank FROM item i JOIN process p USING (proc)
"""

_KVCACHE_COLUMNS_SQL = """
    r.ts_ns, r.proc, r.dp_rank, 'KVCache' AS domain, r.name, r.rid, r.total AS total_blocks, r.used AS used_blocks,
    r.free AS free_blocks, CASE WHEN r.name = 'allocate' THEN r.blocks ELSE 0 END AS blocks_allocated,
    CASE WHEN r.name = 'free' THEN r.blocks ELSE 0 END AS blocks_freed, r.usage
"""


def build_kvcache(con: duckdb.DuckDBPyConnection) -> None:
    """`kvcache` (batch.build_batches first: a process without the counter takes its status from them)."""
    create_numbered(con, "kvcache", _KVCACHE_ROWS, "ts_ns, ord, proc, pos", _KVCACHE_COLUMNS_SQL)
