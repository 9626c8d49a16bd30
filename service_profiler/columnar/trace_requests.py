"""The trace's "Requests" process: one thread per request, and one flow from each request to the first batch
that scheduled it. Queries over the request, batch and state_transition tables; `trace_out.write_trace`
sets the variables they read (origin, lo/hi window bounds, requests_pid, request_tid_base: tids are unique in
the whole trace, Perfetto keys threads by tid) and copies their rows out.

A request's thread holds a `request` slice (its args: the request table's identity, sizes, client-facing
ttft_ms / e2e_ms, preemptions and batches) and, inside it, adjacent phase slices, each from one boundary
("mark") to the next:
  http receive (HTTP arrival) -> preprocess (body read) -> queued (hand-off to the engine; as the request
  table's http_receive_ms, preprocess_ms, engine_queue_ms) -> the engine's
  phases, in time order: prefill (first scheduled), decode (first token), and for a preempted request
  preempted (its PREEMPTED transition) -> prefill (the batch that resumed it: vLLM recomputes) -> decode
  (the end of the step that completed the recompute, at the latest the start of its next decode batch)
  -> respond (completion) -> end (the last byte written, else completion).
Marks are made monotonic in that order (the API server's and the engine's clocks may disagree by a little),
an empty slice is left out and neighbours of one state are merged. The HTTP phases appear where the HTTP
server was recorded; a `first token sent` instant marks when its first bytes were written.

Which requests: those that arrived inside the window and completed, at most `cap` arriving in one second
(the rest are counted in the trace's metadata): every request event (slices, instant, flow) is bounded by
that.
"""

from __future__ import annotations

import duckdb

from .trace_sql import second, us

REQUEST_END = "coalesce(last_byte_sent_ns, completion_ns)"

# the requests that may be drawn: arrived inside the window and completed
_CANDIDATES = f"""
    FROM request
    WHERE arrival_ns IS NOT NULL AND {REQUEST_END} >= arrival_ns
      AND {REQUEST_END} >= getvariable('lo') AND arrival_ns <= getvariable('hi')"""

# the requests drawn (`shown`), numbered by arrival within their second for the cap
_SHOWN = f"""
    CREATE OR REPLACE TEMP TABLE trace_request AS
    SELECT row_no + getvariable('request_tid_base') AS tid, rid, api_rid, arrival_source, ttft_ms, e2e_ms,
           input_tokens, output_tokens, finish_reason, preemptions, num_iterations, arrival_ns, body_received_ns,
           engine_arrival_ns, handoff_ns, first_scheduled_ns, first_token_ns, completion_ns, last_byte_sent_ns,
           first_token_sent_ns, proc,
           row_number() OVER (PARTITION BY {second('arrival_ns')} ORDER BY arrival_ns, row_no) <= {{cap}} AS shown
    {_CANDIDATES}
"""

ARRIVALS_PER_SECOND = f"SELECT count(*) AS n {_CANDIDATES} GROUP BY {second('arrival_ns')}"
"""The requests that may be drawn, counted per second of arrival (what the cap counts)."""

