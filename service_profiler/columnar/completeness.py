"""Which requests and batches were only partly observed: marked, not presented as whole.

The meanings are those of docs/partial-data.md: each request and batch row ends with `complete` (1/0)
and `incomplete_reason` (empty when complete, else `;`-separated, in this order):
- `collection_switched`: a `state` line (any process, not the startup one) strictly after the row's
  first timestamp and at or before its last (a request without completion: to the end of the run);
- `records_missing:<why>` (sorted by why): a gap of a process recording the row (a request: its engine
  process and every API server process; a batch: its process) overlaps that time (losses.py);
- requests only: `no_api_server_record` (the run has `httpReq` events, this request's timing is the
  engine's), else `no_arrival_record` (no API server, enqueue events but none for it); `not_finished`;
- `negative_<column>`: a duration out of order, left empty.

What each raw file says about itself (losses.py, read by the raw reader) is a few facts per process:
they become the tables `process_gap` (proc, start_ns, end_ns, reason, count; an open end is
losses.OPEN_END) and `run_switch` (ts_ns of each collection switch), and the rows are marked by joins.
"""

from __future__ import annotations

import duckdb

from .literals import insert_rows
from .raw import Process

COMPLETE_COLUMNS = ["complete", "incomplete_reason"]
REQUEST_DURATIONS = ("queue_ms", "prefill_ms", "decode_ms", "ttft_ms", "tpot_ms", "e2e_ms")
BATCH_DURATIONS = ("schedule_ms", "model_run_ms", "step_ms", "update_ms")

_FAR = 2**63 - 1  # the end of a request without completion


def load_losses(con: duckdb.DuckDBPyConnection, processes: list[Process],
                states: list[tuple[int, int, bool, str]]) -> None:
    """The tables `process_gap` and `run_switch` from the processes' loss markers and state lines."""
    con.execute("CREATE OR REPLACE TABLE process_gap (proc INTEGER, start_ns BIGINT, end_ns BIGINT, reason VARCHAR, "
                "count BIGINT)")
    gaps = [(p.index, g.start_ns, g.end_ns, g.reason, g.count) for p in processes for g in p.loss.all_gaps()]
    if gaps:
        insert_rows(con, "process_gap", gaps)
    con.execute("CREATE OR REPLACE TABLE run_switch (ts_ns BIGINT)")
    switches = [(ts,) for _, ts, _, why in states if why != "startup"]
    if switches:
        insert_rows(con, "run_switch", switches)


def _reasons(alias: str, procs: str, start: str, end: str, extra: list[str], durations: tuple[str, ...]) -> str:
    """The `;`-joined reasons of the row `alias` whose time is [start, end] and whose records `procs` (a
    condition on g.proc) wrote; `extra`: more reason expressions (NULL when they do not apply), in order."""
    negative = [f"CASE WHEN {alias}.{c} < 0 THEN 'negative_{c}' END" for c in durations]
    return f"""concat_ws(';',
        CASE WHEN {start} IS NOT NULL AND EXISTS (SELECT 1 FROM run_switch s WHERE s.ts_ns > {start}
                                                  AND s.ts_ns <= {end}) THEN 'collection_switched' END,
        CASE WHEN {start} IS NOT NULL THEN (
            SELECT string_agg(DISTINCT 'records_missing:' || g.reason, ';' ORDER BY 'records_missing:' || g.reason)
            FROM process_gap g WHERE ({procs}) AND g.start_ns <= {end} AND g.end_ns >= {start}) END,
        {', '.join([*extra, *negative])})"""


def _marked(table: str, durations: tuple[str, ...]) -> str:
    """`table`'s columns with negative durations left empty, and `complete`, `incomplete_reason` (from the
    column `why`)."""
    cleared = ", ".join(f"CASE WHEN {c} < 0 THEN NULL ELSE {c} END AS {c}" for c in durations)
    return f"SELECT * EXCLUDE (why) REPLACE ({cleared}), CASE WHEN why = '' THEN 1 ELSE 0 END AS complete, " \
           f"why AS incomplete_reason FROM {table}"


def mark_batches(con: duckdb.DuckDBPyConnection, source: str, target: str) -> None:
    """`target`: the batch table `source` with COMPLETE_COLUMNS."""
    why = _reasons("b", "g.proc = b.proc", "b.start_ns", "greatest(b.end_ns, b.model_end_ns, b.update_end_ns)", [],
                   BATCH_DURATIONS)
    con.execute(f"CREATE OR REPLACE TEMP TABLE batch_why AS SELECT b.*, {why} AS why FROM {source} b")
    con.execute(f"CREATE OR REPLACE TABLE {target} AS {_marked('batch_why', BATCH_DURATIONS)}")
    con.execute("DROP TABLE batch_why")


def mark_requests(con: duckdb.DuckDBPyConnection, source: str, target: str) -> None:
    """`target`: the request table `source` (breakdown included) with COMPLETE_COLUMNS."""
    con.execute("""
        CREATE OR REPLACE TEMP TABLE api_proc AS
        SELECT DISTINCT proc FROM event WHERE domain = 'Request' AND name = 'httpReq'""")
    row = con.execute("SELECT EXISTS (SELECT 1 FROM api_proc), EXISTS (SELECT 1 FROM event WHERE domain = 'Request' "
                      "AND name = 'enqueue')").fetchone()
    has_api, has_enqueue = bool(row and row[0]), bool(row and row[1])
    arrival = "'no_api_server_record'" if has_api else "'no_arrival_record'" if has_enqueue else "NULL"
    arrival_missing = "r.timing_source <> 'api'" if has_api else "r.engine_arrival_ns IS NULL"
    why = _reasons(
        "r", "g.proc IN (SELECT proc FROM api_proc) OR g.proc = r.proc",
        "least(r.arrival_ns, r.engine_arrival_ns, r.first_scheduled_ns, r.first_token_ns, r.completion_ns)",
        f"coalesce(r.completion_ns, {_FAR})",
        [f"CASE WHEN {arrival_missing} THEN {arrival} END",
         "CASE WHEN r.completion_ns IS NULL THEN 'not_finished' END"],
        REQUEST_DURATIONS)
    con.execute(f"CREATE OR REPLACE TEMP TABLE request_why AS SELECT r.*, {why} AS why FROM {source} r")
    con.execute(f"CREATE OR REPLACE TABLE {target} AS {_marked('request_why', REQUEST_DURATIONS)}")
    con.execute("DROP TABLE request_why")
