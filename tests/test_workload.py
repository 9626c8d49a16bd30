"""The workload generator: cells (C, M, B, block_size) and request workloads, checked against what the
profiler recorded on the real vLLM CPU engine."""

from __future__ import annotations

import itertools
import json
import statistics
from pathlib import Path

import pytest

from service_profiler.workload import ArrivalSpec, ProfilingConfig, ProfilingRunner, WorkloadConfigError, expand_sweep
from service_profiler.workload.requests import RequestMix, WorkloadError, read_requests, write_requests


def test_a_prefix_that_leaves_no_token_of_its_own_is_refused() -> None:
    with pytest.raises(WorkloadConfigError, match="M=4 blocks of 32 tokens = 128 prefix tokens"):
        ProfilingConfig(C=128, M=4, block_size=32)
    with pytest.raises(WorkloadConfigError, match="profiling_type 'both'"):
        ProfilingConfig(profiling_type="both")


def test_a_sweep_is_the_cross_product_of_its_values() -> None:
    cells = expand_sweep(ProfilingConfig(), {"C": [128, 256], "B": [4, 8, 16], "M": []})
    assert [(c.C, c.B) for c in cells] == [(128, 4), (128, 8), (128, 16), (256, 4), (256, 8), (256, 16)]
    assert len({c.name for c in cells}) == 6


def test_arrival_processes_have_the_asked_rate_and_burstiness() -> None:
    poisson = ArrivalSpec("poisson", rate=10.0).arrival_times(4000, seed=1)
    bursty = ArrivalSpec("gamma", rate=10.0, burstiness=0.25).arrival_times(4000, seed=1)
    gaps_p = [b - a for a, b in itertools.pairwise(poisson)]
    gaps_b = [b - a for a, b in itertools.pairwise(bursty)]
    assert statistics.mean(gaps_p) == pytest.approx(0.1, rel=0.06)
    assert statistics.mean(gaps_b) == pytest.approx(0.1, rel=0.12)
    cv = lambda gaps: statistics.pstdev(gaps) / statistics.mean(gaps)  # noqa: E731
    assert cv(gaps_p) == pytest.approx(1.0, abs=0.08)
    assert cv(gaps_b) == pytest.approx(2.0, abs=0.3)  # gamma shape k: CV = 1/sqrt(k)
    assert ArrivalSpec("closed", concurrency=3).arrival_times(5, 0) == [0.0] * 5


def test_request_mixes_share_exactly_the_asked_prefix_and_round_trip(tmp_path: Path) -> None:
    requests = RequestMix(20, (100, 140), (4, 8), prefix_tokens=64, seed=3).build(ArrivalSpec("poisson", 5.0), 512)
    assert all(r.token_ids is not None and len(r.token_ids) == r.prompt_tokens for r in requests)
    first = requests[0].token_ids or ()
    assert all((r.token_ids or ())[:64] == first[:64] for r in requests)
    assert len({(r.token_ids or ())[64] for r in requests}) > 10  # the rest is each request's own
    path = write_requests(requests, tmp_path / "w.jsonl")
    again = read_requests(path, 512)
    assert [(r.rid, r.token_ids, r.output_tokens) for r in again] == [(r.rid, r.token_ids, r.output_tokens)
                                                                      for r in requests]


def test_a_bad_trace_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"rid": "a", "arrival_s": 0, "prompt_tokens": 5, "output_tokens": 2}\n'
                    '{"rid": "b", "prompt_tokens": 3}\n')
    with pytest.raises(WorkloadError, match=r"t.jsonl:2: needs numeric prompt_tokens"):
        read_requests(path, 512)


@pytest.mark.vllm
def test_cells_run_as_asked_on_the_real_engine(tiny_model: Path, tmp_path: Path) -> None:
    cells = [ProfilingConfig(C=96, M=2, B=4, block_size=32, profiling_type="mixed", num_warmup=1,
                             num_measurements=2, decode_tokens=6),
             ProfilingConfig(C=128, M=0, B=3, block_size=32, profiling_type="prefill", num_warmup=0,
                             num_measurements=2)]
    doc = ProfilingRunner(tiny_model, tmp_path, name="cells").run(cells)
    assert json.loads((tmp_path / "cells_results.json").read_text()) == doc
    mixed, prefill = doc["cells"]
    # M: every measured request found its 2 x 32 prefix tokens in the prefix cache (the profiler's record).
    assert mixed["checks"]["M"]["observed_hit_tokens"] == [64] and mixed["checks"]["M"]["requests"] == 8
    assert mixed["cache"]["hit_rate"] == pytest.approx(64 / 96)
    # B: the measured steps held exactly B requests: one prefill step and 5 decode steps per repetition.
    assert mixed["checks"]["B"]["observed_sizes"] == [4] and mixed["steps_measured"] == 2 * 6
    assert prefill["checks"]["B"]["observed_sizes"] == [3] and prefill["steps_measured"] == 2
    assert prefill["checks"]["M"]["observed_hit_tokens"] == [0]
    assert doc["all_checks_passed"]
    for cell in (mixed, prefill):
        st = cell["step_time_ms"]
        assert 0 < st["p50"] <= st["p99"] and st["cv"] is not None
        assert cell["throughput"]["prompt_tokens_per_s"] > 0 and cell["prefill_latency_ms"]["n"] > 0
    assert mixed["decode_latency_ms_per_token"]["n"] == 8
    assert any(Path(doc["run_dirs"][0]).glob("*.sprof.jsonl"))
