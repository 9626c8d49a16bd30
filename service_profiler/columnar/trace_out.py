"""Chrome / Perfetto trace (chrome_tracing.json), bounded: at most `max_per_second` events of one name per
process per second of the run (the rest are counted in metadata.capped_events), and optionally only a
time window (`window`, seconds since the run's first timestamp).

Timestamps: `ts`/`dur` in microseconds relative to `metadata.origin_epoch_ns` (the run's first timestamp
floored to a whole second), so ns precision survives in a double. Layout:
- one process per raw file (pid = file index + 1), named "<role> <host>:<pid>", API server first;
- small tids unique in the trace, each named after the recorded thread id; spans are `X` slices, and a
  span partly overlapping an earlier one on its thread goes to that thread's "overlap" lane;
- events are thread-scoped instants (except per-request KVCache.allocate: the kvcache counter shows it);
- counters are `C` events, one series per numeric value;
- a "Requests" process, one thread per request: a `request` slice holding adjacent `http receive` /
  `preprocess` / `queued` / `prefill` / `decode` / `respond` slices (the HTTP ones where the HTTP server
  was recorded: the slice then runs from the HTTP arrival to the last byte written) and a `first token
  sent` instant; its args carry the request table's client-facing `ttft_ms` and `e2e_ms`.
DuckDB writes each kind of event as a JSON array file; they are concatenated into the trace.
"""

from __future__ import annotations

import json
from pathlib import Path

from service_profiler.outputs import open_output, scratch_dir

from .run import AnalysisRun

DEFAULT_MAX_PER_SECOND = 2_000
OVERLAP_LANE = 1 << 20  # added to a tid for its overlap lane
FOLDED = "NOT (domain = 'KVCache' AND name = 'allocate')"


def _us(column: str) -> str:
    return f"round(({column} - getvariable('origin')) / 1000.0, 3)"


def _window_filter(column: str, end_column: str | None = None) -> str:
    end = end_column or column
    return f"{end} >= getvariable('lo') AND {column} <= getvariable('hi')"


