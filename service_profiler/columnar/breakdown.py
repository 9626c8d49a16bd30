"""Request timings as the client sees them, and their breakdown, as DuckDB queries.

The definitions are those of docs/METRICS.md: for a request the HTTP server recorded
(`Request/httpExchange`: its `rids`, and offsets from its ts), arrival, TTFT and e2e are measured from the
HTTP arrival to the bytes written, and the milestones

  http_arrival -> body_received -> handoff (httpReq) -> first_scheduled -> engine_first_token
  -> first_token_sent -> last_byte_sent

give parts that add up to e2e_ms (the first five to ttft_ms). A milestone recorded before the one it
follows is taken at that one (its part is 0); after a missing milestone the next is taken as recorded.
`engine_ttft_ms` / `engine_e2e_ms`: from vLLM's `arrival_time` (httpReq attrs) to the API server's first /
last token, for requests timed by the API server.
"""

from __future__ import annotations

import duckdb

from service_profiler.columns import BREAKDOWN_COLUMNS, PART_COLUMNS
from service_profiler.rawdata.rawcheck import MAX_TS

_INT = "json_type(attrs, '$.{k}') IN ('BIGINT', 'UBIGINT')"
# A milestone is an epoch time in [0, 2^62), as the records' times are (raw.py): no difference of two
# overflows. An offset outside it is not a time.
_EPOCH = f"BETWEEN 0 AND {MAX_TS - 1}"
_OFFSET = (f"CASE WHEN {_INT} AND TRY_CAST(attrs->>'{{k}}' AS BIGINT) BETWEEN -{MAX_TS} AND {MAX_TS} "
           f"AND ts_ns + TRY_CAST(attrs->>'{{k}}' AS BIGINT) {_EPOCH} THEN ts_ns + TRY_CAST(attrs->>'{{k}}' AS BIGINT) "
           "END AS {k}")

# the first HTTP exchange (in time) that handed each engine request id to the engine
_EXCHANGE = f"""
    CREATE OR REPLACE TEMP TABLE http_exchange AS
    WITH x AS (
        SELECT proc, pos, ts_ns, attrs, unnest(CAST(attrs->'rids' AS JSON[])) AS r
        FROM event WHERE domain = 'Request' AND name = 'httpExchange' AND json_type(attrs, '$.rids') = 'ARRAY')
    SELECT r->>'$' AS rid, ts_ns AS http_arrival, {_OFFSET.format(k='body_received')},
           {_OFFSET.format(k='response_start')}, {_OFFSET.format(k='first_body')},
           {_OFFSET.format(k='last_body')},
           CASE WHEN {_INT.format(k='status')} THEN TRY_CAST(attrs->>'status' AS BIGINT) END AS http_status
    FROM x WHERE json_type(r) IN ('VARCHAR', 'BIGINT', 'UBIGINT')
    QUALIFY row_number() OVER (PARTITION BY r->>'$' ORDER BY ts_ns, proc, pos) = 1
"""

# the first `httpReq` of each rid: the hand-off to the engine, whether it streams, vLLM's arrival_time
_HANDOFF = f"""
    CREATE OR REPLACE TEMP TABLE http_handoff AS
    SELECT attrs->>'rid' AS rid, ts_ns AS handoff,
           CASE WHEN json_type(attrs, '$.stream') = 'BOOLEAN' THEN CAST(attrs->>'stream' AS BOOLEAN) END AS stream,
           CASE WHEN json_type(attrs, '$.arrival_time') IN ('DOUBLE', 'BIGINT', 'UBIGINT')
                     AND TRY_CAST(round(TRY_CAST(attrs->>'arrival_time' AS DOUBLE) * 1e9) AS BIGINT) BETWEEN 1 AND
                         {MAX_TS - 1}
                THEN TRY_CAST(round(TRY_CAST(attrs->>'arrival_time' AS DOUBLE) * 1e9) AS BIGINT) END AS vllm_arrival
    FROM event WHERE domain = 'Request' AND name = 'httpReq' AND attrs IS NOT NULL AND attrs <> '{{}}'
    QUALIFY row_number() OVER (PARTITION BY attrs->>'rid' ORDER BY ts_ns, proc, pos) = 1
"""

_MILESTONES = ["http_arrival", "body_received", "handoff", "first_scheduled_ns", "engine_first",
               "first_sent", "last_body"]
