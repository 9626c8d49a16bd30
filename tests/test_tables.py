"""The analysis tables (`service_profiler.columnar`, what `service-profiler analyze` exports) against the
synthetic generator's ground truth: request and batch metrics, KV cache rows, state transitions,
lifecycle events, per-iteration request states, and the joins that take a process or a step apart."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from raw_files import write_run
from synthetic import SyntheticConfig, SyntheticRun, generate_run

from service_profiler.columnar.iterations import ITERATION_COLUMNS
from service_profiler.columnar.run import AnalysisRun, analyze_run
from service_profiler.rawdata.rawfile import RunData, read_run

METRICS = ("ttft_ms", "queue_ms", "e2e_ms", "prefill_ms", "decode_ms", "tpot_ms")


@contextmanager
def _analysis(path: Path) -> Iterator[AnalysisRun]:
    run = analyze_run([path])
    try:
        yield run
    finally:
        run.close()


def _table(path: Path, table: str, order: str = "row_no") -> list[dict[str, Any]]:
    with _analysis(path) as run:
        return run.dicts(f"SELECT * FROM {table} ORDER BY {order}")


@pytest.fixture(scope="module")
def busy(tmp_path_factory: pytest.TempPathFactory) -> SyntheticRun:
    """Two data-parallel engines on another host's clock, a KV cache small enough to preempt."""
    cfg = SyntheticConfig(requests=160, output_tokens=24, max_num_seqs=24, num_gpu_blocks=260, dp_size=2,
                          engine_hostname="engine-host", engine_mono_offset_ns=987_654_321_000, seed=11)
    return generate_run(tmp_path_factory.mktemp("busy"), cfg)


@pytest.fixture(scope="module")
def busy_tables(busy: SyntheticRun) -> dict[str, list[dict[str, Any]]]:
    with _analysis(busy.run_dir) as run:
        return {name: run.dicts(f"SELECT * FROM {name} ORDER BY {order}") for name, order in (
            ("request", "row_no"), ("batch", "batch_row"), ("kvcache", "row_no"), ("lifecycle_event", "row_no"),
            ("state_transition", "row_no"), ("iteration", "batch_row, kind, pos"))}


def test_request_metrics_match_ground_truth(busy: SyntheticRun, busy_tables: dict[str, Any]) -> None:
    rows = {r["rid"]: r for r in busy_tables["request"]}
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
        assert (row["complete"], row["incomplete_reason"]) == (1, "")


def test_batch_metrics_match_ground_truth(busy: SyntheticRun, busy_tables: dict[str, Any]) -> None:
    rows = {(r["dp_rank"], r["batch_id"]): r for r in busy_tables["batch"]}
    assert len(rows) == len(busy.batches) == len(busy_tables["batch"])
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
    starts = [r["start_ns"] for r in busy_tables["batch"]]
    assert starts == sorted(starts)


def test_regression_units_and_queue_time(busy: SyntheticRun, busy_tables: dict[str, Any]) -> None:
    """The reference's TTFT/queue were 1000x too small and its queue wait was about the whole lifetime."""
    rows = busy_tables["request"]
    ttft, e2e, queue = (np.array([r[c] for r in rows], dtype=float) for c in ("ttft_ms", "e2e_ms", "queue_ms"))
    true_ttft = np.array([busy.requests[r["rid"]].ttft_ms for r in rows])
    assert np.allclose(ttft / true_ttft, 1.0)
    assert np.all(ttft > 1.0), "TTFT of a step-based engine is milliseconds, not microseconds"
    assert np.all(queue < e2e)
    assert np.median(queue / e2e) < 0.9


