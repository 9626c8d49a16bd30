"""The CSV files of `service-profiler analyze` (request, batch, kvcache, summaries, per-iteration states,
lifecycle events, state transitions): msserviceprofiler's columns first, values against the synthetic
generator's ground truth or hand-computed expectations."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from raw_files import write_run
from synthetic import SyntheticConfig, SyntheticRun, generate_run

from service_profiler.rawdata.rawfile import EventRecord, ProcessInfo, RunData, SpanRecord

# msserviceprofiler's header lines, verbatim.
REQUEST_HEADER = ("http_rid,start_datetime,recv_token_size,reply_token_size,execution_time(ms),queue_wait_time(ms),"
                  "first_token_latency(ms),cache_hit_rate")
BATCH_HEADER = ("name,res_list,start_time,end_time,during_time(ms),batch_type,prof_id,total_batch_size,total_blocks,"
                "used_blocks,free_blocks,blocks_allocated,blocks_freed,kvcache_usage_rate,Prefill_batch_size,"
                "Decode_batch_size,Prefill_scheduled_tokens,Decode_scheduled_tokens,total_scheduled_tokens,dp_rank")
KVCACHE_HEADER = ("domain,name,start_time,total_blocks,used_blocks,free_blocks,blocks_allocated,blocks_freed,"
                  "kvcache_usage_rate")
SUMMARY_HEADER = ["Metric", "Average", "Max", "Min", "P50", "P90", "P99"]


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _header(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as fh:
        return next(csv.reader(fh))


def _analyze_csv(run_dir: Path, out: Path) -> Path:
    done = subprocess.run([sys.executable, "-m", "service_profiler.cli", "analyze", "--input-path", str(run_dir),
                           "--output-path", str(out), "--format", "csv", "--quiet"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[SyntheticRun, Path]:
    base = tmp_path_factory.mktemp("csv")
    synth = generate_run(base / "run", SyntheticConfig(requests=60, output_tokens=12, max_num_seqs=16,
                                                       num_gpu_blocks=150, seed=5))
    out = _analyze_csv(synth.run_dir, base / "out")
    assert {p.name for p in out.iterdir()} == {
        "request.csv", "batch.csv", "kvcache.csv", "request_summary.csv", "batch_summary.csv",
        "service_summary.csv", "per_iteration_requests.csv", "events.csv", "state_transitions.csv"}
    return synth, out


def test_reference_columns_first_in_exact_order(exported: tuple[SyntheticRun, Path]) -> None:
    _, out = exported
    for name, ref in (("request.csv", REQUEST_HEADER), ("batch.csv", BATCH_HEADER), ("kvcache.csv", KVCACHE_HEADER)):
        header = _header(out / name)
        assert (out / name).read_text().startswith(ref + ","), name
        assert len(header) > ref.count(",") + 1, f"{name} has our extra columns"
        assert len(set(header)) == len(header), f"{name} repeats a column name"
    assert _header(out / "request_summary.csv") == SUMMARY_HEADER
    assert _header(out / "batch_summary.csv") == SUMMARY_HEADER
    assert _header(out / "service_summary.csv") == ["Metric", "Value"]


def test_request_csv_values_are_right(exported: tuple[SyntheticRun, Path]) -> None:
    """Regression: the reference's first_token_latency and queue_wait_time were 1000x too small."""
    synth, out = exported
    rows = _read(out / "request.csv")
    assert len(rows) == len(synth.requests)
    for row in rows:
        truth = synth.requests[row["rid"]]
        assert row["http_rid"] == truth.api_rid
        assert float(row["first_token_latency(ms)"]) == pytest.approx(truth.ttft_ms, abs=1e-6)
        assert float(row["queue_wait_time(ms)"]) == pytest.approx(truth.queue_ms, abs=1e-6)
        assert float(row["execution_time(ms)"]) == pytest.approx(truth.e2e_ms, abs=1e-6)
        assert float(row["tpot_ms"]) == pytest.approx(truth.tpot_ms, abs=1e-6)
        assert int(row["recv_token_size"]) == truth.input_tokens
        assert int(row["reply_token_size"]) == truth.output_tokens
        assert row["start_datetime"].endswith("Z") and row["start_datetime"].startswith("2025-")
        assert int(row["arrival_ns"]) == truth.arrival_ns
        assert row["process"] == "synth-host:4200"


def test_kvcache_csv_not_zero_with_mixed_events(exported: tuple[SyntheticRun, Path]) -> None:
    synth, out = exported
    rows = _read(out / "kvcache.csv")
    assert {r["name"] for r in rows} == {"allocate", "free", "kvcache"}
    assert sum(int(r["blocks_allocated"]) for r in rows) == sum(b.blocks_allocated for b in synth.batches)
    assert sum(int(r["blocks_freed"]) for r in rows) == sum(b.blocks_freed for b in synth.batches)
    status = [r for r in rows if r["name"] == "free" and r["used_blocks"]]
    assert status and all(int(r["total_blocks"]) == 150 for r in status)
    assert max(int(r["used_blocks"]) for r in rows if r["used_blocks"]) > 0


def test_batch_csv(exported: tuple[SyntheticRun, Path]) -> None:
    synth, out = exported
    rows = _read(out / "batch.csv")
    assert len(rows) == len(synth.batches)
    first = rows[0]
    assert first["name"] == "batchFrameworkProcessing"
    assert first["prof_id"] == "4200"
    assert first["res_list"].startswith('[["cmpl-')
    for row, truth in zip(rows, synth.batches, strict=True):
        assert int(row["total_batch_size"]) == truth.batch_size
        assert float(row["model_run_ms"]) == pytest.approx(truth.model_run_ms, abs=1e-9)
        assert float(row["during_time(ms)"]) == pytest.approx(truth.schedule_ms, abs=1e-9)


