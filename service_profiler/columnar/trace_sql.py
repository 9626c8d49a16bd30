"""SQL shared by the trace's queries (trace_out.py, trace_requests.py). They read the variables that
`trace_out.write_trace` sets: `origin` (ns), and `lo` / `hi`, the window's bounds (ns)."""

from __future__ import annotations

import duckdb

from .raw import SPAN_RECORD
from .trace_lanes import OVERLAP_LANE


def us(column: str) -> str:
    """A time column as the trace's `ts`: microseconds since the origin."""
    return f"round(({column} - getvariable('origin')) / 1000.0, 3)"


def window_filter(column: str, end_column: str | None = None) -> str:
    """What lies (or, with `end_column`, reaches) inside the window."""
    end = end_column or column
    return f"{end} >= getvariable('lo') AND {column} <= getvariable('hi')"


def second(ts: str) -> str:
    """The second of the run (since the origin) a time column falls in: the cap's unit."""
    return f"({ts} - getvariable('origin')) // 1000000000"


def rank_in_second(partition: str, ts: str) -> str:
    """A row's place (1, 2, ...) in its partition within its second of the run, in time order."""
    return f"row_number() OVER (PARTITION BY {partition}, {second(ts)} ORDER BY {ts})"


def capped(partition: str, ts: str) -> str:
    """Whether a row is among the first `{cap}` of its partition in its second of the run (the caller
    fills in the cap)."""
    return f"{rank_in_second(partition, ts)} <= {{cap}}"


def create_drawn_spans(con: duckdb.DuckDBPyConnection, cap: int) -> None:
    """The view `trace_span`: the spans the trace draws (inside the window, within the cap of their name
    per process per second), each with the tid of the track it is drawn on: its thread's, or one of that
    thread's overlap lanes. Needs `trace_thread` (trace_out.py) and `trace_lane` (trace_lanes.py).

    The spans drawn are chosen on their keys alone, and their attributes joined back by row id: a window
    over whole rows holds every row's attributes at once (the spans of a 1 M-record run needed 200-300 MB
    that way; its whole trace, the instants chosen alike, fits in 60 MB this way)."""
    con.execute(f"""
        CREATE OR REPLACE TEMP VIEW trace_span AS
        WITH c AS (SELECT rowid AS record_row, proc, name, ts_ns AS start_ns, end_ns, tid,
                          {capped('proc, name', 'ts_ns').replace('{cap}', str(int(cap)))} AS shown
                   FROM record WHERE {SPAN_RECORD} AND {window_filter('ts_ns', 'end_ns')}),
        drawn AS (
            SELECT c.record_row, c.start_ns, greatest(c.end_ns, c.start_ns) AS end_ns,
                   t.tid + coalesce(l.lane, 0) * {OVERLAP_LANE} AS tid
            FROM c JOIN trace_thread t ON t.proc = c.proc AND t.raw_tid IS NOT DISTINCT FROM c.tid
            LEFT JOIN trace_lane l ON l.tid = t.tid AND l.start_ns = c.start_ns
                                   AND l.end_ns = greatest(c.end_ns, c.start_ns)
            WHERE shown)
        SELECT r.proc, r.domain, r.name, d.start_ns, d.end_ns, r.attrs, d.tid
        FROM drawn d JOIN record r ON r.rowid = d.record_row""")
