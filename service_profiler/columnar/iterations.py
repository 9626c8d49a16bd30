"""Per-iteration request states: one row per entry of every batch (state "running", or "completed" when
that step finished the request) and one per request a step preempted ("preempted", after the step's
entries). Table `iteration` (columns ITERATION_COLUMNS + batch_row, pos, row kind, and the entry's phase
as recorded, `phase_code`), ordered by (batch_row, kind, pos).

Per entry of request r (in batch order):
  - iteration: r's entries before this one;
  - generated_tokens_before: r's entries before this one that produced a token: a decode step, or the
    step where its prefill (or its recompute after a preemption) completed, i.e. computed + scheduled >=
    prompt + tokens generated so far. Whether a prefill entry completed depends on the prefill entries
    before it, so those (a few per request) are walked by a recursive query, one per request at a time;
  - time_in_state_ms: 0 at r's first entry and at an entry flagged resumed; otherwise the time since r's
    state last began: its first entry, a resumed entry, or the start of the batch that preempted it
    (a preemption counts after the entries of its batch).
A preempted row carries r's iteration and generated tokens just after that batch.
"""

from __future__ import annotations

import duckdb

from .batch import drop_tables

ITERATION_COLUMNS = ["batch_id", "dp_rank", "proc", "batch_start_ns", "rid", "state", "phase",
                     "scheduled_tokens", "computed_tokens_before", "prompt_tokens", "resumed", "iteration",
                     "generated_tokens_before", "time_in_state_ms"]

# entries get a key ordering them within a request: batch_row * _SLOT + pos; a preemption sorts after
# every entry of its batch
_SLOT = 1 << 24

# Every window and as-of join below is per request: they are keyed by `rid_no`, an integer standing for
# the rid (NULL for no rid, as the rid itself), because partitioning and sorting by the rid's text was
# the larger part of their cost. One window gives each entry its iteration, the decodes before it, its
# prefill number and whether it is the request's first entry in its batch (a rid's entries are ordered
# by (batch_row, pos), which is unique, so a frame ending at the current row holds exactly the rows
# before it and itself).
# The rid's text is left out of the windows' rows (a window sorts, and on a large run spills, every
# column its rows carry) and joined back once, into `iteration`.
_RID_NUMBERS = """
    CREATE OR REPLACE TEMP TABLE rid_number AS
    SELECT rid, row_number() OVER () AS rid_no FROM (SELECT DISTINCT rid FROM batch_entry WHERE rid IS NOT NULL)
"""

_NUMBERED = f"""
    CREATE OR REPLACE TEMP TABLE entry_numbered AS
    SELECT e.batch_row, e.pos, e.phase, e.scheduled, e.computed, e.prompt, e.resumed, n.rid_no, b.start_ns,
           e.batch_row::BIGINT * {_SLOT} + e.pos AS k, (row_number() OVER w - 1) AS iteration,
           coalesce(sum(CASE WHEN e.phase <> 0 THEN 1 ELSE 0 END) OVER w
                    - CASE WHEN e.phase <> 0 THEN 1 ELSE 0 END, 0)::BIGINT AS decodes_before,
           CASE WHEN e.phase = 0 THEN sum(CASE WHEN e.phase = 0 THEN 1 ELSE 0 END) OVER w END::BIGINT AS prefill_no,
           lag(e.batch_row) OVER w IS DISTINCT FROM e.batch_row AS first_in_batch
    FROM batch_entry e JOIN batch_span b USING (batch_row) LEFT JOIN rid_number n USING (rid)
    WINDOW w AS (PARTITION BY n.rid_no ORDER BY e.batch_row, e.pos
                 ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
"""

# prefill entries in order per request; `done_before`: those before it that completed (walked recursively)
_PREFILLS = """
    CREATE OR REPLACE TEMP TABLE prefill_done AS
    WITH RECURSIVE p AS (
        SELECT rid_no, prefill_no, k, computed + scheduled >= prompt + decodes_before AS done,
               0::BIGINT AS done_before
        FROM entry_numbered WHERE prefill_no = 1
        UNION ALL
        SELECT n.rid_no, n.prefill_no, n.k,
               n.computed + n.scheduled
                   >= n.prompt + n.decodes_before + p.done_before + (CASE WHEN p.done THEN 1 ELSE 0 END),
               p.done_before + (CASE WHEN p.done THEN 1 ELSE 0 END)
        FROM p JOIN entry_numbered n ON n.rid_no = p.rid_no AND n.prefill_no = p.prefill_no + 1)
    SELECT rid_no, k, coalesce(done, false) AS done FROM p
"""

