"""Overlap lanes: where a span that does not nest on its thread's track is drawn.

A track shows slices nested: each one inside the slices still open when it starts. Two probes timing code
that overlaps (an async handler, a probe around a call another probe ends inside) record spans that cross;
drawn on one track they would be mis-drawn or dropped. Walking each thread's spans in (start, longest first)
order with a stack of the open slices' ends, a span that does not fit inside the innermost open slice goes
to the first overlap lane where it does (a lane of its own when none fits), so every lane nests.

The walk is sequential, so it runs here over the spans' times only (fetched in chunks, ordered by DuckDB);
the spans moved, usually none, are a small table `trace_lane(tid, start_ns, end_ns, lane)` that the trace's
span query joins (lane >= 1; identical spans of one thread always land on the same lane).
"""

from __future__ import annotations

import duckdb

from .literals import insert_rows

_CHUNK = 1 << 16
OVERLAP_LANE = 1 << 20  # the tid of a thread's overlap lane: its tid + lane * this


def build_lanes(con: duckdb.DuckDBPyConnection, span_filter: str) -> int:
    """Create `trace_lane` for the spans matching `span_filter` (on the `span` view, aliased s; needs the
    table `trace_thread`); returns how many overlap lanes were opened."""
    cursor = con.execute(f"""
        SELECT t.tid, s.start_ns, greatest(s.end_ns, s.start_ns) AS end_ns
        FROM span s JOIN trace_thread t ON t.proc = s.proc AND t.raw_tid IS NOT DISTINCT FROM s.tid
        WHERE {span_filter}
        ORDER BY t.tid, s.start_ns, end_ns DESC""")
    moved: list[tuple[int, int, int, int]] = []
    opened = 0
    thread = None
    stack: list[int] = []  # ends of the slices open on the thread's own track
    lanes: list[list[int]] = []  # the same, per overlap lane
    while rows := cursor.fetchmany(_CHUNK):
        for tid, start, end in rows:
            if tid != thread:
                opened += len(lanes)
                thread, stack, lanes = tid, [], []
            while stack and stack[-1] <= start:
                stack.pop()
            if not stack or end <= stack[-1]:
                stack.append(end)
            else:
                moved.append((tid, start, end, 1 + _place(lanes, start, end)))
    opened += len(lanes)
    # as literals: registering arrays would import numpy (and DuckDB pandas) for a table that is usually empty
    con.execute("CREATE OR REPLACE TEMP TABLE trace_lane (tid BIGINT, start_ns BIGINT, end_ns BIGINT, lane BIGINT)")
    insert_rows(con, "trace_lane", sorted(set(moved)))
    return opened


def _place(lanes: list[list[int]], start: int, end: int) -> int:
    """The first lane where [start, end] nests; `lanes` holds each lane's open slice ends."""
    for lane, stack in enumerate(lanes):
        while stack and stack[-1] <= start:
            stack.pop()
        if not stack or end <= stack[-1]:
            stack.append(end)
            return lane
    lanes.append([end])
    return len(lanes) - 1
