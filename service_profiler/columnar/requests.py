"""The request table (one row per engine request id) as DuckDB queries.

Metric definitions are those of the analysis tables (docs/DESIGN.md "Analysis tables"): API-server
timing (`httpReq`, `tokens`, `httpRes`) where the run has it, else engine timing from the batches
(the end of the updateFromOutput, else modelExec, else schedule span of the step that produced the
first token / finished the request). "First" of several records means earliest in time.

Tables made: `token_entry` (one row per entry of the API `tokens` events), `request` (columns as
REQUEST_COLUMNS, and `row_no`: the position in arrival order).
"""

from __future__ import annotations

import duckdb

from .batch import drop_tables
from .breakdown import build_breakdown
from .completeness import mark_requests
from .literals import insert_rows

REQUEST_COLUMNS = [
    "rid", "api_rid", "arrival_ns", "engine_arrival_ns", "first_scheduled_ns", "first_token_ns",
    "completion_ns", "queue_ms", "prefill_ms", "decode_ms", "ttft_ms", "tpot_ms", "e2e_ms", "input_tokens",
    "output_tokens", "preemptions", "prefix_hit_tokens", "kv_blocks", "finish_reason",
    "cache_hit_rate", "num_iterations", "first_batch_id", "dp_rank", "proc", "timing_source",
]

_REQUEST_EVENTS = """
    CREATE OR REPLACE TEMP TABLE req_event AS
    SELECT e.proc, e.name, e.ts_ns, a.*
    FROM (SELECT proc, name, ts_ns,
                 json_transform(attrs, '{"rid": "VARCHAR", "api_rid": "VARCHAR", "prompt_tokens": "VARCHAR",
                                         "output_tokens": "VARCHAR", "finish_reason": "VARCHAR",
                                         "from": "VARCHAR", "to": "VARCHAR", "blocks": "VARCHAR",
                                         "hit_tokens": "VARCHAR", "query_tokens": "VARCHAR"}') AS a
          FROM event
          WHERE (domain = 'Request' AND name IN ('httpReq', 'enqueue', 'httpRes', 'state'))
             OR (domain = 'KVCache' AND name IN ('allocate', 'free', 'cacheHit'))) AS e
    WHERE a.rid IS NOT NULL
"""

_TOKEN_ENTRIES = """
    CREATE OR REPLACE TABLE token_entry AS
    WITH t AS (
        SELECT proc, ts_ns, json_transform(attrs, '{"reqs": [["VARCHAR"]]}').reqs AS reqs FROM event
        WHERE domain = 'Request' AND name = 'tokens'),
    e AS (SELECT proc, ts_ns, unnest(reqs) AS x FROM t WHERE reqs IS NOT NULL)
    SELECT proc, ts_ns, x[1] AS rid, TRY_CAST(x[2] AS BIGINT) AS new_tokens,
           coalesce(TRY_CAST(x[3] AS BIGINT), 0) AS finished, x[4] AS reason
    FROM e
"""
# a tokens entry without a request id or an integer count of new tokens: malformed (batch.py, `bad_entry`)
_BAD_TOKEN_ENTRY = "rid IS NULL OR new_tokens IS NULL"

# an engine step that produced a token for its request: a decode, or the prefill step that completed the prompt
_PRODUCED = "e.phase <> 0 OR e.computed + e.scheduled >= e.prompt"