def test_engine_only_run_times_from_engine(tmp_path: Path) -> None:
    synth = generate_run(tmp_path / "run", SyntheticConfig(requests=12, output_tokens=5, seed=2))
    next(p for p in synth.files if "-4100." in p.name).unlink()  # no API-server file (offline LLM)
    rows = {r["rid"]: r for r in _table(synth.run_dir, "request")}
    assert set(rows) == set(synth.requests)
    for rid, truth in synth.requests.items():
        row = rows[rid]
        assert row["timing_source"] == "engine"
        assert row["arrival_ns"] == truth.engine_arrival_ns
        assert row["queue_ms"] == pytest.approx(truth.queue_ms, abs=1e-9)
        # the engine produces the first token before the API server sees it
        assert truth.first_scheduled_ns < row["first_token_ns"] < truth.first_token_ns
        assert row["output_tokens"] == truth.output_tokens
        assert row["completion_ns"] < truth.completion_ns


def test_kvcache_rows_carry_status_and_blocks(busy: SyntheticRun, busy_tables: dict[str, Any]) -> None:
    """The reference zeroed kvcache.csv when free events and status samples mixed."""
    kv = busy_tables["kvcache"]
    assert {d["name"] for d in kv} == {"allocate", "free", "kvcache"}
    alloc_rows = [d for d in kv if d["name"] == "allocate"]
    assert sum(d["blocks_allocated"] for d in alloc_rows) == sum(b.blocks_allocated for b in busy.batches)
    assert sum(d["blocks_freed"] or 0 for d in kv) == sum(b.blocks_freed for b in busy.batches)
    status_after_first = [d for d in kv[1:] if d["name"] != "kvcache"]
    assert all(d["total_blocks"] == 260 for d in status_after_first if d["used_blocks"] is not None)
    assert max(d["used_blocks"] for d in kv if d["used_blocks"] is not None) > 0
    assert [d["ts_ns"] for d in kv] == sorted(d["ts_ns"] for d in kv)


def test_state_transitions_and_events(busy: SyntheticRun, busy_tables: dict[str, Any]) -> None:
    by_rid: dict[str, list[dict[str, Any]]] = {}
    for d in busy_tables["state_transition"]:
        by_rid.setdefault(d["rid"], []).append(d)
    for rid, truth in busy.requests.items():
        seq = by_rid[rid]
        assert (seq[0]["from_state"], seq[0]["to_state"]) == ("NEW", "WAITING")
        assert (seq[1]["from_state"], seq[1]["to_state"]) == ("WAITING", "RUNNING")
        assert seq[-1]["to_state"] == "FINISHED_LENGTH_CAPPED"
        assert sum(1 for d in seq if d["to_state"] == "PREEMPTED") == truth.preemptions
        # admissions are recorded when schedule() returns: the queue time plus that schedule call
        assert truth.queue_ms <= seq[1]["time_in_from_state_ms"] < truth.queue_ms + 1.0
    events = busy_tables["lifecycle_event"]
    assert {"request_arrived", "request_enqueued", "request_scheduled", "first_token", "request_completed",
            "request_finished", "request_preempted", "request_resumed"} <= {e["event_type"] for e in events}
    assert sum(1 for e in events if e["event_type"] == "request_preempted") == sum(
        t.preemptions for t in busy.requests.values())
    firsts = {e["rid"]: e["ts_ns"] for e in events if e["event_type"] == "first_token"}
    assert firsts == {rid: t.first_token_ns for rid, t in busy.requests.items()}
    assert [e["ts_ns"] for e in events] == sorted(e["ts_ns"] for e in events)


def test_transitions_derived_without_state_events(tmp_path: Path, busy: SyntheticRun) -> None:
    """The same run recorded without `Request/state` events: transitions derived from the batches."""
    renamed = 0
    for path in busy.run_dir.iterdir():
        text = path.read_text(encoding="utf-8")
        renamed += text.count('"name":"state"}')
        (tmp_path / path.name).write_text(text.replace('"name":"state"}', '"name":"notState"}'), encoding="utf-8")
    assert renamed >= 2, "the engines declare the state channel"
    transitions = _table(tmp_path, "state_transition")
    seq = [d for d in transitions if d["rid"] == next(iter(busy.requests))]
    assert [d["source"] for d in seq][:2] == ["enqueue", "derived"]
    assert seq[-1]["to_state"].startswith("FINISHED")
    preempted = sum(1 for d in transitions if d["to_state"] == "PREEMPTED")
    assert preempted == sum(t.preemptions for t in busy.requests.values())
    for rid, truth in busy.requests.items():  # admitted at the start of the first step scheduling it
        running = next(d for d in transitions if d["rid"] == rid and d["to_state"] == "RUNNING")
        assert running["ts_ns"] == truth.first_scheduled_ns


