"""Request lifecycle tables as DuckDB queries: events and state transitions.

- `lifecycle_event`: one row per lifecycle moment, time ordered: request_arrived (`httpReq`),
  request_enqueued (`enqueue`), request_scheduled (first batch), request_preempted, request_resumed,
  first_token, request_finished (engine FINISHED_* state), request_completed (`httpRes`).
- `state_transition`: per request, NEW→WAITING at engine arrival, then the engine's `Request/state`
  events; for runs recorded without state events, transitions derived from the batches (first scheduled,
  `preempted` lists, resumed entries, finished lists). `time_in_from_state_ms`: time since the request's
  previous transition.
Needs the batch and request tables (batch.build_batches, requests.build_requests).
"""

from __future__ import annotations

import duckdb

from .batch import create_numbered, drop_tables

EVENT_COLUMNS = ["ts_ns", "event_type", "rid", "proc", "batch_id", "detail"]
STATE_COLUMNS = ["rid", "seq", "ts_ns", "from_state", "to_state", "batch_id", "proc", "time_in_from_state_ms",
                 "source"]

# Python's spelling of a missing value inside the `detail` text ("key=None")
_S = "coalesce({}, 'None')"

_TRANSITION_KIND = """CASE WHEN "to" = 'PREEMPTED' THEN 'request_preempted'
                           WHEN "to" = 'RUNNING' AND "from" = 'PREEMPTED' THEN 'request_resumed'
                           WHEN starts_with("to", 'FINISHED') THEN 'request_finished' END"""

_STATE_EVENTS = """
    CREATE OR REPLACE TEMP TABLE state_event AS
    SELECT e.proc, e.ts_ns, e.pos, a.rid, a."from", a."to", a.batch_id
    FROM (SELECT proc, ts_ns, pos, json_transform(attrs, '{"rid": "VARCHAR", "from": "VARCHAR", "to": "VARCHAR",
                                                            "batch_id": "VARCHAR"}') AS a
          FROM event WHERE domain = 'Request' AND name = 'state') AS e
"""

# Transitions derived from the batches, for runs recorded without state events: per batch, its preempted
# requests, then its entries (first appearance: scheduled; a resumed entry: resumed), then its finished ones.
_DERIVED = """
    CREATE OR REPLACE TEMP TABLE derived_transition AS
    WITH pre AS (
        SELECT b.batch_row, 0 AS part, g.i AS pos, b.preempted[g.i] AS rid, 'RUNNING' AS "from", 'PREEMPTED' AS "to",
               b.start_ns AS ts_ns
        FROM batch_span b, generate_series(1, len(b.preempted)) AS g(i) WHERE b.preempted IS NOT NULL),
    ent AS (
        SELECT e.batch_row, 1 AS part, e.pos, e.rid,
               CASE WHEN e.batch_row = min(e.batch_row) OVER (PARTITION BY e.rid) THEN 'WAITING' ELSE 'PREEMPTED' END
                   AS "from",
               'RUNNING' AS "to", b.start_ns AS ts_ns,
               e.batch_row = min(e.batch_row) OVER (PARTITION BY e.rid) AS first_seen, e.resumed
        FROM batch_entry e JOIN batch_span b USING (batch_row)),
    fin AS (
        SELECT f.batch_row, 2 AS part, f.pos, f.rid, 'RUNNING',
               CASE WHEN coalesce(f.reason, '') <> '' THEN 'FINISHED_' || upper(f.reason) ELSE 'FINISHED' END,
               coalesce(nullif(b.update_end_ns, 0), b.end_ns)
        FROM batch_finished f JOIN batch b USING (batch_row))
    SELECT * FROM pre
    UNION ALL SELECT batch_row, part, pos, rid, "from", "to", ts_ns FROM ent WHERE first_seen OR resumed <> 0
    UNION ALL SELECT * FROM fin
"""


def _transitions(con: duckdb.DuckDBPyConnection) -> str:
    """The SELECT giving (rid, ts_ns, from, to, batch_id, proc, source, k1, k2) of every transition."""
    has_states = con.execute("SELECT count(*) > 0 FROM state_event").fetchone()
    if has_states and has_states[0]:
        return """SELECT rid, ts_ns, "from", "to", batch_id, proc, 'event' AS source, ts_ns AS k1, pos AS k2
                  FROM state_event"""
    con.execute(_DERIVED)
    return """SELECT d.rid, d.ts_ns, d."from", d."to", b.batch_id::VARCHAR AS batch_id, b.proc, 'derived' AS source,
                     d.batch_row * 3 + d.part AS k1, d.pos AS k2
              FROM derived_transition d JOIN batch b USING (batch_row)"""