# One window gives each entry the tokens its request generated before it and when its state began (its
# latest "began" row before it: the request's first or resumed entries, and the batches that preempted
# it, added as marker rows for this window only). A window and an as-of join did this in two sorts of
# the entries' rows.
_ENTRY_STATE = f"""
    CREATE OR REPLACE TEMP TABLE entry_state AS
    WITH produced AS (
        SELECT n.*, CASE WHEN n.phase <> 0 OR coalesce(d.done, false) THEN 1 ELSE 0 END AS produced,
               n.iteration = 0 OR n.resumed <> 0 AS began, false AS marker
        FROM entry_numbered n LEFT JOIN prefill_done d ON d.rid_no = n.rid_no AND d.k = n.k),
    preemption AS (
        SELECT n.rid_no, p.batch_row::BIGINT * {_SLOT} + {_SLOT - 1} AS k, p.start_ns, 0 AS produced,
               true AS began, true AS marker
        FROM (SELECT batch_row, start_ns, unnest(preempted) AS rid FROM batch_span WHERE preempted IS NOT NULL) AS p
        JOIN rid_number n USING (rid)),
    w AS (
        SELECT *, coalesce(sum(produced) OVER before, 0)::BIGINT AS generated_before,
               last_value(CASE WHEN began THEN start_ns END IGNORE NULLS) OVER before AS began_ns
        FROM (SELECT * FROM produced UNION ALL BY NAME SELECT * FROM preemption)
        WINDOW before AS (PARTITION BY rid_no ORDER BY k ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING))
    SELECT * EXCLUDE (began, marker, began_ns),
           CASE WHEN iteration = 0 OR resumed <> 0 THEN 0.0 ELSE (start_ns - began_ns) / 1e6 END AS time_in_state_ms
    FROM w WHERE NOT marker
"""

_ITERATION = f"""
    CREATE OR REPLACE TABLE iteration AS
    WITH finished AS (SELECT f.batch_row, n.rid_no, min(f.pos) AS pos
                      FROM batch_finished f JOIN rid_number n USING (rid) GROUP BY f.batch_row, n.rid_no),
    preempted AS (
        SELECT p.*, n.rid_no FROM (
            SELECT batch_row, unnest(preempted) AS rid, unnest(generate_series(1, len(preempted))) AS pos
            FROM batch_span WHERE preempted IS NOT NULL) AS p LEFT JOIN rid_number n USING (rid)),
    after_batch AS (  -- each preempted request's iteration and generated tokens just after its batch
        SELECT p.batch_row, p.pos, p.rid, coalesce(s.iteration + 1, 0) AS iteration,
               coalesce(s.generated_before + s.produced, 0) AS generated
        FROM preempted p
        ASOF LEFT JOIN (SELECT rid_no, k, iteration, generated_before, produced FROM entry_state
                        WHERE rid_no IN (SELECT rid_no FROM preempted)) AS s
             ON s.rid_no = p.rid_no AND p.batch_row::BIGINT * {_SLOT} + {_SLOT - 1} >= s.k)
    -- a request listed twice in one batch is "completed" at its first entry only
    SELECT s.batch_row, 0 AS kind, s.pos, b.batch_id, b.dp_rank, b.proc, s.start_ns AS batch_start_ns, r.rid,
           CASE WHEN f.rid_no IS NOT NULL AND s.first_in_batch THEN 'completed' ELSE 'running' END AS state,
           CASE s.phase WHEN 0 THEN 'prefill' WHEN 1 THEN 'decode' END AS phase, s.scheduled AS scheduled_tokens,
           s.computed AS computed_tokens_before, s.prompt AS prompt_tokens, s.resumed, s.iteration,
           s.generated_before AS generated_tokens_before, s.time_in_state_ms, s.phase AS phase_code
    FROM entry_state s JOIN batch b USING (batch_row) JOIN rid_number r ON r.rid_no = s.rid_no
    LEFT JOIN finished f ON f.batch_row = s.batch_row AND f.rid_no = s.rid_no
    UNION ALL
    SELECT a.batch_row, 1, a.pos, b.batch_id, b.dp_rank, b.proc, b.start_ns, a.rid, 'preempted', NULL, 0, NULL, NULL,
           0, a.iteration, a.generated, 0.0, NULL
    FROM after_batch a JOIN batch b USING (batch_row)
"""


def build_iterations(con: duckdb.DuckDBPyConnection) -> None:
    """`iteration` (batch.build_batches first)."""
    for statement in (_RID_NUMBERS, _NUMBERED, _PREFILLS, _ENTRY_STATE, _ITERATION):
        con.execute(statement)
    drop_tables(con, "rid_number", "entry_numbered", "prefill_done", "entry_state")