# Engine phases of requests preempted (or resumed) at least once: per request, its PREEMPTED transitions and
# its batch entries in time order; a mark at each preemption, at the entry after one (resumed: prefill when
# it recomputes, else decode), and at each later change of phase (prefill -> decode: when the step of the
# last prefill entry ended, at the latest when the decode batch started). The first prefill and first decode
# are the request table's first_scheduled_ns / first_token_ns, marked for every request.
_REWORK = """
    CREATE OR REPLACE TEMP TABLE trace_rework AS
    WITH reworked AS (
        SELECT rid, tid FROM trace_request WHERE shown AND preemptions > 0
        UNION SELECT r.rid, r.tid FROM trace_request r
              WHERE r.shown AND r.rid IN (SELECT rid FROM batch_entry WHERE resumed <> 0)),
    steps AS (
        SELECT w.tid, s.ts_ns AS ts, 0 AS kind, NULL::INTEGER AS phase, NULL::BIGINT AS out_ns, 0 AS resumed
        FROM state_transition s JOIN reworked w USING (rid) WHERE s.to_state = 'PREEMPTED'
        UNION ALL
        SELECT w.tid, b.start_ns, 1, e.phase,
               coalesce(nullif(b.update_end_ns, 0), nullif(b.model_end_ns, 0), b.end_ns), e.resumed
        FROM batch_entry e JOIN reworked w USING (rid) JOIN batch b USING (batch_row)),
    seq AS (
        SELECT *, lag(kind) OVER w AS prev_kind, lag(phase) OVER w AS prev_phase, lag(out_ns) OVER w AS prev_out,
               count(*) FILTER (WHERE kind = 1 AND phase <> 0) OVER (w ROWS UNBOUNDED PRECEDING) AS decodes
        FROM steps WINDOW w AS (PARTITION BY tid ORDER BY ts, kind))
    SELECT tid, ts, 'preempted' AS state FROM seq WHERE kind = 0
    UNION ALL SELECT tid, ts, CASE WHEN phase = 0 THEN 'prefill' ELSE 'decode' END FROM seq
              WHERE kind = 1 AND prev_kind = 0
    UNION ALL SELECT tid, ts, 'prefill' FROM seq
              WHERE kind = 1 AND prev_kind = 1 AND phase = 0 AND (prev_phase <> 0 OR resumed <> 0)
    UNION ALL SELECT tid, least(prev_out, ts), 'decode' FROM seq
              WHERE kind = 1 AND prev_kind = 1 AND phase <> 0 AND prev_phase = 0 AND decodes > 1
"""

_SLICES = f"""
    CREATE OR REPLACE TEMP TABLE trace_request_slice AS
    WITH r AS (SELECT * FROM trace_request WHERE shown),
    mark AS (  -- (order, time, state): each state runs from its mark to the next
        SELECT tid, 0 AS k, arrival_ns AS ts, 'http receive' AS state FROM r
        UNION ALL SELECT tid, 1, greatest(arrival_ns, coalesce(body_received_ns, arrival_ns)), 'preprocess' FROM r
        -- queued from the hand-off to the engine (as the request table's engine_queue_ms), or without the
        -- HTTP server's records from the request's arrival
        UNION ALL SELECT tid, 2, CASE WHEN arrival_source = 'http' THEN coalesce(handoff_ns, engine_arrival_ns,
                                                                               arrival_ns)
                                      ELSE arrival_ns END, 'queued' FROM r
        UNION ALL SELECT tid, 3, first_scheduled_ns, 'prefill' FROM r WHERE first_scheduled_ns IS NOT NULL
        UNION ALL SELECT tid, 3, first_token_ns, 'decode' FROM r WHERE first_token_ns IS NOT NULL
        UNION ALL SELECT tid, 3, ts, state FROM trace_rework
        UNION ALL SELECT tid, 4, completion_ns, 'respond' FROM r WHERE completion_ns IS NOT NULL
        UNION ALL SELECT tid, 5, {REQUEST_END}, '' FROM r),
    monotonic AS (
        SELECT tid, k, state, max(ts) OVER (PARTITION BY tid ORDER BY k, ts ROWS UNBOUNDED PRECEDING) AS ts
        FROM mark),
    bounded AS (
        SELECT tid, state, ts AS a, lead(ts) OVER (PARTITION BY tid ORDER BY k, ts) AS z, k, ts FROM monotonic),
    nonempty AS (
        SELECT *, CASE WHEN state IS DISTINCT FROM lag(state) OVER (PARTITION BY tid ORDER BY k, ts)
                       THEN 1 ELSE 0 END AS starts
        FROM bounded WHERE state <> '' AND z > a),
    grouped AS (
        SELECT *, sum(starts) OVER (PARTITION BY tid ORDER BY k, ts ROWS UNBOUNDED PRECEDING) AS part FROM nonempty)
    SELECT tid, any_value(state) AS name, min(a) AS a, max(z) AS z FROM grouped GROUP BY tid, part
"""

# The first batches' schedule spans, as the trace draws them (trace_sql.create_drawn_spans).
_SCHEDULE = """
    CREATE OR REPLACE TEMP TABLE trace_schedule AS
    SELECT proc, start_ns, end_ns, tid FROM trace_span
    WHERE name = 'batchFrameworkProcessing' AND domain = 'BatchSchedule'
      AND start_ns IN (SELECT first_scheduled_ns FROM trace_request WHERE shown)"""