def _queries(cap: int) -> dict[str, str]:
    """kind -> query whose rows are trace events (columns named as the trace's keys)."""
    capped = "row_number() OVER (PARTITION BY proc, name, (ts_ns - getvariable('origin')) // 1000000000 ORDER BY ts_ns)"
    return {
        "span": f"""
            WITH s AS (
                SELECT proc, tid, domain, name, start_ns AS ts_ns, end_ns, attrs,
                       max(end_ns) OVER (PARTITION BY proc, tid ORDER BY start_ns, end_ns DESC
                                         ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS earlier_end
                FROM span WHERE {_window_filter('start_ns', 'end_ns')}),
            c AS (SELECT *, {capped} AS n FROM s)
            SELECT 'X' AS ph, name, domain AS cat, {_us('ts_ns')} AS ts, round((end_ns - ts_ns) / 1000.0, 3) AS dur,
                   c.proc + 1 AS pid,
                   t.tid + CASE WHEN earlier_end > ts_ns AND earlier_end < end_ns THEN {OVERLAP_LANE} ELSE 0 END AS tid,
                   coalesce(CAST(json_merge_patch(attrs, '{{"reqs": null}}') AS JSON), '{{}}') AS args
            FROM c JOIN trace_thread t ON t.proc = c.proc AND t.raw_tid IS NOT DISTINCT FROM c.tid
            WHERE n <= {cap}""",
        "instant": f"""
            WITH c AS (SELECT *, {capped} AS n FROM event WHERE {FOLDED} AND {_window_filter('ts_ns')})
            SELECT 'i' AS ph, name, domain AS cat, {_us('ts_ns')} AS ts, 't' AS s, c.proc + 1 AS pid, t.tid,
                   coalesce(attrs, '{{}}') AS args
            FROM c JOIN trace_thread t ON t.proc = c.proc AND t.raw_tid IS NOT DISTINCT FROM c.tid
            WHERE n <= {cap}""",
        "counter": f"""
            WITH c AS (SELECT *, {capped} AS n FROM counter WHERE {_window_filter('ts_ns')})
            SELECT 'C' AS ph, name, {_us('ts_ns')} AS ts, proc + 1 AS pid, 0 AS tid, vals AS args
            FROM c WHERE n <= {cap}""",
        # the request's life as adjacent slices between boundaries made monotonic (the API server's and
        # the engine's clocks may disagree by a little): HTTP arrival, body read, engine arrival, first
        # scheduled, first token, completion, last byte written; an empty slice is left out
        "request": f"""
            WITH r AS (
                SELECT row_no AS tid, rid, arrival_source, ttft_ms, e2e_ms, arrival_ns AS b0,
                       greatest(arrival_ns, coalesce(body_received_ns, arrival_ns)) AS b1, engine_arrival_ns,
                       first_scheduled_ns, first_token_ns, completion_ns, last_byte_sent_ns
                FROM request
                WHERE arrival_ns IS NOT NULL AND coalesce(last_byte_sent_ns, completion_ns) >= arrival_ns
                  AND {_window_filter('arrival_ns', 'coalesce(last_byte_sent_ns, completion_ns)')}),
            -- without the HTTP server's records, the engine's phases start at the request's arrival
            b2 AS (SELECT *, CASE WHEN arrival_source = 'http' THEN greatest(b1, coalesce(engine_arrival_ns, b1))
                                  ELSE b1 END AS b2 FROM r),
            b3 AS (SELECT *, greatest(b2, coalesce(first_scheduled_ns, b2)) AS b3 FROM b2),
            b4 AS (SELECT *, greatest(b3, coalesce(first_token_ns, b3)) AS b4 FROM b3),
            b5 AS (SELECT *, greatest(b4, coalesce(completion_ns, b4)) AS b5 FROM b4),
            b AS (SELECT *, greatest(b5, coalesce(last_byte_sent_ns, b5)) AS b6 FROM b5),
            phase AS (
                SELECT tid, rid, 'request' AS name, b0 AS a, b6 AS z, 0 AS k,
                       json_object('rid', rid, 'arrival', arrival_source, 'ttft_ms', ttft_ms, 'e2e_ms', e2e_ms) AS args
                FROM b
                UNION ALL SELECT tid, rid, 'http receive', b0, b1, 1, json_object('rid', rid) FROM b
                UNION ALL SELECT tid, rid, 'preprocess', b1, b2, 2, json_object('rid', rid) FROM b
                UNION ALL SELECT tid, rid, 'queued', b2, b3, 3, json_object('rid', rid) FROM b
                UNION ALL SELECT tid, rid, 'prefill', b3, b4, 4, json_object('rid', rid) FROM b
                UNION ALL SELECT tid, rid, 'decode', b4, b5, 5, json_object('rid', rid) FROM b
                UNION ALL SELECT tid, rid, 'respond', b5, b6, 6, json_object('rid', rid) FROM b)
            SELECT 'X' AS ph, name, 'request' AS cat, {_us('a')} AS ts, round((z - a) / 1000.0, 3) AS dur,
                   getvariable('requests_pid') AS pid, tid, args
            FROM phase WHERE z > a OR k = 0
            ORDER BY tid, k""",
        "request_instant": f"""
            SELECT 'i' AS ph, 'first token sent' AS name, 'request' AS cat, {_us('first_token_sent_ns')} AS ts,
                   't' AS s, getvariable('requests_pid') AS pid, row_no AS tid, json_object('rid', rid) AS args
            FROM request
            WHERE first_token_sent_ns IS NOT NULL AND arrival_ns IS NOT NULL
              AND coalesce(last_byte_sent_ns, completion_ns) >= arrival_ns
              AND first_token_sent_ns BETWEEN arrival_ns AND greatest(coalesce(last_byte_sent_ns, completion_ns),
                                                                       completion_ns)
              AND {_window_filter('first_token_sent_ns')}""",
    }