def build_lifecycle(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(_STATE_EVENTS)
    transitions = _transitions(con)
    create_numbered(con, "state_transition", f"""
        WITH req AS (SELECT rid, row_no AS n, engine_arrival_ns, proc FROM request),
        t AS (
            SELECT rid, engine_arrival_ns AS ts_ns, 'NEW' AS "from", 'WAITING' AS "to", NULL AS batch_id, proc,
                   'enqueue' AS source, -1 AS k0, 0 AS k1, 0 AS k2
            FROM req WHERE engine_arrival_ns IS NOT NULL
            UNION ALL SELECT rid, ts_ns, "from", "to", batch_id, proc, source, 0, k1, k2 FROM ({transitions})),
        ordered AS (  -- requests in the request table's order, then the others by their first transition
            SELECT t.*, coalesce(req.n, 1e15 + min(t.k1) OVER (PARTITION BY t.rid)) AS rid_order,
                   first_value(t.proc) OVER first AS first_proc, first_value(t.k2) OVER first AS first_k2
            FROM t LEFT JOIN req ON req.rid = t.rid AND req.engine_arrival_ns IS NOT NULL
            WINDOW first AS (PARTITION BY t.rid ORDER BY t.k1, t.proc, t.k2))
        SELECT rid_order, first_proc, first_k2, k0, k1, k2,
               rid, (row_number() OVER w - 1)::BIGINT AS seq, ts_ns, "from" AS from_state, "to" AS to_state,
               TRY_CAST(batch_id AS BIGINT) AS batch_id, proc,
               (ts_ns - lag(ts_ns) OVER w) / 1e6 AS time_in_from_state_ms,
               source
        FROM ordered WINDOW w AS (PARTITION BY rid ORDER BY ts_ns, k0, k1, k2)""",
                    "rid_order, first_proc, first_k2, rid, ts_ns, k0, k1, k2",
                    "r.rid, r.seq, r.ts_ns, r.from_state, r.to_state, r.batch_id, r.proc, r.time_in_from_state_ms, "
                    "r.source")
    create_numbered(con, "lifecycle_event", f"""
        WITH a AS (
            SELECT e.proc, e.name, e.ts_ns, e.pos,
                   json_transform(e.attrs, '{{"rid": "VARCHAR", "api_rid": "VARCHAR", "prompt_tokens": "VARCHAR",
                                            "max_tokens": "VARCHAR", "output_tokens": "VARCHAR",
                                            "finish_reason": "VARCHAR"}}') AS a
            FROM event e WHERE e.domain = 'Request' AND e.name IN ('httpReq', 'enqueue', 'httpRes')),
        rows AS (
            SELECT ts_ns, CASE name WHEN 'httpReq' THEN 'request_arrived' WHEN 'enqueue' THEN 'request_enqueued'
                                    ELSE 'request_completed' END AS event_type,
                   a.rid, proc, NULL::BIGINT AS batch_id,
                   CASE name
                     WHEN 'httpReq' THEN 'api_rid=' || {_S.format('a.api_rid')} || ';prompt_tokens='
                          || {_S.format('a.prompt_tokens')} || ';max_tokens=' || {_S.format('a.max_tokens')}
                     WHEN 'enqueue' THEN 'prompt_tokens=' || {_S.format('a.prompt_tokens')}
                     ELSE 'output_tokens=' || {_S.format('a.output_tokens')} || ';finish_reason='
                          || {_S.format('a.finish_reason')} END AS detail,
                   CASE name WHEN 'httpReq' THEN 0 WHEN 'enqueue' THEN 1 ELSE 2 END AS k1, pos AS k2
            FROM a
            UNION ALL
            SELECT ts_ns, {_TRANSITION_KIND}, rid, proc, TRY_CAST(batch_id AS BIGINT), 'state=' || {_S.format('"to"')},
                   CASE source WHEN 'event' THEN 3 ELSE 5 END, k
            FROM (SELECT *, row_number() OVER (ORDER BY k1, k2) AS k FROM ({transitions}))
            WHERE {_TRANSITION_KIND} IS NOT NULL
            UNION ALL
            SELECT first_scheduled_ns, 'request_scheduled', rid, proc, first_batch_id,
                   'queue_ms=' || {_S.format('queue_ms::VARCHAR')}, 4, row_no * 2
            FROM request WHERE first_scheduled_ns IS NOT NULL
            UNION ALL
            SELECT first_token_ns, 'first_token', rid, NULL, NULL,
                   'ttft_ms=' || {_S.format('ttft_ms::VARCHAR')} || ';source=' || timing_source, 4, row_no * 2 + 1
            FROM request WHERE first_token_ns IS NOT NULL)
        SELECT * FROM rows""", "ts_ns, k1, k2", "r.ts_ns, r.event_type, r.rid, r.proc, r.batch_id, r.detail")
    drop_tables(con, "state_event")