# when the engine produced a rid's first token: the end of the step (its updateFromOutput, else its model
# run, else its schedule span) of the first batch that completed the rid's prefill or decoded it
_ENGINE_FIRST = "coalesce(nullif(ef.update_end_ns, 0), nullif(ef.model_end_ns, 0), ef.end_ns)"


def _milestone_chain() -> tuple[str, list[str]]:
    """Nested SELECTs adding t0..t6 (each milestone, taken no earlier than the one before unless one of
    them is missing) to the relation `m`, and the part expressions (t_i - t_{i-1} in ms)."""
    query = f"SELECT *, {_MILESTONES[0]} AS t0 FROM m"
    for i, name in enumerate(_MILESTONES[1:], 1):
        prev = f"t{i - 1}"
        query = (f"SELECT *, CASE WHEN {name} IS NULL OR {prev} IS NULL THEN {name} "
                 f"ELSE greatest({name}, {prev}) END AS t{i} FROM ({query})")
    parts = [f"CASE WHEN has_http THEN (t{i} - t{i - 1}) / 1e6 END" for i in range(1, len(_MILESTONES))]
    return query, parts


def build_breakdown(con: duckdb.DuckDBPyConnection, source: str, target: str) -> None:
    """`target`: the request table `source` with client-facing arrival_ns / ttft_ms / e2e_ms where the HTTP
    server was recorded, and BREAKDOWN_COLUMNS appended (needs `rid_facts` and `batch`)."""
    con.execute(_EXCHANGE)
    con.execute(_HANDOFF)
    chain, parts = _milestone_chain()
    api = "r.timing_source = 'api'"
    replaced = {
        "arrival_ns": "CASE WHEN has_http THEN http_arrival ELSE arrival_ns END",
        "ttft_ms": "CASE WHEN has_http THEN (first_sent - http_arrival) / 1e6 ELSE ttft_ms END",
        "e2e_ms": "CASE WHEN has_http THEN (last_body - http_arrival) / 1e6 ELSE e2e_ms END",
    }
    breakdown = {
        "arrival_source": "CASE WHEN has_http THEN 'http' WHEN handoff IS NOT NULL THEN 'api' "
                          "WHEN engine_arrival_ns IS NOT NULL THEN 'engine' END",
        "stream": "stream", "http_status": "http_status", "http_arrival_ns": "http_arrival",
        "body_received_ns": "body_received", "handoff_ns": "handoff", "engine_first_token_ns": "engine_first",
        "first_token_sent_ns": "first_sent", "last_byte_sent_ns": "last_body", "vllm_arrival_ns": "vllm_arrival",
        **dict(zip(PART_COLUMNS, parts, strict=True)),
        "engine_ttft_ms": "engine_ttft_ms", "engine_e2e_ms": "engine_e2e_ms",
    }
    assert list(breakdown) == BREAKDOWN_COLUMNS
    timing = [d[0] for d in con.execute(f"SELECT * FROM {source} LIMIT 0").description or ()]
    columns = [f"{replaced.get(c, c)} AS {c}" for c in timing]
    columns += [f"{expr} AS {name}" for name, expr in breakdown.items()]
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE {target} AS
        WITH m AS (
            SELECT r.*, x.rid IS NOT NULL AS has_http, x.http_arrival, x.body_received, x.last_body, x.http_status,
                   h.handoff, h.stream, h.vllm_arrival,
                   CASE WHEN x.rid IS NOT NULL THEN {_ENGINE_FIRST} END AS engine_first,
                   CASE WHEN h.stream THEN x.first_body ELSE coalesce(nullif(x.response_start, 0), x.first_body) END
                       AS first_sent,
                   CASE WHEN {api} THEN (r.first_token_ns - h.vllm_arrival) / 1e6 END AS engine_ttft_ms,
                   CASE WHEN {api} THEN (r.completion_ns - h.vllm_arrival) / 1e6 END AS engine_e2e_ms
            FROM {source} r LEFT JOIN http_exchange x USING (rid) LEFT JOIN http_handoff h USING (rid)
            LEFT JOIN rid_facts f USING (rid) LEFT JOIN batch ef ON ef.batch_row = f.eng_first_row)
        SELECT {', '.join(columns)} FROM ({chain})""")