_PER_RID = f"""
    CREATE OR REPLACE TEMP TABLE rid_facts AS
    WITH http AS (SELECT rid, min(ts_ns) AS ts, arg_min_null(api_rid, ts_ns) AS api_rid,
                         arg_min_null(TRY_CAST(prompt_tokens AS BIGINT), ts_ns) AS prompt
                  FROM req_event WHERE name = 'httpReq' GROUP BY rid),
    enq AS (SELECT rid, min(ts_ns) AS ts, arg_min_null(TRY_CAST(prompt_tokens AS BIGINT), ts_ns) AS prompt,
                   arg_min_null(proc, ts_ns) AS proc
            FROM req_event WHERE name = 'enqueue' GROUP BY rid),
    res AS (SELECT rid, min(ts_ns) AS ts, arg_min_null(TRY_CAST(output_tokens AS BIGINT), ts_ns) AS out_tokens,
                   arg_min_null(finish_reason, ts_ns) AS reason
            FROM req_event WHERE name = 'httpRes' GROUP BY rid),
    st AS (SELECT rid, count(*) FILTER (WHERE "to" = 'PREEMPTED') AS preempted,
                  min(ts_ns) FILTER (WHERE starts_with("to", 'FINISHED')) AS fin_ts,
                  arg_min_null("to", ts_ns) FILTER (WHERE starts_with("to", 'FINISHED')) AS fin_state
           FROM req_event WHERE name = 'state' GROUP BY rid),
    hit AS (SELECT rid, arg_min_null(TRY_CAST(hit_tokens AS DOUBLE), ts_ns) AS hit,
                   arg_min_null(TRY_CAST(query_tokens AS DOUBLE), ts_ns) AS query
            FROM req_event WHERE name = 'cacheHit' GROUP BY rid),
    kv AS (  -- peak blocks held: allocate adds, free releases, in time order (frees first at one instant)
        SELECT rid, max(held) AS peak FROM (
            SELECT rid, name, sum(CASE name WHEN 'allocate' THEN b ELSE -b END)
                       OVER (PARTITION BY rid ORDER BY ts_ns, name DESC ROWS UNBOUNDED PRECEDING) AS held
            -- a count of blocks that is not an integer in [0, 2^31) is no count: left out, as one that is
            -- not a number (no sum of them overflows)
            FROM (SELECT rid, name, ts_ns, TRY_CAST(blocks AS BIGINT) AS b FROM req_event
                  WHERE name IN ('allocate', 'free') AND TRY_CAST(blocks AS BIGINT) BETWEEN 0 AND 2147483647))
        WHERE name = 'allocate' GROUP BY rid HAVING max(held) > 0),
    ent AS (  -- eng_*: the steps that produced a token (for requests without API data); NULL without one
        SELECT e.rid, min(e.batch_row) AS first_row, arg_min_null(e.prompt, e.batch_row) AS prompt,
               count(*) AS iterations, min(e.batch_row) FILTER (WHERE {_PRODUCED}) AS eng_first_row,
               nullif(count(*) FILTER (WHERE {_PRODUCED}), 0) AS eng_tokens
        FROM batch_entry e GROUP BY e.rid),
    bpre AS (SELECT rid, count(*) AS n FROM (SELECT unnest(preempted) AS rid FROM batch_span) GROUP BY rid),
    done AS (SELECT rid, min(batch_row) AS row, arg_min_null(reason, batch_row) AS reason
             FROM batch_finished GROUP BY rid),
    tok AS (SELECT rid, min(ts_ns) FILTER (WHERE new_tokens <> 0) AS first_ts,
                   min(ts_ns) FILTER (WHERE finished <> 0) AS done_ts,
                   arg_min_null(reason, ts_ns) FILTER (WHERE finished <> 0) AS done_reason,
                   sum(new_tokens) AS tokens
            FROM token_entry GROUP BY rid),
    rids AS (SELECT rid FROM http UNION SELECT rid FROM enq UNION SELECT rid FROM ent)
    SELECT rids.rid, http.ts AS http_ts, http.api_rid, http.prompt AS http_prompt,
           enq.ts AS enq_ts, enq.prompt AS enq_prompt, enq.proc AS enq_proc,
           res.ts AS res_ts, res.out_tokens AS res_tokens, res.reason AS res_reason,
           coalesce(st.preempted, 0) AS st_preempted, st.fin_ts, st.fin_state, hit.hit, hit.query,
           kv.peak, ent.first_row, ent.prompt AS entry_prompt, ent.iterations, coalesce(bpre.n, 0) AS b_preempted,
           done.row AS done_row, done.reason AS done_reason, tok.first_ts AS tok_first, tok.done_ts AS tok_done,
           tok.done_reason AS tok_reason, tok.tokens AS tok_count, tok.rid IS NOT NULL AS has_tokens,
           ent.eng_first_row, ent.eng_tokens
    FROM rids LEFT JOIN http USING (rid) LEFT JOIN enq USING (rid) LEFT JOIN res USING (rid)
    LEFT JOIN st USING (rid) LEFT JOIN hit USING (rid) LEFT JOIN kv USING (rid) LEFT JOIN ent USING (rid)
    LEFT JOIN bpre USING (rid) LEFT JOIN done USING (rid) LEFT JOIN tok USING (rid)
"""

