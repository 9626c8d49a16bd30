"""The request breakdown (columnar/breakdown.py: the HTTP server's view of each request), its request track
in the trace, and the shared clock anchor of one host's processes, on hand-made raw files with known
answers, through the DuckDB pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from raw_writer import RawRun
from trace_check import validate_trace

from service_profiler.columnar.run import analyze_run
from service_profiler.columnar.trace_out import write_trace
from service_profiler.columns import BREAKDOWN_COLUMNS, PART_COLUMNS

MS = 1_000_000
T0 = 1_700_000_000_000_000_000  # epoch ns


def _run(directory: Path, *, first_body_ms: float = 40.0, stream: bool = True, with_http: bool = True) -> Path:
    """One request: HTTP arrival at 0, body read at 2 ms, handed to the engine at 10 ms, enqueued at
    11, scheduled at 20 (step ends at 30), API has the first token at 32, sent at `first_body_ms`,
    last token at 70, last byte at 72 (ms after T0). A second request has no HTTP data."""
    run = RawRun()
    api = run.process("h", 100, "api", T0 - 1_000 * MS)
    engine = run.process("h", 101, "engine", T0 - 1_000 * MS)
    http = {"rids": ["r1"], "arrival_source": "kernel", "read": 1 * MS, "status": 200, "chunks": 5,
            "body_received": 2 * MS, "response_start": 5 * MS if stream else 71 * MS,
            "first_body": int(first_body_ms * MS) if stream else 71 * MS, "last_body": 72 * MS, "end": 73 * MS}
    events: list[tuple[Any, str, float, dict[str, Any]]] = [
        (api, "httpReq", 10, {"rid": "r1", "api_rid": "a1", "prompt_tokens": 4, "stream": stream,
                              "arrival_time": (T0 + 8 * MS) / 1e9}),
        (engine, "enqueue", 11, {"rid": "r1", "prompt_tokens": 4}),
        (api, "tokens", 32, {"reqs": [["r1", 1, 0, None]]}),
        (api, "tokens", 70, {"reqs": [["r1", 3, 1, "length"]]}),
        (api, "httpRes", 70.5, {"rid": "r1", "output_tokens": 4, "finish_reason": "length"}),
        (engine, "enqueue", 100, {"rid": "r2", "prompt_tokens": 4}),
    ]
    if with_http:
        events.append((api, "httpExchange", 0, http))
    for proc, name, ms, attrs in events:
        proc.event("Request", name, T0 + int(ms * MS), 1, attrs)
    engine.span("BatchSchedule", "batchFrameworkProcessing", T0 + 20 * MS, T0 + 21 * MS, 2,
                {"batch_id": 0, "reqs": [["r1", 0, 4, 0, 4, 0]]})
    engine.span("BatchSchedule", "updateFromOutput", T0 + 29 * MS, T0 + 30 * MS, 2, {"batch_id": 0, "finished": []})
    engine.span("BatchSchedule", "batchFrameworkProcessing", T0 + 101 * MS, T0 + 102 * MS, 2,
                {"batch_id": 1, "reqs": [["r2", 0, 4, 0, 4, 0]]})
    return run.write(directory)


def _rows(directory: Path) -> dict[str, dict[str, Any]]:
    analysis = analyze_run([directory])
    try:
        cursor = analysis.con.execute("SELECT * FROM request ORDER BY row_no")
        columns = [d[0] for d in cursor.description or ()]
        rows = cursor.fetchall()
    finally:
        analysis.close()
    # the breakdown, then the completeness marks last
    assert columns[-len(BREAKDOWN_COLUMNS) - 2:] == [*BREAKDOWN_COLUMNS, "complete", "incomplete_reason"]
    return {row[columns.index("rid")]: dict(zip(columns, row, strict=True)) for row in rows}


def test_streamed_request_is_timed_from_the_http_arrival_to_the_bytes_written(tmp_path: Path) -> None:
    row = _rows(_run(tmp_path))["r1"]
    assert row["arrival_source"] == "http" and row["stream"] is True and row["http_status"] == 200
    assert row["arrival_ns"] == row["http_arrival_ns"] == T0
    assert row["ttft_ms"] == pytest.approx(40.0) and row["e2e_ms"] == pytest.approx(72.0)
    parts = [row[name] for name in PART_COLUMNS]
    assert parts == pytest.approx([2.0, 8.0, 10.0, 10.0, 10.0, 32.0])
    # the engine-side columns keep their meaning; vLLM's own TTFT starts at its arrival_time (8 ms)
    assert row["queue_ms"] == pytest.approx(9.0) and row["first_token_ns"] == T0 + 32 * MS
    assert row["engine_ttft_ms"] == pytest.approx(24.0, abs=1e-3)
    assert row["engine_e2e_ms"] == pytest.approx(62.0, abs=1e-3)


def test_non_streamed_request_sends_its_first_token_with_the_response(tmp_path: Path) -> None:
    row = _rows(_run(tmp_path, stream=False))["r1"]
    assert row["ttft_ms"] == pytest.approx(71.0) and row["e2e_ms"] == pytest.approx(72.0)
    assert row["first_token_delivery_ms"] == pytest.approx(41.0) and row["decode_delivery_ms"] == pytest.approx(1.0)


def test_a_milestone_out_of_order_costs_its_part_not_the_sum(tmp_path: Path) -> None:
    # the first bytes stamped before the engine's step ended (another host's clock, say): that part is 0
    row = _rows(_run(tmp_path, first_body_ms=25.0))["r1"]
    parts = [row[name] for name in PART_COLUMNS]
    assert parts[4] == 0.0 and sum(parts) == pytest.approx(row["e2e_ms"])
    assert sum(parts[:4]) == pytest.approx(30.0)


def test_without_http_data_the_old_definitions_hold(tmp_path: Path) -> None:
    rows = _rows(_run(tmp_path, with_http=False))
    row = rows["r1"]
    assert row["arrival_source"] == "api" and row["arrival_ns"] == row["handoff_ns"] == T0 + 10 * MS
    assert row["ttft_ms"] == pytest.approx(22.0) and row["e2e_ms"] == pytest.approx(60.0)
    assert all(row[name] is None for name in PART_COLUMNS)
    assert rows["r2"]["arrival_source"] == "engine"


def test_trace_request_track_runs_from_the_http_arrival_to_the_last_byte(tmp_path: Path) -> None:
    analysis = analyze_run([_run(tmp_path / "run")])
    try:
        path = write_trace(analysis, tmp_path / "chrome_tracing.json")
    finally:
        analysis.close()
    trace = json.loads(path.read_text(encoding="utf-8"))
    assert validate_trace(trace) == []
    request = next(e for e in trace["traceEvents"] if e["name"] == "request" and e["args"]["rid"] == "r1")
    assert request["dur"] == pytest.approx(72_000.0) and request["args"]["ttft_ms"] == pytest.approx(40.0)
    track = sorted((e for e in trace["traceEvents"] if (e["pid"], e.get("tid")) == (request["pid"], request["tid"])
                    and e["ph"] in "Xi" and e["name"] != "request"), key=lambda e: e["ts"])
    slices = [(e["name"], round((e["ts"] - request["ts"]) / 1000, 6), round(e["dur"] / 1000, 6))
              for e in track if e["ph"] == "X"]
    # the HTTP parts as the request table's breakdown (2, 8, 10 ms), then prefill to the API's first token
    # (32), decode to its last (70), respond to the last byte written (72)
    assert slices == [("http receive", 0, 2), ("preprocess", 2, 8), ("queued", 10, 10), ("prefill", 20, 12),
                      ("decode", 32, 38), ("respond", 70, 2)]
    sent = next(e for e in track if e["name"] == "first token sent")
    assert sent["ts"] - request["ts"] == pytest.approx(40_000.0)


def _raw(path: Path, pid: int, wall_ns: int, mono_ns: int, boot_id: str | None, event_mono_ns: int) -> None:
    header = {"t": "header", "format": 1, "hostname": "h", "pid": pid, "ppid": 1, "role": "api", "argv": [],
              "profiler_version": "t", "engine": None, "clock": {"wall_ns": wall_ns, "mono_ns": mono_ns}}
    if boot_id is not None:
        header["boot_id"] = boot_id
    lines = [header, {"t": "chan", "id": 1, "kind": "event", "domain": "Request", "name": "enqueue"},
             {"t": "rec", "r": [[1, event_mono_ns, 1, {"rid": "x"}]]}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.mark.parametrize("boot_id", ["b-1", None])
def test_processes_of_one_boot_share_the_first_anchor(tmp_path: Path, boot_id: str | None) -> None:
    # the second process started 30 s later, after the wall clock had been stepped 150 ms ahead
    _raw(tmp_path / "h-1.sprof.jsonl", 1, wall_ns=T0, mono_ns=1_000 * MS, boot_id=boot_id,
         event_mono_ns=40_000 * MS)
    _raw(tmp_path / "h-2.sprof.jsonl", 2, wall_ns=T0 + 30_150 * MS, mono_ns=31_000 * MS, boot_id=boot_id,
         event_mono_ns=40_000 * MS)
    analysis = analyze_run([tmp_path])
    try:
        stamps = [ts for (ts,) in analysis.con.execute("SELECT ts_ns FROM event ORDER BY ts_ns").fetchall()]
    finally:
        analysis.close()
    if boot_id is None:  # older files: one host's anchors that agree within a second share one
        assert stamps[0] == stamps[1]
    else:  # one monotonic instant, one epoch time: the first process's anchor
        assert stamps == [T0 + 39_000 * MS] * 2