def _metadata_events(run: AnalysisRun, requests_pid: int) -> list[dict[str, object]]:
    sort_of = {"api_server": 0, "engine_core": 2}
    events: list[dict[str, object]] = []
    for p in run.processes:
        events.append({"ph": "M", "name": "process_name", "pid": p.index + 1, "tid": 0,
                       "args": {"name": f"{p.role or 'process'} {p.key}"}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": p.index + 1, "tid": 0,
                       "args": {"sort_index": sort_of.get(p.role, 3)}})
    for proc, tid, raw_tid in run.con.execute("SELECT proc, tid, raw_tid FROM trace_thread").fetchall():
        for lane, suffix in ((0, ""), (OVERLAP_LANE, " overlap")):
            events.append({"ph": "M", "name": "thread_name", "pid": proc + 1, "tid": tid + lane,
                           "args": {"name": f"thread {raw_tid}{suffix}"}})
    events.append({"ph": "M", "name": "process_name", "pid": requests_pid, "tid": 0, "args": {"name": "Requests"}})
    events.append({"ph": "M", "name": "process_sort_index", "pid": requests_pid, "tid": 0, "args": {"sort_index": 1}})
    end = "coalesce(last_byte_sent_ns, completion_ns)"
    for tid, rid in run.con.execute(f"""SELECT row_no, rid FROM request WHERE arrival_ns IS NOT NULL
                                        AND {end} >= arrival_ns
                                        AND {_window_filter('arrival_ns', end)}""").fetchall():
        events.append({"ph": "M", "name": "thread_name", "pid": requests_pid, "tid": tid,
                       "args": {"name": f"req {rid}"}})
    return events


def write_trace(run: AnalysisRun, path: Path, window: tuple[float, float] | None = None,
                max_per_second: int = DEFAULT_MAX_PER_SECOND) -> Path:
    con = run.con
    first = con.execute("SELECT min(ts_ns) FROM record WHERE ts_ns IS NOT NULL").fetchone()
    origin = (int(first[0]) // 1_000_000_000) * 1_000_000_000 if first and first[0] is not None else 0
    lo, hi = (origin + int(window[0] * 1e9), origin + int(window[1] * 1e9)) if window else (-(2 ** 62), 2 ** 62)
    requests_pid = len(run.processes) + 1
    con.execute(f"SET VARIABLE origin = {origin}")
    con.execute(f"SET VARIABLE lo = {lo}")
    con.execute(f"SET VARIABLE hi = {hi}")
    con.execute(f"SET VARIABLE requests_pid = {requests_pid}")
    con.execute("""CREATE OR REPLACE TEMP TABLE trace_thread AS
                   SELECT proc, tid AS raw_tid, (row_number() OVER (ORDER BY proc, tid))::INTEGER AS tid
                   FROM (SELECT DISTINCT proc, tid FROM record WHERE kind IN ('span', 'event'))""")
    with scratch_dir(path.parent, path.name) as parts, open_output(path, "w", encoding="utf-8") as out:
        queries = _queries(max_per_second)
        for kind, query in queries.items():
            con.execute(f"COPY ({query}) TO '{parts / kind}.json' (FORMAT json, ARRAY true)")
        counts = dict.fromkeys(queries, 0)
        out.write('{"traceEvents":[')
        out.write(",".join(json.dumps(e, separators=(",", ":")) for e in _metadata_events(run, requests_pid)))
        for kind in queries:
            with (parts / f"{kind}.json").open(encoding="utf-8") as fh:
                for line in fh:  # "[", then one event per line (ending "," but the last), then "]"
                    line = line.strip()
                    if line not in ("[", "]", ""):
                        out.write("," + line.rstrip(","))
                        counts[kind] += 1
        metadata = {"generator": "service-profiler", "origin_epoch_ns": origin,
                    "time_convention": "ts/dur: microseconds since origin_epoch_ns",
                    "processes": [p.key for p in run.processes], "max_events_per_name_per_second": max_per_second,
                    "window_s": list(window) if window else None, "events": counts}
        out.write('],"displayTimeUnit":"ms","metadata":' + json.dumps(metadata) + "}")
    return path


class TraceExporter:
    name = "json"

    def __init__(self, window: tuple[float, float] | None = None, max_per_second: int = DEFAULT_MAX_PER_SECOND) -> None:
        self.window, self.max_per_second = window, max_per_second

    def export(self, run: AnalysisRun, out_dir: Path) -> list[Path]:
        return [write_trace(run, out_dir / "chrome_tracing.json", self.window, self.max_per_second)]
