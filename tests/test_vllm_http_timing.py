"""TTFT and e2e as a client sees them, on a real `vllm serve` (CPU build, tiny model) under load.

A client measures each request itself (examples/timed_client.py: one thread, every read stamped as it
arrives) while more requests are in flight than vLLM runs at once (--max-num-seqs), streamed and not,
completions and chat. request.csv and the trace must give, for every request, a TTFT and an e2e within
10 ms of the client's, and never more than 2 ms above it (a server cannot see the first token leave
after the client received it; 2 ms allows for the two processes' reads of one clock), and the
breakdown's parts must add up to them.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from timed_client import TimedRequest, TimedResponse, run_timed
from vllm_service import PROMPTS, running_server

from service_profiler.columns import PART_COLUMNS

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

MAX_NUM_SEQS = 4
CONCURRENCY = 12
REQUESTS = 32
BELOW_MS, ABOVE_MS = 10.0, 2.0


@dataclass
class Measured:
    responses: list[TimedResponse]
    rows: dict[str, dict[str, str]]  # api_rid -> request.csv row
    trace: dict[str, Any]
    analysis: Path


def _requests(model: str) -> list[TimedRequest]:
    out = []
    for i in range(REQUESTS):
        prompt = PROMPTS[i % len(PROMPTS)] + f" {i}"
        stream = i % 2 == 0
        body: dict[str, Any] = {"model": model, "max_tokens": 4 + (i * 7) % 28, "temperature": 0,
                                "ignore_eos": True, "stream": stream}
        if i % 4 < 2:
            out.append(TimedRequest("/v1/completions", {**body, "prompt": prompt}))
        else:
            out.append(TimedRequest("/v1/chat/completions",
                                    {**body, "messages": [{"role": "user", "content": prompt}]}))
    return out


@pytest.fixture(scope="module")
def measured(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Measured:
    root = tmp_path_factory.mktemp("http-timing")
    config = root / "ms_service_profiler_config.json"
    config.write_text(json.dumps({"enable": 1, "prof_dir": str(root / "prof")}))
    env = {"SERVICE_PROF_CONFIG_PATH": str(config), "PROFILING_SYMBOLS_PATH": str(root / "symbols.yaml")}
    with running_server(tiny_model, root / "server.log", profiler_env=env,
                        extra_args=["--max-num-seqs", str(MAX_NUM_SEQS)]) as server:
        run_timed(server.port, _requests(server.model)[:2], 2)  # warm-up, not measured
        with _client_first(server.process.pid):
            responses = run_timed(server.port, _requests(server.model), CONCURRENCY)
        time.sleep(2.0)  # every process flushes
    bad = [(r.status(), r.body()[:200]) for r in responses if r.status() != 200]
    assert not bad, bad
    (run_dir,) = list((root / "prof").iterdir())
    out = root / "analysis"
    proc = subprocess.run([sys.executable, "-m", "service_profiler.cli", "analyze", "--input-path", str(run_dir),
                           "--output-path", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(out / "request.csv", newline="") as handle:
        rows = {row["api_rid"]: row for row in csv.DictReader(handle)}
    trace = json.loads((out / "chrome_tracing.json").read_text())
    return Measured(responses, rows, trace, out)


@contextmanager
def _client_first(server_pgid: int) -> Iterator[None]:
    """The reference client reads each segment as it arrives. Kernel receive stamps make it immune to
    waiting for a CPU only while it keeps up: segments left unread are merged, and a merged segment
    carries the newest stamp. On a machine with more busy processes than cores (the server's EngineCore
    busy-polls), the server runs at a lower priority than the client, and the client at a higher one
    where it may (CAP_SYS_NICE)."""
    os.setpriority(os.PRIO_PGRP, server_pgid, 10)
    before = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, -10)
    except PermissionError:
        pass
    try:
        yield
    finally:
        os.setpriority(os.PRIO_PROCESS, 0, before)


def _row(measured: Measured, response: TimedResponse) -> dict[str, str]:
    response_id = response.response_id()
    found = [row for api_rid, row in measured.rows.items() if api_rid.startswith(response_id)]
    assert len(found) == 1, (response_id, found)
    return found[0]


def _check_gaps(label: str, gaps: list[float], responses: list[TimedResponse]) -> None:
    ordered = sorted(gaps)
    print(f"\n{label}: client - server, ms: min {ordered[0]:.2f} median {statistics.median(ordered):.2f} "
          f"p90 {ordered[int(0.9 * (len(ordered) - 1))]:.2f} max {ordered[-1]:.2f} (n={len(ordered)})")
    wrong = [(round(gap, 2), r.request.path, r.request.stream, round(r.ttft_ms, 2), round(r.e2e_ms, 2))
             for gap, r in zip(gaps, responses, strict=True) if not -ABOVE_MS <= gap <= BELOW_MS]
    assert not wrong, (label, wrong)


def test_the_load_queued_requests_in_the_engine(measured: Measured) -> None:
    queued = [float(r["engine_queue_ms"]) for r in measured.rows.values() if r["engine_queue_ms"]]
    assert len(queued) == REQUESTS + 2 and max(queued) > 20.0
    assert {r["stream"] for r in measured.rows.values()} == {"True", "False"}
    assert {r["arrival_source"] for r in measured.rows.values()} == {"http"}
    assert {e["args"]["arrival_source"] for e in measured.trace["traceEvents"]
            if e.get("name") == "httpExchange"} == {"kernel"}


# events the server writes together with the first token: vLLM's chat stream opens with a role-only delta
FIRST_EVENTS = {"/v1/completions": 1, "/v1/chat/completions": 2}


def _merged(response: TimedResponse, row: dict[str, str]) -> bool:
    """Whether the client's kernel handed it the first event (streamed) or the headers (not streamed)
    in one read with later data although the server wrote them apart: on an overloaded machine the
    client (or the network stack's own processing) falls behind, and a read carries the stamp of its
    newest segment, so the client cannot time its first token. Either the first token came with the
    last byte, or (streamed) with the events of later tokens."""
    first = response.first_event_ns if response.request.stream else response.first_byte_ns
    if first == response.last_byte_ns and float(row["decode_delivery_ms"]) > 5.0:
        return True
    return response.request.stream and response.first_read_events > FIRST_EVENTS[response.request.path]


def _ttft_gaps(measured: Measured, server_ttft: dict[str, float]) -> tuple[list[float], list[TimedResponse]]:
    """Client − server TTFT per request; a gap out of bounds on a merged measurement is left out
    (counted: at most 3 of the requests)."""
    gaps, timed, excused = [], [], 0
    for response in measured.responses:
        row = _row(measured, response)
        gap = response.ttft_ms - server_ttft[row["rid"]]
        if not -ABOVE_MS <= gap <= BELOW_MS and _merged(response, row):
            excused += 1
            continue
        gaps.append(gap)
        timed.append(response)
    print(f"\nfirst tokens the client could not time (read with later data, out of bounds): {excused}")
    assert excused <= 3
    return gaps, timed


def test_request_csv_ttft_and_e2e_match_the_client(measured: Measured) -> None:
    e2e = []
    for response in measured.responses:
        row = _row(measured, response)
        e2e.append(response.e2e_ms - float(row["e2e_ms"]))
        # the reference's columns carry the same numbers
        assert float(row["first_token_latency(ms)"]) == float(row["ttft_ms"])
        assert float(row["execution_time(ms)"]) == float(row["e2e_ms"])
    ttft, timed = _ttft_gaps(measured, {r["rid"]: float(r["ttft_ms"]) for r in measured.rows.values()})
    _check_gaps("TTFT", ttft, timed)
    _check_gaps("e2e", e2e, measured.responses)


def test_breakdown_adds_up_to_ttft_and_e2e(measured: Measured) -> None:
    for response in measured.responses:
        row = _row(measured, response)
        parts = [float(row[name]) for name in PART_COLUMNS]
        assert all(p >= 0.0 for p in parts), row
        assert sum(parts[:5]) == pytest.approx(float(row["ttft_ms"]), abs=1e-3)
        assert sum(parts) == pytest.approx(float(row["e2e_ms"]), abs=1e-3)
        assert int(row["http_arrival_ns"]) == int(row["arrival_ns"]) <= int(row["handoff_ns"])
        # vLLM's own TTFT starts later (its renderer's start) and ends earlier (output processed, not sent)
        assert float(row["engine_ttft_ms"]) <= float(row["ttft_ms"])
        assert row["stream"] == str(response.request.stream)
        if not response.request.stream:  # nothing is sent before the API server had the last token
            assert int(row["completion_ns"]) <= int(row["first_token_sent_ns"])


def test_trace_request_tracks_match_the_client(measured: Measured) -> None:
    slices = {e["args"]["rid"]: e for e in measured.trace["traceEvents"]
              if e.get("ph") == "X" and e.get("name") == "request" and e.get("cat") == "request"}
    e2e = []
    for response in measured.responses:
        row = _row(measured, response)
        event = slices[row["rid"]]
        args = event["args"]
        assert args["arrival"] == "http"
        assert args["ttft_ms"] == pytest.approx(float(row["ttft_ms"]), abs=1e-3)
        assert event["dur"] / 1e3 == pytest.approx(float(row["e2e_ms"]), abs=1e-3)
        e2e.append(response.e2e_ms - event["dur"] / 1e3)
    ttft, timed = _ttft_gaps(measured, {rid: e["args"]["ttft_ms"] for rid, e in slices.items()})
    _check_gaps("trace TTFT", ttft, timed)
    _check_gaps("trace e2e", e2e, measured.responses)


def test_diagnose_measures_front_end_time_from_the_http_columns(measured: Measured) -> None:
    """The bottleneck analyzer on this run's analyze output (batch.csv by its msserviceprofiler column
    names, request.csv with the HTTP breakdown). Front-end time: from the HTTP arrival to the
    scheduler accepting the request (less engine steps after the hand-off) and from the engine's output
    to the last byte, every request measured, each within the bounds its own breakdown sets."""
    from service_profiler.diagnose import diagnose, load_run
    from service_profiler.diagnose.rules import FRONT_END_BASIS, BusyIntervals, front_end_ms

    view = load_run(measured.analysis)
    doc = diagnose(view)
    s = doc["signals"]
    print(f"\nfront end: median {s['front_end_ms_p50']:.2f} ms ({s['front_end_share_p50']:.1%} of e2e; before "
          f"{s['front_end_before_ms_p50']:.2f}, after {s['front_end_after_ms_p50']:.2f}), step p50 "
          f"{s['step_ms_p50']:.2f} ms; verdicts {[v['kind'] for v in doc['verdicts']]}")
    assert s["front_end_requests"] == REQUESTS + 2 and s["front_end_basis"] == FRONT_END_BASIS
    # more requests than sequence slots: the slots hold them back, not the front end
    assert doc["primary"] == "scheduling-bound" and "front-end-bound" not in [v["kind"] for v in doc["verdicts"]]
    busy = BusyIntervals(view.batches)
    for row in view.requests:
        before, after = front_end_ms(row, busy)
        assert before is not None and after is not None
        to_handoff = row["http_receive_ms"] + row["preprocess_ms"]
        to_engine = (row["engine_arrival_ns"] - row["http_arrival_ns"]) / 1e6
        assert to_handoff - 0.01 <= before <= to_engine + 0.01, (row["rid"], before, to_handoff, to_engine)
        assert before + after <= row["e2e_ms"] + 0.01