# when a batch's output reached the host: the end of its updateFromOutput, else modelExec, else schedule span
_OUT_NS = "coalesce(nullif({b}.update_end_ns, 0), nullif({b}.model_end_ns, 0), {b}.end_ns)"

_REQUEST = f"""
    CREATE OR REPLACE TEMP TABLE request_timing AS
    WITH r AS (
        SELECT f.*, fb.start_ns AS first_sched, fb.batch_id AS first_batch_id, fb.dp_rank AS b_dp, fb.proc AS b_proc,
               f.http_ts IS NOT NULL AS api,
               {_OUT_NS.format(b='ef')} AS eng_first_ns, {_OUT_NS.format(b='db')} AS eng_done_ns
        FROM rid_facts f
        LEFT JOIN batch fb ON fb.batch_row = f.first_row
        LEFT JOIN batch ef ON ef.batch_row = f.eng_first_row
        LEFT JOIN batch db ON db.batch_row = f.done_row),
    t AS (
        SELECT r.*,
               CASE WHEN api THEN http_ts ELSE enq_ts END AS arrival,
               CASE WHEN api THEN tok_first ELSE eng_first_ns END AS first_tok,
               CASE WHEN api THEN coalesce(tok_done, res_ts)
                    ELSE coalesce(eng_done_ns, fin_ts) END AS completion,
               CASE WHEN api THEN coalesce(res_tokens, CASE WHEN has_tokens THEN tok_count END)
                    ELSE eng_tokens END AS out_tokens,
               coalesce(CASE WHEN api THEN coalesce(nullif(res_reason, ''), nullif(tok_reason, '')) END,
                        nullif(done_reason, ''), fin_state) AS reason,
               coalesce(http_prompt, enq_prompt, entry_prompt) AS input_tokens
        FROM r)
    SELECT row_number() OVER (ORDER BY coalesce(arrival, enq_ts, first_sched) IS NULL,
                              coalesce(arrival, enq_ts, first_sched), rid) AS row_no,
           rid, api_rid, arrival AS arrival_ns, enq_ts AS engine_arrival_ns, first_sched AS first_scheduled_ns,
           first_tok AS first_token_ns, completion AS completion_ns,
           (first_sched - enq_ts) / 1e6 AS queue_ms, (first_tok - first_sched) / 1e6 AS prefill_ms,
           (completion - first_tok) / 1e6 AS decode_ms, (first_tok - arrival) / 1e6 AS ttft_ms,
           CASE WHEN out_tokens > 1 THEN (completion - first_tok) / 1e6 / (out_tokens - 1) END AS tpot_ms,
           (completion - arrival) / 1e6 AS e2e_ms, input_tokens, out_tokens AS output_tokens,
           greatest(st_preempted, b_preempted) AS preemptions,
           CASE WHEN hit = round(hit) THEN TRY_CAST(hit AS BIGINT) END AS prefix_hit_tokens, peak AS kv_blocks,
           reason AS finish_reason,
           CASE WHEN coalesce(nullif(query, 0), nullif(input_tokens, 0)) IS NOT NULL
                THEN hit / coalesce(nullif(query, 0), nullif(input_tokens, 0)) END AS cache_hit_rate,
           coalesce(iterations, 0) AS num_iterations, first_batch_id, b_dp AS dp_rank,
           coalesce(b_proc, enq_proc) AS proc, CASE WHEN api THEN 'api' ELSE 'engine' END AS timing_source
    FROM t
"""


def build_requests(con: duckdb.DuckDBPyConnection) -> None:
    """`request` from the batch tables (batch.build_batches first) and the Request / KVCache events: the
    timings above, then the HTTP breakdown (breakdown.py), then `complete` / `incomplete_reason`
    (completeness.py; needs its tables `process_gap`, `run_switch`)."""
    con.execute(_REQUEST_EVENTS)
    con.execute(_TOKEN_ENTRIES)
    bad = con.execute(f"SELECT proc, count(*) FROM token_entry WHERE {_BAD_TOKEN_ENTRY} GROUP BY proc").fetchall()
    if bad:
        insert_rows(con, "bad_entry", bad)
        con.execute(f"DELETE FROM token_entry WHERE {_BAD_TOKEN_ENTRY}")
    con.execute(_PER_RID)
    con.execute(_REQUEST)
    build_breakdown(con, "request_timing", "request_http")
    mark_requests(con, "request_http", "request")
    drop_tables(con, "request_timing", "request_http", "req_event", "token_entry", "rid_facts")