def test_per_iteration_request_states(busy: SyntheticRun, busy_tables: dict[str, Any]) -> None:
    rows = busy_tables["iteration"]
    assert set(ITERATION_COLUMNS) <= set(rows[0])
    running = [r for r in rows if r["state"] != "preempted"]
    assert len(running) == sum(b.batch_size for b in busy.batches)
    assert sum(1 for r in rows if r["state"] == "preempted") == sum(t.preemptions for t in busy.requests.values())
    assert sum(1 for r in rows if r["state"] == "completed") == len(busy.requests)
    for rid, truth in busy.requests.items():
        mine = [r for r in running if r["rid"] == rid]
        assert [r["iteration"] for r in mine] == list(range(len(mine)))
        assert mine[0]["batch_start_ns"] == truth.first_scheduled_ns
        decodes = [r for r in mine if r["phase"] == "decode"]
        assert decodes[-1]["generated_tokens_before"] == truth.output_tokens - 1  # before the last step


def test_a_run_without_records_builds_empty_tables(tmp_path: Path) -> None:
    synth = generate_run(tmp_path / "run", SyntheticConfig(requests=3, output_tokens=2, seed=4))
    for path in synth.files:  # headers, channels and control lines only
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        path.write_text("".join(ln for ln in lines if not ln.startswith('{"t":"rec"')), encoding="utf-8")
    with _analysis(synth.run_dir) as run:
        assert [run.count(t) for t in ("request", "batch", "kvcache", "iteration")] == [0, 0, 0, 0]
        assert len(run.processes) == 2


def test_model_exec_recorded_by_another_process_joins_on_host_and_dp_rank(tmp_path: Path) -> None:
    synth = generate_run(tmp_path / "run", SyntheticConfig(requests=10, output_tokens=4, seed=8))
    run = read_run([synth.run_dir])
    engine = next(p for p in run.processes if p.role == "engine_core")
    worker = replace(engine, index=len(run.processes), key=f"{engine.hostname}:9999", pid=9999, role="VllmWorker-0",
                     meta={"role": "VllmWorker-0"})
    run.processes.append(worker)
    # the executor's spans come from the worker process, without a dp_rank attribute
    run.spans = [s._replace(proc=worker.index, attrs={"batch_id": s.attrs["batch_id"]})
                 if s.name == "modelExec" and s.attrs else s for s in run.spans]
    batches = _table(write_run(run, tmp_path / "split"), "batch", "batch_row")
    model = {d["batch_id"]: d["model_run_ms"] for d in batches}
    assert model == pytest.approx({b.batch_id: b.model_run_ms for b in synth.batches})


def test_empty_steps_are_batches_of_size_zero(tmp_path: Path) -> None:
    synth = generate_run(tmp_path / "run", SyntheticConfig(requests=4, output_tokens=3, seed=1))
    run: RunData = read_run([synth.run_dir])
    last = max(s.end_ns for s in run.spans)
    template = next(s for s in run.spans if s.name == "batchFrameworkProcessing")
    run.spans.append(template._replace(start_ns=last + 1000, end_ns=last + 2000,
                                       attrs={"batch_id": 10_000, "dp_rank": 0, "reqs": [], "running": 0,
                                              "waiting": 0, "preempted": [], "finished": []}))
    rows = _table(write_run(run, tmp_path / "with_empty"), "batch", "batch_row")
    empty = rows[-1]
    assert (empty["batch_id"], empty["batch_size"], empty["batch_type"], empty["model_run_ms"]) == (10_000, 0, "", None)
    assert len(rows) == len(synth.batches) + 1