def test_summaries(exported: tuple[SyntheticRun, Path]) -> None:
    synth, out = exported
    req = {r["Metric"]: r for r in _read(out / "request_summary.csv")}
    assert list(req)[:7] == ["first_token_latency", "subsequent_token_latency", "total_time", "exec_time",
                             "waiting_time", "input_token_num", "generated_token_num"]
    ttft = np.array([t.ttft_ms for t in synth.requests.values()])
    assert float(req["first_token_latency"]["Average"]) == pytest.approx(ttft.mean())
    assert float(req["first_token_latency"]["P90"]) == pytest.approx(np.percentile(ttft, 90))
    batch = {r["Metric"]: r for r in _read(out / "batch_summary.csv")}
    assert list(batch)[:4] == ["prefill_batch_num", "decode_batch_num", "prefill_exec_time", "decode_exec_time"]
    assert batch["decode_exec_time"]["Average"] != ""
    svc = {r["Metric"]: r["Value"] for r in _read(out / "service_summary.csv")}
    assert list(svc)[:4] == ["total_input_token_num", "total_generated_token_num", "generate_token_speed",
                             "generate_all_token_speed"]
    out_tokens = sum(t.output_tokens for t in synth.requests.values())
    assert int(svc["total_generated_token_num"]) == out_tokens
    window = (max(t.completion_ns for t in synth.requests.values())
              - min(t.arrival_ns for t in synth.requests.values())) / 1e9
    assert float(svc["generate_token_speed"]) == pytest.approx(out_tokens / window)


def _identical_batches_run() -> RunData:
    """Three identical decode batches of 10 ms and one of 40 ms, and one prefill batch of 30 ms."""
    proc = ProcessInfo(index=0, key="h:1", hostname="h", pid=1, ppid=0, role="engine_core", argv=[],
                       engine=None, profiler_version="", wall_offset_ns=0)
    spans, t = [], 1_000_000_000
    for bid, (phase, model_ms) in enumerate([(0, 30), (1, 10), (1, 10), (1, 10), (1, 40)]):
        reqs = [["r1", phase, 100 if phase == 0 else 1, 0 if phase == 0 else 100 + bid, 100, 0]]
        spans.append(SpanRecord(0, "BatchSchedule", "batchFrameworkProcessing", t, t + 100_000, 1,
                                {"batch_id": bid, "reqs": reqs}))
        spans.append(SpanRecord(0, "ModelExecute", "modelExec", t + 200_000, t + 200_000 + model_ms * 1_000_000, 1,
                                {"batch_id": bid}))
        t += 100_000_000
    events = [EventRecord(0, "Request", "enqueue", 999_000_000, 1, {"rid": "r1", "prompt_tokens": 100})]
    return RunData(processes=[proc], spans=sorted(spans, key=lambda s: s.start_ns), events=events)


def test_batch_summary_keeps_identical_batches_and_exec_times(tmp_path: Path) -> None:
    """Regression: the reference collapsed identical batches and dropped exec times. Percentiles
    interpolate linearly between the sorted values (numpy's default)."""
    out = _analyze_csv(write_run(_identical_batches_run(), tmp_path / "run"), tmp_path / "out")
    rows = {r["Metric"]: r for r in _read(out / "batch_summary.csv")}
    decode = rows["decode_exec_time"]
    assert float(decode["Average"]) == pytest.approx(17.5)  # (10+10+10+40)/4, not 25
    assert float(decode["P50"]) == pytest.approx(10.0)
    assert float(decode["P90"]) == pytest.approx(10 + 0.7 * 30)  # 90 % of the way: between 10 (3rd) and 40 (4th)
    assert float(decode["P99"]) == pytest.approx(10 + 0.97 * 30)
    assert (float(decode["Max"]), float(decode["Min"])) == (40.0, 10.0)
    assert float(rows["prefill_exec_time"]["Max"]) == pytest.approx(30.0)
    assert float(rows["decode_batch_num"]["Average"]) == pytest.approx(1.0)
    assert float(rows["model_run_ms"]["Average"]) == pytest.approx(20.0)


def test_per_iteration_lifecycle_csvs_and_quoting(tmp_path: Path) -> None:
    synth = generate_run(tmp_path / "run", SyntheticConfig(requests=8, output_tokens=4, seed=1))
    for path in synth.files:  # a client-chosen request id with a comma and a quote must survive
        text = path.read_text()
        rid = next(iter(synth.requests))
        path.write_text(text.replace(rid, json.dumps('odd,"id')[1:-1]))
    _analyze_csv(synth.run_dir, tmp_path / "out")
    rows = _read(tmp_path / "out" / "per_iteration_requests.csv")
    assert _header(tmp_path / "out" / "per_iteration_requests.csv")[:6] == [
        "batch_id", "dp_rank", "process", "batch_start_ns", "rid", "state"]
    assert len(rows) == sum(b.batch_size for b in synth.batches)
    odd = [r for r in rows if r["rid"] == 'odd,"id']
    assert len(odd) == 4 and odd[-1]["state"] == "completed"
    events = _read(tmp_path / "out" / "events.csv")
    assert _header(tmp_path / "out" / "events.csv")[:3] == ["ts_ns", "ts_datetime", "event_type"]
    assert any(e["rid"] == 'odd,"id' and e["event_type"] == "first_token" for e in events)
    states = _read(tmp_path / "out" / "state_transitions.csv")
    assert {s["to_state"] for s in states} >= {"WAITING", "RUNNING", "FINISHED_LENGTH_CAPPED"}
    assert all(s["ts_datetime"].endswith("Z") for s in states)
