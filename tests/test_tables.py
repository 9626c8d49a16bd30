from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from synthetic import SyntheticConfig, SyntheticRun, generate_run

from service_profiler.analyze.lifecycle import ITERATION_COLUMNS, iter_request_states
from service_profiler.analyze.tables import AnalysisTables, Table, build_tables
from service_profiler.rawdata.rawfile import RunData, read_run

METRICS = ("ttft_ms", "queue_ms", "e2e_ms", "prefill_ms", "decode_ms", "tpot_ms")


def _analyze(synth: SyntheticRun) -> tuple[RunData, AnalysisTables]:
    run = read_run([synth.run_dir])
    return run, build_tables(run)


@pytest.fixture(scope="module")
def busy(tmp_path_factory: pytest.TempPathFactory) -> SyntheticRun:
    """Two data-parallel engines on another host's clock, a KV cache small enough to preempt."""
    cfg = SyntheticConfig(requests=160, output_tokens=24, max_num_seqs=24, num_gpu_blocks=260, dp_size=2,
                          engine_hostname="engine-host", engine_mono_offset_ns=987_654_321_000, seed=11)
    return generate_run(tmp_path_factory.mktemp("busy"), cfg)


def test_request_metrics_match_ground_truth(busy: SyntheticRun) -> None:
    _, tables = _analyze(busy)
    rows = {r["rid"]: r for r in tables.requests.dicts()}
    assert set(rows) == set(busy.requests)
    assert sum(t.preemptions for t in busy.requests.values()) > 0, "the scenario must preempt"
    for rid, truth in busy.requests.items():
        row = rows[rid]
        for metric in METRICS:
            assert row[metric] == pytest.approx(getattr(truth, metric), abs=1e-9), (rid, metric)
        assert row["input_tokens"] == truth.input_tokens
        assert row["output_tokens"] == truth.output_tokens
        assert row["preemptions"] == truth.preemptions
        assert row["prefix_hit_tokens"] == truth.prefix_hit_tokens
        assert row["kv_blocks"] == truth.peak_blocks
        assert row["api_rid"] == truth.api_rid
        assert row["dp_rank"] == truth.dp_rank
        assert row["finish_reason"] == "length"
        assert row["timing_source"] == "api"


def test_batch_metrics_match_ground_truth(busy: SyntheticRun) -> None:
    _, tables = _analyze(busy)
    rows = {(r["dp_rank"], r["batch_id"]): r for r in tables.batches.dicts()}
    assert len(rows) == len(busy.batches)
    for truth in busy.batches:
        row = rows[(truth.dp_rank, truth.batch_id)]
        for name in ("schedule_ms", "model_run_ms", "step_ms"):
            assert row[name] == pytest.approx(getattr(truth, name), abs=1e-9)
        for name in ("batch_size", "num_prefill_reqs", "num_decode_reqs", "total_scheduled_tokens",
                     "blocks_allocated", "blocks_freed", "kv_used_blocks"):
            assert row[name] == getattr(truth, name), name
        assert row["start_ns"] == truth.start_ns
        expected_type = {(True, True): "Prefill,Decode", (True, False): "Prefill", (False, True): "Decode",
                         (False, False): ""}[(truth.num_prefill_reqs > 0, truth.num_decode_reqs > 0)]
        assert row["batch_type"] == expected_type
        assert row["prefill_tokens"] + row["decode_tokens"] == row["total_scheduled_tokens"]


def test_regression_units_and_queue_time(busy: SyntheticRun) -> None:
    """The reference's TTFT/queue were 1000x too small and its queue wait was about the whole lifetime."""
    _, tables = _analyze(busy)
    r = tables.requests
    ttft, e2e, queue = r.column("ttft_ms"), r.column("e2e_ms"), r.column("queue_ms")
    true_ttft = np.array([busy.requests[rid].ttft_ms for rid in r.values("rid")])
    ratio = ttft / true_ttft
    assert np.allclose(ratio, 1.0)
    assert np.all(ttft > 1.0), "TTFT of a step-based engine is milliseconds, not microseconds"
    assert np.all(queue < e2e)
    assert np.median(queue / e2e) < 0.9


def test_engine_only_run_times_from_engine(tmp_path: Path) -> None:
    synth = generate_run(tmp_path / "run", SyntheticConfig(requests=12, output_tokens=5, seed=2))
    next(p for p in synth.files if "-4100." in p.name).unlink()  # no API-server file (offline LLM)
    _, tables = _analyze(synth)
    rows = {r["rid"]: r for r in tables.requests.dicts()}
    for rid, truth in synth.requests.items():
        row = rows[rid]
        assert row["timing_source"] == "engine"
        assert row["arrival_ns"] == truth.engine_arrival_ns
        assert row["queue_ms"] == pytest.approx(truth.queue_ms, abs=1e-9)
        # the engine produces the first token before the API server sees it
        assert truth.first_scheduled_ns < row["first_token_ns"] < truth.first_token_ns
        assert row["output_tokens"] == truth.output_tokens
        assert row["completion_ns"] < truth.completion_ns


def test_kvcache_rows_carry_status_and_blocks(busy: SyntheticRun) -> None:
    """The reference zeroed kvcache.csv when free events and status samples mixed."""
    _, tables = _analyze(busy)
    kv = tables.kvcache
    names = set(kv.values("name"))
    assert names == {"allocate", "free", "kvcache"}
    alloc_rows = [d for d in kv.dicts() if d["name"] == "allocate"]
    assert sum(d["blocks_allocated"] for d in alloc_rows) == sum(b.blocks_allocated for b in busy.batches)
    status_after_first = [d for d in kv.dicts()[1:] if d["name"] != "kvcache"]
    assert all(d["total_blocks"] == 260 for d in status_after_first if d["used_blocks"] is not None)
    assert np.nanmax(kv.column("used_blocks")) > 0
    assert kv.values("ts_ns") == sorted(kv.values("ts_ns"))