# From the middle of the request's `queued` slice to the middle of its first batch's schedule span; mid-slice
# times bind each end to its own slice, not to a neighbour starting at the
# same instant. Left out when the arrow would point back in time (clock skew). `end`: the columns of one end.
_FLOW = """
    WITH f AS (
        SELECT r.tid AS flow_id, q.a + (q.z - q.a) // 2 AS s_ns, s.start_ns + (s.end_ns - s.start_ns) // 2 AS f_ns,
               s.proc + 1 AS f_pid, s.tid AS f_tid, r.tid
        FROM trace_request r
        JOIN trace_request_slice q ON q.tid = r.tid AND q.name = 'queued'
        JOIN trace_schedule s ON s.proc = r.proc AND s.start_ns = r.first_scheduled_ns
        WHERE r.shown
        QUALIFY row_number() OVER (PARTITION BY r.tid ORDER BY s.tid) = 1)
    SELECT {end} FROM f WHERE s_ns <= f_ns"""

def prepare(con: duckdb.DuckDBPyConnection, cap: int) -> None:
    """Build the request trace tables (`trace_request.shown`: drawn; the others were left out by the cap).
    Needs the view `trace_span` (trace_sql.py)."""
    con.execute(_SHOWN.format(cap=cap))
    con.execute(_REWORK)
    con.execute(_SLICES)
    con.execute(_SCHEDULE)


def queries() -> dict[str, str]:
    """kind -> query whose rows are trace events (after `prepare`)."""
    return {
        "request": f"""
            SELECT 'X' AS ph, 'request' AS name, 'request' AS cat, {us('arrival_ns')} AS ts,
                   round((greatest({REQUEST_END}, arrival_ns) - arrival_ns) / 1000.0, 3) AS dur,
                   getvariable('requests_pid') AS pid, tid,
                   json_merge_patch('{{}}', json_object(
                       'rid', rid, 'arrival', arrival_source, 'ttft_ms', ttft_ms, 'e2e_ms', e2e_ms,
                       'api_rid', api_rid, 'prompt_tokens', input_tokens, 'output_tokens', output_tokens,
                       'finish_reason', finish_reason, 'preemptions', preemptions, 'batches', num_iterations))
                       AS args
            FROM trace_request WHERE shown""",
        "request_phase": f"""
            SELECT 'X' AS ph, name, 'request' AS cat, {us('a')} AS ts, round((z - a) / 1000.0, 3) AS dur,
                   getvariable('requests_pid') AS pid, tid
            FROM trace_request_slice""",
        "request_instant": f"""
            SELECT 'i' AS ph, 'first token sent' AS name, 'request' AS cat, {us('first_token_sent_ns')} AS ts,
                   't' AS s, getvariable('requests_pid') AS pid, tid
            FROM trace_request
            WHERE shown AND first_token_sent_ns BETWEEN arrival_ns AND greatest({REQUEST_END}, completion_ns)""",
        # from the middle of the request's `queued` slice to the middle of its first batch's schedule span (as
        # drawn: same lane, not capped); mid-slice times bind each end to its own slice, not to a neighbour
        # starting at the same instant. Left out when the arrow would point back in time (clock skew).
        "flow_start": _FLOW.format(end="'s' AS ph, 'first batch' AS name, 'request' AS cat, flow_id AS id, "
                                       f"{us('s_ns')} AS ts, getvariable('requests_pid') AS pid, tid"),
        "flow_end": _FLOW.format(end="'f' AS ph, 'first batch' AS name, 'request' AS cat, flow_id AS id, "
                                     f"{us('f_ns')} AS ts, 'e' AS bp, f_pid AS pid, f_tid AS tid"),
    }


def thread_names(con: duckdb.DuckDBPyConnection) -> list[tuple[int, str]]:
    """(tid, name) of every request thread drawn, in arrival order."""
    return [(int(tid), f"req {rid}") for tid, rid in
            con.execute("SELECT tid, rid FROM trace_request WHERE shown ORDER BY tid").fetchall()]
