"""The workload generator against a running server over HTTP: arrival schedules computed up front from a
seed (checked statistically, no server needed), trace replay and re-timing, and one short run against a
real `vllm serve` (CPU build, tiny model) under the profiler."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scipy import stats

from service_profiler.workload import ArrivalSpec, ProfilingRunner
from service_profiler.workload.http_client import HttpTarget, served_model
from service_profiler.workload.requests import RequestMix, WorkloadError, read_requests, retime, write_requests


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def test_arrival_schedules_follow_their_distribution() -> None:
    # Kolmogorov-Smirnov against the asked inter-arrival law (seeded: the same answer every run), and
    # against the wrong one, to show the test can tell them apart.
    rate = 20.0
    poisson = _gaps(ArrivalSpec("poisson", rate=rate).arrival_times(3000, seed=11))
    assert stats.kstest(poisson, stats.expon(scale=1 / rate).cdf).pvalue > 0.01
    bursty = _gaps(ArrivalSpec("gamma", rate=rate, burstiness=0.3).arrival_times(3000, seed=11))
    assert stats.kstest(bursty, stats.gamma(0.3, scale=1 / (rate * 0.3)).cdf).pvalue > 0.01
    assert stats.kstest(bursty, stats.expon(scale=1 / rate).cdf).pvalue < 1e-6
    smooth = _gaps(ArrivalSpec("gamma", rate=rate, burstiness=4.0).arrival_times(3000, seed=11))
    assert stats.variation(smooth) == pytest.approx(0.5, abs=0.05)  # CV = 1/sqrt(shape)


def test_the_schedule_is_fixed_by_the_seed_before_anything_is_sent() -> None:
    arrival = ArrivalSpec("gamma", rate=8.0, burstiness=0.5)
    first = RequestMix(16, (8, 32), (2, 6), seed=4).build(arrival, 512)
    again = RequestMix(16, (8, 32), (2, 6), seed=4).build(arrival, 512)
    other = RequestMix(16, (8, 32), (2, 6), seed=5).build(arrival, 512)
    assert first == again
    assert [r.arrival_s for r in first] != [r.arrival_s for r in other]
    assert [r.arrival_s for r in first] == sorted(r.arrival_s for r in first) and first[0].arrival_s == 0.0


def test_a_trace_keeps_its_times_or_is_retimed(tmp_path: Path) -> None:
    requests = RequestMix(400, (8, 16), (2, 3), seed=1).build(ArrivalSpec("burst"), 512)
    trace = write_requests([r.__class__(r.rid, 0.5 * i, r.prompt_tokens, r.output_tokens, r.token_ids)
                            for i, r in enumerate(requests)], tmp_path / "t.jsonl")
    replayed = read_requests(trace, 512)
    assert [r.arrival_s for r in retime(replayed, ArrivalSpec("trace"), 0)] == [0.5 * i for i in range(400)]
    faster = retime(replayed, ArrivalSpec("poisson", rate=50.0), seed=2)
    assert [r.token_ids for r in faster] == [r.token_ids for r in replayed]
    assert stats.kstest(_gaps([r.arrival_s for r in faster]), stats.expon(scale=1 / 50.0).cdf).pvalue > 0.01
    closed = retime(replayed, ArrivalSpec("closed", concurrency=2), seed=2)
    assert {r.arrival_s for r in closed} == {0.0}
    with pytest.raises(WorkloadError, match="takes the times from the trace"):
        ArrivalSpec("trace").arrival_times(3, 0)


def test_server_urls_and_an_unreachable_server_are_named() -> None:
    assert HttpTarget.from_url("127.0.0.1:8123") == HttpTarget("127.0.0.1", 8123)
    assert HttpTarget.from_url("http://localhost:9000/").port == 9000
    with pytest.raises(WorkloadError, match="http://HOST:PORT"):
        HttpTarget.from_url("https://example.invalid")
    result = subprocess.run([sys.executable, "-m", "service_profiler.cli", "workload", "--server",
                             "http://127.0.0.1:9", "--arrival", "poisson"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "cannot reach the server" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "-m", "service_profiler.cli", "workload", "--arrival", "poisson"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--model is required (or --server URL" in result.stderr


@pytest.mark.vllm
@pytest.mark.slow
def test_a_running_server_is_driven_on_schedule(tiny_model: Path, tmp_path: Path) -> None:
    from vllm_service import running_server

    config = tmp_path / "ms_service_profiler_config.json"
    config.write_text(json.dumps({"enable": 1, "prof_dir": str(tmp_path / "prof")}))
    env = {"SERVICE_PROF_CONFIG_PATH": str(config), "PROFILING_SYMBOLS_PATH": str(tmp_path / "symbols.yaml")}
    out = tmp_path / "open"
    with running_server(tiny_model, tmp_path / "server.log", profiler_env=env) as server:
        (run_dir,) = list((tmp_path / "prof").iterdir())
        started = time.monotonic()
        # open loop, gamma arrivals, through the command line; the server's profiler run read back
        result = subprocess.run(
            [sys.executable, "-m", "service_profiler.cli", "workload", "--server", f"http://127.0.0.1:{server.port}",
             "--arrival", "gamma", "--rate", "8", "--burstiness", "0.5", "--num-requests", "10",
             "--prompt-tokens", "16", "48", "--output-tokens", "4", "8", "--seed", "3",
             "--server-run-dir", str(run_dir), "--output-dir", str(out), "--name", "open"],
            capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        # closed loop replay of the same trace through the API
        target = HttpTarget("127.0.0.1", server.port, served_model(HttpTarget("127.0.0.1", server.port))[0])
        replay = read_requests(out / "open_workload.jsonl", 512)
        closed = ProfilingRunner(target.model, tmp_path / "closed", "closed").run_over_http(
            target, replay, ArrivalSpec("closed", concurrency=3))
        print(f"\nserver workload runs: {time.monotonic() - started:.1f} s")
    doc = json.loads((out / "open_results.json").read_text())
    assert set(doc) >= {"name", "model", "run_dirs", "workload", "metrics", "requests_missing", "step_time_ms",
                        "memory", "arrival"}
    rows = doc["client_requests"]
    schedule = [r.arrival_s for r in RequestMix(10, (16, 48), (4, 8), seed=3).build(
        ArrivalSpec("gamma", rate=8.0, burstiness=0.5), 512)]
    assert [r["scheduled_s"] for r in rows] == pytest.approx(schedule, abs=1e-6)
    assert all(r["status"] == 200 and r["error"] is None for r in rows), rows
    for r, asked in zip(rows, replay, strict=True):
        assert r["output_tokens"] == asked.output_tokens and r["prompt_tokens"] == asked.prompt_tokens
        assert r["sent_s"] >= r["scheduled_s"] - 0.001  # never early
        assert 0 < r["ttft_ms"] <= r["e2e_ms"]
    metrics = doc["metrics"]
    assert metrics["requests"] == 10 and metrics["failed"] == 0 and metrics["ttft_ms_p50"] > 0
    # the server's profiler saw the same requests: their prompts, and steps in the client's window
    assert doc["server_requests_recorded"] == 10 and doc["step_time_ms"]["n"] > 0
    assert doc["run_dirs"] == [str(run_dir)] and metrics["prefix_cache_hit_rate"] is not None
    assert closed["metrics"]["requests"] == 10 and closed["arrival"]["process"] == "closed"
    assert {r["scheduled_s"] for r in closed["client_requests"]} == {0.0}