def test_state_transitions_and_events(busy: SyntheticRun) -> None:
    _, tables = _analyze(busy)
    by_rid: dict[str, list[dict]] = {}
    for d in tables.state_transitions.dicts():
        by_rid.setdefault(d["rid"], []).append(d)
    for rid, truth in busy.requests.items():
        seq = by_rid[rid]
        assert (seq[0]["from_state"], seq[0]["to_state"]) == ("NEW", "WAITING")
        assert (seq[1]["from_state"], seq[1]["to_state"]) == ("WAITING", "RUNNING")
        assert seq[-1]["to_state"] == "FINISHED_LENGTH_CAPPED"
        assert sum(1 for d in seq if d["to_state"] == "PREEMPTED") == truth.preemptions
        # admissions are recorded when schedule() returns: the queue time plus that schedule call
        assert truth.queue_ms <= seq[1]["time_in_from_state_ms"] < truth.queue_ms + 1.0
    kinds = set(tables.events.values("event_type"))
    assert {"request_arrived", "request_enqueued", "request_scheduled", "first_token", "request_completed",
            "request_finished", "request_preempted", "request_resumed"} <= kinds
    assert tables.events.values("ts_ns") == sorted(tables.events.values("ts_ns"))


def test_transitions_derived_without_state_events(busy: SyntheticRun) -> None:
    run, _ = _analyze(busy)
    run.events = [e for e in run.events if e.name != "state"]
    tables = build_tables(run)
    seq = [d for d in tables.state_transitions.dicts() if d["rid"] == next(iter(busy.requests))]
    assert [d["source"] for d in seq][:2] == ["enqueue", "derived"]
    assert seq[-1]["to_state"].startswith("FINISHED")
    preempted = sum(1 for d in tables.state_transitions.dicts() if d["to_state"] == "PREEMPTED")
    assert preempted == sum(t.preemptions for t in busy.requests.values())


def test_per_iteration_request_states(busy: SyntheticRun) -> None:
    _, tables = _analyze(busy)
    rows = list(iter_request_states(tables))
    assert all(len(r) == len(ITERATION_COLUMNS) for r in rows)
    running = [r for r in rows if r[5] != "preempted"]
    assert len(running) == sum(b.batch_size for b in busy.batches)
    assert sum(1 for r in rows if r[5] == "preempted") == sum(t.preemptions for t in busy.requests.values())
    assert sum(1 for r in rows if r[5] == "completed") == len(busy.requests)
    rid = next(iter(busy.requests))
    mine = [r for r in running if r[4] == rid]
    assert [r[11] for r in mine] == list(range(len(mine)))  # iteration index
    decodes = [r for r in mine if r[6] == "decode"]
    assert decodes[-1][12] == busy.requests[rid].output_tokens - 1  # tokens generated before the last step


def test_table_column_helpers() -> None:
    t = Table("t", ["a", "b", "c"], [(1, "x", (1, 2)), (None, "y", ())])
    a = t.column("a")
    assert a.dtype == np.float64 and a[0] == 1.0 and math.isnan(a[1])
    assert t.column("b").dtype == object
    assert set(t.numeric_columns()) == {"a"}
    assert t.dicts()[1] == {"a": None, "b": "y", "c": ()}


def test_empty_run_builds_empty_tables() -> None:
    tables = build_tables(RunData())
    assert len(tables.requests) == 0 and len(tables.batches) == 0 and len(tables.kvcache) == 0


def test_model_exec_recorded_by_another_process_joins_on_host_and_dp_rank(tmp_path: Path) -> None:
    synth = generate_run(tmp_path / "run", SyntheticConfig(requests=10, output_tokens=4, seed=8))
    run = read_run([synth.run_dir])
    engine = next(p for p in run.processes if p.role == "engine_core")
    worker = replace(engine, index=len(run.processes), key=f"{engine.hostname}:9999", pid=9999, role="VllmWorker-0")
    run.processes.append(worker)
    # the executor's spans come from the worker process, without a dp_rank attribute
    run.spans = [s._replace(proc=worker.index, attrs={"batch_id": s.attrs["batch_id"]})
                 if s.name == "modelExec" and s.attrs else s for s in run.spans]
    model = {d["batch_id"]: d["model_run_ms"] for d in build_tables(run).batches.dicts()}
    assert model == pytest.approx({b.batch_id: b.model_run_ms for b in synth.batches})


def test_empty_steps_are_batches_of_size_zero(tmp_path: Path) -> None:
    synth = generate_run(tmp_path / "run", SyntheticConfig(requests=4, output_tokens=3, seed=1))
    run = read_run([synth.run_dir])
    last = max(s.end_ns for s in run.spans)
    template = next(s for s in run.spans if s.name == "batchFrameworkProcessing")
    run.spans.append(template._replace(start_ns=last + 1000, end_ns=last + 2000,
                                           attrs={"batch_id": 10_000, "dp_rank": 0, "reqs": [], "running": 0,
                                                  "waiting": 0, "preempted": [], "finished": []}))
    rows = build_tables(run).batches.dicts()
    empty = rows[-1]
    assert (empty["batch_size"], empty["batch_type"], empty["model_run_ms"]) == (0, "", None)
    assert len(rows) == len(synth.batches) + 1
