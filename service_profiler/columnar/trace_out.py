"""Chrome / Perfetto trace (chrome_tracing.json), bounded: at most `max_per_second` events of one name per
process per second of the run, and requests arriving per second (the rest are counted in
metadata.capped_events), that cap lowered for the whole run where the trace would otherwise hold more than
about `max_events` events, and optionally only a time window (`window`, seconds since the origin below).

Timestamps: `ts`/`dur` in microseconds relative to `metadata.origin_epoch_ns` (the run's first timestamp
floored to a whole second), so ns precision survives in a double. Layout:
- one process per raw file (pid = file index + 1), named "<role> <host>:<pid>", API server first, labelled
  with the records it dropped;
- small tids unique in the trace, each named after the recorded thread id ("main" for the process's own);
  spans are `X` slices, a span that does not nest on its thread's track drawn on an overlap lane of that
  thread (trace_lanes.py); containers in args are shown as their length (`n_<key>`): a batch's request list would
  otherwise be most of the file;
- events are thread-scoped instants (except per-request KVCache.allocate: the kvcache counter shows it,
  counted in metadata.folded_events); collection switched on/off is a process-scoped instant;
- counters are `C` events, one series per numeric value, a sample repeating the one before left out (the
  track holds its value): the recorded ones, `tokens` (prefill / decode / total tokens scheduled per step,
  from the batch table) and, for a process that recorded none, `kvcache` / `queues` from the batches;
- the "Requests" process, one thread per request, and a flow from each request to its first batch
  (trace_requests.py).
DuckDB writes each kind of event as a newline-delimited JSON file; they are concatenated into the trace's
event array, the process and thread names after them (viewers read them anywhere).
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import IO

import duckdb

from service_profiler.outputs import open_output, scratch_dir

from . import trace_requests
from .raw import EVENT_RECORD
from .run import AnalysisRun
from .trace_lanes import OVERLAP_LANE, build_lanes
from .trace_sql import capped, create_drawn_spans, rank_in_second, second, us, window_filter

DEFAULT_MAX_PER_SECOND = 2_000
DEFAULT_MAX_EVENTS = 2_000_000
"""About 300 MB of trace (150-170 bytes an event). Perfetto's UI holds a trace in a browser tab's memory
(about 2 GB on most browsers, several times the file's size once parsed; a 900 MB JSON trace was reported
to crash it) and chrome://tracing stopped at 256 MB. The per-second cap alone lets a trace grow with the
run's length and its number of processes (a 10-minute capture of ten engines made a 1.5 GB trace), so
past this the per-second cap is lowered for the whole run."""
REQUEST_EVENTS = 12
"""Trace events one drawn request adds, at most, unless preempted: its request slice, up to six phase
slices, the first-token instant, a flow's two ends, its thread's name and sort order."""
REQUEST_TIDS = 1 << 30  # a request's tid: this + its row in the request table
FOLDED = "domain = 'KVCache' AND name = 'allocate'"


def _compact(obj: str) -> str:
    """The JSON object `obj` with each array / object value replaced by its length under `n_<key>` (parsed
    only when its text has a bracket past the first character: one parse into a map, then each value's
    first character); attributes that are not an object, or that repeat a key, are shown as `value`."""
    return f"""CASE WHEN {obj} IS NULL THEN '{{}}'::JSON
        WHEN json_type({obj}) <> 'OBJECT' THEN json_object('value', {obj})
        WHEN NOT (contains({obj}::VARCHAR, '[') OR contains(substr({obj}::VARCHAR, 2), '{{')) THEN {obj}
        WHEN {_repeats_a_key(obj)} THEN json_object('value', {obj})
        ELSE to_json(map_from_entries(list_transform(map_entries({obj}::MAP(VARCHAR, JSON)), lambda m:
            CASE left(m.value::VARCHAR, 1)
                WHEN '[' THEN {{'key': 'n_' || m.key, 'value': to_json(json_array_length(m.value))}}
                WHEN '{{' THEN {{'key': 'n_' || m.key, 'value': to_json(len(json_keys(m.value)))}}
                ELSE {{'key': m.key, 'value': m.value}} END))) END"""


def _repeats_a_key(obj: str) -> str:
    """Whether the JSON object `obj` has a key twice (a crafted line: it cannot be made a map)."""
    return f"len(json_keys({obj})) <> len(list_distinct(json_keys({obj})))"


def _numeric(obj: str) -> str:
    """The numeric members of the JSON object `obj` (anything else would make a counter event invalid)."""
    return f"""CASE WHEN NOT regexp_matches({obj}::VARCHAR, ':\\s*[^-0-9\\s]') THEN {obj}  -- numbers only
        WHEN {_repeats_a_key(obj)} THEN '{{}}'::JSON
        ELSE to_json(map_from_entries(list_filter(map_entries({obj}::MAP(VARCHAR, JSON)),
                                                  lambda m: json_type(m.value) IN ('BIGINT', 'UBIGINT', 'DOUBLE'))))
        END"""


# the spans and instants shown (within the cap), as trace events (chosen on their keys, their attributes
# joined back by row id: trace_sql.create_drawn_spans); the counters' candidates are a table, with `shown`
_SPANS = f"""
    SELECT 'X' AS ph, name, domain AS cat, {us('start_ns')} AS ts, round((end_ns - start_ns) / 1000.0, 3) AS dur,
           proc + 1 AS pid, tid, {_compact('attrs')} AS args
    FROM trace_span"""

_INSTANTS = f"""
    WITH c AS (SELECT rowid AS record_row, proc, ts_ns, tid, {capped('proc, name', 'ts_ns')} AS shown
               FROM record WHERE {EVENT_RECORD} AND NOT ({FOLDED}) AND {window_filter('ts_ns')}),
    drawn AS (SELECT * FROM c WHERE shown)
    SELECT 'i' AS ph, r.name, r.domain AS cat, {us('d.ts_ns')} AS ts, 't' AS s, d.proc + 1 AS pid, t.tid,
           {_compact('r.attrs')} AS args
    FROM drawn d JOIN trace_thread t ON t.proc = d.proc AND t.raw_tid IS NOT DISTINCT FROM d.tid
    JOIN record r ON r.rowid = d.record_row"""

_BATCH_COUNTER = """SELECT proc, '{cat}' AS domain, '{name}' AS name, start_ns AS ts_ns, 0 AS pos,
                           json_merge_patch('{{}}', json_object({values})) AS vals
                    FROM batch WHERE {where} AND {window}"""

_COUNTERS = f"""
    CREATE OR REPLACE TEMP TABLE trace_counter AS
    WITH src AS (
        SELECT proc, domain, name, ts_ns, pos, {_numeric('vals')} AS vals
        FROM counter WHERE {window_filter('ts_ns')} AND json_type(vals) = 'OBJECT'
        UNION ALL
        SELECT proc, 'BatchSchedule', 'tokens', start_ns, 0,
               json_object('total', total_scheduled_tokens, 'prefill', prefill_tokens, 'decode', decode_tokens)
        FROM batch WHERE total_scheduled_tokens IS NOT NULL AND {window_filter('start_ns')}
        UNION ALL {_BATCH_COUNTER.format(
            cat="KVCache", name="kvcache", window=window_filter('start_ns'),
            where="kv_total_blocks IS NOT NULL AND proc NOT IN (SELECT proc FROM counter WHERE name = 'kvcache')",
            values="'total_blocks', kv_total_blocks, 'used_blocks', kv_used_blocks, 'usage', kv_usage")}
        UNION ALL {_BATCH_COUNTER.format(
            cat="BatchSchedule", name="queues", window=window_filter('start_ns'),
            where="running IS NOT NULL AND proc NOT IN (SELECT proc FROM counter WHERE name = 'queues')",
            values="'running', running, 'waiting', waiting")}),
    changed AS (
        SELECT *, vals::VARCHAR IS DISTINCT FROM lag(vals::VARCHAR) OVER (PARTITION BY proc, name ORDER BY ts_ns, pos)
                  AS new_value
        FROM src WHERE vals::VARCHAR <> '{{}}')
    SELECT name, domain AS cat, ts_ns, proc + 1 AS pid, vals, {rank_in_second('proc, name', 'ts_ns')} AS rank_in_second
    FROM changed WHERE new_value"""


def _queries() -> dict[str, str]:
    """kind -> query whose rows are trace events (columns named as the trace's keys)."""
    return {
        "span": _SPANS,
        "instant": _INSTANTS,
        "counter": f"""SELECT 'C' AS ph, name, cat, {us('ts_ns')} AS ts, pid, 0 AS tid, vals AS args
                       FROM trace_counter WHERE rank_in_second <= {{cap}}""",
        **trace_requests.queries(),
    }

def _metadata_events(run: AnalysisRun, requests_pid: int) -> list[dict[str, object]]:
    """Process and thread names and order (overlap lanes named after their thread, below it)."""
    sort_of = {"api_server": 0, "engine_core": 2}
    events: list[dict[str, object]] = []

    def meta(kind: str, pid: int, tid: int, /, **args: object) -> None:
        events.append({"ph": "M", "name": kind, "pid": pid, "tid": tid, "args": args})

    for p in run.processes:
        meta("process_name", p.index + 1, 0, name=f"{p.role or 'process'} {p.key}")
        meta("process_sort_index", p.index + 1, 0, sort_index=sort_of.get(p.role, 3))
        if p.dropped:  # drops are shown in the trace, never hidden (Perfetto shows process labels)
            meta("process_labels", p.index + 1, 0, labels=f"dropped {p.dropped} records")
    pid_of = {p.index: p.pid for p in run.processes}
    lanes: dict[int, list[int]] = {}
    for tid, lane in run.con.execute("SELECT DISTINCT tid, lane FROM trace_lane ORDER BY tid, lane").fetchall():
        lanes.setdefault(int(tid), []).append(int(lane))
    for proc, tid, raw_tid in run.con.execute("SELECT proc, tid, raw_tid FROM trace_thread").fetchall():
        label = "main" if raw_tid == pid_of.get(proc) else "thread"
        meta("thread_name", proc + 1, tid, name=f"{label} {raw_tid}")
        meta("thread_sort_index", proc + 1, tid, sort_index=tid * 1024)  # recorded thread id order
        for lane in lanes.get(tid, ()):
            meta("thread_name", proc + 1, tid + lane * OVERLAP_LANE, name=f"{label} {raw_tid} overlap {lane}")
            meta("thread_sort_index", proc + 1, tid + lane * OVERLAP_LANE, sort_index=tid * 1024 + lane)
    meta("process_name", requests_pid, 0, name="Requests")
    meta("process_sort_index", requests_pid, 0, sort_index=1)
    for tid, name in trace_requests.thread_names(run.con):
        meta("thread_name", requests_pid, tid, name=name)
        meta("thread_sort_index", requests_pid, tid, sort_index=tid - REQUEST_TIDS)  # arrival order
    return events


def _collection_events(run: AnalysisRun, origin: int, lo: int, hi: int) -> list[dict[str, object]]:
    """Collection switched on / off, as recorded by each process (those before the first record, the state
    the run started in, are left out: the trace starts there)."""
    return [{"ph": "i", "s": "p", "name": "collection " + ("on" if enabled else "off"), "cat": "profiler",
             "ts": round((ts - origin) / 1000, 3), "pid": proc + 1, "tid": 0, "args": {"reason": reason}}
            for proc, ts, enabled, reason in run.states if max(origin, lo) <= ts <= hi]


def _cap_within(con: duckdb.DuckDBPyConnection, max_per_second: int, max_events: int | None) -> int:
    """The cap of events of one name per process per second: `max_per_second`, or the largest lower cap
    whose trace holds at most about `max_events` events (None or 0: no bound), at least 1. Counts what
    each cap would keep, per name, process and second (requests: per second of arrival,
    `REQUEST_EVENTS` each), from the tables the trace is drawn from."""
    if not max_events:
        return max_per_second
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE trace_bucket AS
        SELECT count(*) AS n, 1 AS weight FROM span WHERE {window_filter('start_ns', 'end_ns')}
        GROUP BY proc, name, {second('start_ns')}
        UNION ALL SELECT count(*), 1 FROM event WHERE NOT ({FOLDED}) AND {window_filter('ts_ns')}
        GROUP BY proc, name, {second('ts_ns')}
        UNION ALL SELECT count(*), 1 FROM trace_counter GROUP BY pid, name, {second('ts_ns')}
        UNION ALL SELECT n, {REQUEST_EVENTS} FROM ({trace_requests.ARRIVALS_PER_SECOND})""")

    def events(cap: int) -> int:
        return _count(con, f"SELECT coalesce(sum(least(n, {cap}) * weight), 0) FROM trace_bucket")

    if events(max_per_second) <= max_events:
        return max_per_second
    low, high = 1, max_per_second  # the largest cap within the bound lies in [low, high)
    while high - low > 1:
        middle = (low + high) // 2
        if events(middle) <= max_events:
            low = middle
        else:
            high = middle
    return low


def write_trace(run: AnalysisRun, path: Path, window: tuple[float, float] | None = None,
                max_per_second: int = DEFAULT_MAX_PER_SECOND, max_events: int | None = DEFAULT_MAX_EVENTS,
                quiet: bool = False) -> Path:
    con = run.con
    first = con.execute("SELECT min(ts_ns) FROM record WHERE ts_ns IS NOT NULL").fetchone()
    origin = (int(first[0]) // 1_000_000_000) * 1_000_000_000 if first and first[0] is not None else 0
    lo, hi = (origin + int(window[0] * 1e9), origin + int(window[1] * 1e9)) if window else (-(2 ** 62), 2 ** 62)
    requests_pid = len(run.processes) + 1
    con.execute(f"SET VARIABLE origin = {origin}")
    con.execute(f"SET VARIABLE lo = {lo}")
    con.execute(f"SET VARIABLE hi = {hi}")
    con.execute(f"SET VARIABLE requests_pid = {requests_pid}")
    con.execute(f"SET VARIABLE request_tid_base = {REQUEST_TIDS}")
    con.execute("""CREATE OR REPLACE TEMP TABLE trace_thread AS
                   SELECT proc, tid AS raw_tid, (row_number() OVER (ORDER BY proc, tid))::INTEGER AS tid
                   FROM (SELECT DISTINCT proc, tid FROM record WHERE kind IN ('span', 'event'))""")
    overlap_lanes = build_lanes(con, window_filter("s.start_ns", "s.end_ns"))
    con.execute(_COUNTERS)
    per_second = _cap_within(con, int(max_per_second), max_events)
    if per_second < max_per_second and not quiet:
        print(f"trace: at most {per_second:,} events of one name per process per second (not "
              f"{max_per_second:,}), to hold about {max_events:,} events; --window START:END draws a part of the "
              "run at the full rate, --trace-max-events a larger trace", file=sys.stderr)
    cap = str(per_second)
    create_drawn_spans(con, per_second)
    capped = {"counter": _count(con, f"SELECT count(*) FILTER (WHERE rank_in_second > {cap}) FROM trace_counter")}
    trace_requests.prepare(con, per_second)
    capped["request"] = _count(con, "SELECT count(*) FILTER (WHERE NOT shown) FROM trace_request")
    eligible = {
        "span": _count(con, f"SELECT count(*) FROM span WHERE {window_filter('start_ns', 'end_ns')}"),
        "instant": _count(con, f"SELECT count(*) FROM event WHERE NOT ({FOLDED}) AND {window_filter('ts_ns')}")}
    folded = _count(con, f"SELECT count(*) FROM event WHERE {FOLDED} AND {window_filter('ts_ns')}")
    collection = _collection_events(run, origin, lo, hi)
    with scratch_dir(path.parent, path.name) as parts, open_output(path, "wb") as out:
        queries = _queries()
        counts = dict.fromkeys(queries, 0)
        out.write(b'{"traceEvents":[')
        comma_due = False
        for kind, query in queries.items():
            written = _count(con, f"COPY ({query.replace('{cap}', cap)}) TO '{parts / kind}.json' (FORMAT json)")
            if kind in eligible:
                capped[kind] = eligible[kind] - written
            with (parts / f"{kind}.json").open("rb") as fh:
                counts[kind], comma_due = _copy_as_elements(fh, out, comma_due)
        # the names after the events (the viewers read them anywhere)
        for event in _metadata_events(run, requests_pid) + collection:
            out.write((b"," if comma_due else b"") + json.dumps(event, separators=(",", ":")).encode())
            comma_due = True
        counts["collection"] = len(collection)
        # reported per kind of track content: a request's slices together, a flow's two ends together
        counts["request"] += counts.pop("request_phase")
        counts["flow"] = counts.pop("flow_start") + counts.pop("flow_end")
        metadata = {"generator": "service-profiler", "origin_epoch_ns": origin,
                    "origin_utc": datetime.fromtimestamp(origin / 1e9, tz=timezone.utc).isoformat(),
                    "time_convention": "ts/dur: microseconds since origin_epoch_ns",
                    "processes": [p.key for p in run.processes], "max_events_per_name_per_second": per_second,
                    "max_events": max_events or None,
                    "max_events_per_name_per_second_asked": max_per_second,
                    "window_s": list(window) if window else None, "events": counts,
                    "capped_events": capped, "folded_events": {"KVCache/allocate": folded},
                    "overlap_lanes": overlap_lanes, "dropped_records": sum(p.dropped for p in run.processes),
                    "reader_problems": len(run.problems)}
        out.write(('],"displayTimeUnit":"ms","metadata":' + json.dumps(metadata) + "}").encode())
    return path


_BLOCK_BYTES = 1 << 22


def _copy_as_elements(events: IO[bytes], out: IO[bytes], comma_due: bool) -> tuple[int, bool]:
    """Copy newline-delimited JSON (DuckDB's COPY: one event per line, a newline inside a string escaped)
    into `out` as array elements, a block at a time: each newline becomes the comma before the next
    element. `comma_due`: an element was written before. Returns the events copied and `comma_due` after.
    Line by line in Python this was a third of the trace's time on a 1 M-record run."""
    copied = 0
    for block in iter(partial(events.read, _BLOCK_BYTES), b""):
        copied += block.count(b"\n")
        if comma_due:
            out.write(b",")
        ends_an_event = block.endswith(b"\n")
        out.write((block[:-1] if ends_an_event else block).replace(b"\n", b","))
        comma_due = ends_an_event  # else the next block goes on with the same event
    return copied, comma_due


def _count(con: duckdb.DuckDBPyConnection, query: str) -> int:
    """The single number a query (a count, or a COPY's rows written) returns."""
    row = con.execute(query).fetchone()
    return int(row[0]) if row else 0


class TraceExporter:
    name = "json"

    def __init__(self, window: tuple[float, float] | None = None, max_per_second: int = DEFAULT_MAX_PER_SECOND,
                 max_events: int | None = DEFAULT_MAX_EVENTS, quiet: bool = False) -> None:
        self.window, self.max_per_second, self.max_events, self.quiet = window, max_per_second, max_events, quiet

    def export(self, run: AnalysisRun, out_dir: Path) -> list[Path]:
        return [write_trace(run, out_dir / "chrome_tracing.json", self.window, self.max_per_second, self.max_events,
                            self.quiet)]
