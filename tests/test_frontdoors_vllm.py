"""The two environment-variable front doors on the real vLLM CPU engine (offline `vllm.LLM` in a
subprocess, the tiny local model), as their documents tell users to use them, and the same numbers from
`analyze` on the raw run recorded beside them.

- VLLM_ENABLE_SCHEDULER_PROFILING without a config file: the JSONL is complete while the engine is still
  up, has exactly the documented fields in ms, the console lines appear, the document's pandas example
  and `service-profiler scheduler-report` run on it, and analyze's batch table has the same durations.
- VLLM_SCHEDULER_LOGGING together with SERVICE_PROF_CONFIG_PATH (both doors on one run): the five CSVs
  with the documented columns in ns (written every 100 iterations while running, complete at exit), the
  waiting-queue snapshot, the document's pandas and matplotlib examples unchanged, and analyze's
  request/batch tables and its own scheduler_logs/ agreeing with them.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from frontdoor_harness import run_llm_live

from service_profiler.runtime.frontdoors.batch_lines import FIELDS
from service_profiler.runtime.frontdoors.scheduler_tables import COLUMNS

pytestmark = [pytest.mark.vllm]

FIXTURES = Path(__file__).parent / "fixtures"
CLI = [sys.executable, "-m", "service_profiler.cli"]
# Distinct first words: no two prompts share a KV block, so nothing is served from the prefix cache.
WORDS = ["Apple", "Banana", "Cherry", "Dates", "Elder", "Figs", "Grape", "Honey"]


def _prompts(n: int, repeat: int) -> list[str]:
    return [f"{WORDS[i]} {i}: " + "Large language model serving engines schedule requests. " * repeat
            for i in range(n)]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _num(value: str) -> float:
    return float(value) if value != "" else math.nan


def _analyze(raw_root: Path, out: Path) -> None:
    runs = [p for p in raw_root.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    proc = subprocess.run([*CLI, "analyze", "--input-path", str(runs[0]), "--output-path", str(out), "--format",
                           "csv", "--scheduler-logs", "--quiet"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_scheduler_profiling_jsonl_without_config(tiny_model: Path, tmp_path: Path) -> None:
    log = tmp_path / "scheduler_profiling.jsonl"
    env = {"VLLM_ENABLE_SCHEDULER_PROFILING": "true", "VLLM_SCHEDULER_PROFILING_LOG": "scheduler_profiling.jsonl",
           "VLLM_SCHEDULER_PROFILING_CONSOLE": "true"}
    max_tokens = [40, 50, 60, 70, 80, 90]  # enough steps for console lines (at most one per 0.2 s)
    started = time.time()
    outputs, output, live_lines = run_llm_live(tiny_model, tmp_path, env, _prompts(6, 2), max_tokens,
                                               lambda: _lines(log), max_num_seqs=3)
    ended = time.time()
    assert outputs == max_tokens
    lines = _jsonl(log)
    # Every step is in the file 1.5 s after the last one, while the engine is still running.
    assert live_lines == len(lines) > 0
    assert [list(line) for line in lines] == [list(FIELDS)] * len(lines)
    assert [line["batch_id"] for line in lines] == list(range(len(lines)))
    # Each request's first token comes from its prefill, each further one from a decode step of 1 token.
    assert sum(sum(line["decode_chunk_sizes"]) for line in lines) == sum(outputs) - len(outputs)
    assert sum(line["num_prefill_reqs"] for line in lines) == len(outputs)
    for line in lines:
        assert started <= line["timestamp"] <= ended
        assert line["total_scheduled_tokens"] == sum(line["prefill_chunk_sizes"]) + sum(line["decode_chunk_sizes"])
        assert 0 < line["schedule_duration_ms"] <= line["total_step_duration_ms"] < 10_000  # ms, not ns or s
        assert 0 < line["model_run_duration_ms"] <= line["total_step_duration_ms"]
        assert 0 <= line["kv_cache_usage"] <= 1
        assert line["num_running_reqs"] <= 3
    assert "[service-profiler]" in output  # the console lines

    doc = subprocess.run([sys.executable, str(FIXTURES / "scheduler_profiling_doc_example.py.txt")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert doc.returncode == 0, doc.stderr
    assert "平均调度时间" in doc.stdout and "Prefill比例" in doc.stdout

    report = subprocess.run([*CLI, "scheduler-report", str(log), "-o", str(tmp_path / "report")],
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    assert f"batches: {len(lines)}" in report.stdout
    assert len(list((tmp_path / "report").glob("*.png"))) == 6

    # The raw run written beside it gives analyze's batch table the same numbers.
    _analyze(tmp_path / "scheduler_profiling_raw", tmp_path / "analysis")
    batches = {int(row["batch_id"]): row for row in _csv(tmp_path / "analysis" / "batch.csv")}
    assert sorted(batches) == [line["batch_id"] for line in lines]
    for line in lines:
        row = batches[line["batch_id"]]
        assert abs(_num(row["during_time(ms)"]) - line["schedule_duration_ms"]) < 1e-5
        assert abs(_num(row["model_run_ms"]) - line["model_run_duration_ms"]) < 1e-5
        assert abs(_num(row["step_ms"]) - line["total_step_duration_ms"]) < 1e-5
        assert int(row["total_scheduled_tokens"]) == line["total_scheduled_tokens"]
        assert int(row["waiting"]) == line["num_waiting_reqs"]
    replayed = _jsonl(tmp_path / "analysis" / "scheduler_profiling.jsonl")
    strip = [{k: v for k, v in line.items() if k != "timestamp"} for line in lines]
    assert [{k: v for k, v in line.items() if k != "timestamp"} for line in replayed] == strip


def test_scheduler_logging_csvs_and_analyze_on_one_run(tiny_model: Path, tmp_path: Path) -> None:
    config = tmp_path / "profiler.json"
    config.write_text(json.dumps({"enable": 1, "prof_dir": str(tmp_path / "prof")}))
    env = {"SERVICE_PROF_CONFIG_PATH": str(config), "VLLM_SCHEDULER_LOGGING": "1", "VLLM_SCHEDULER_LOG_WAITING": "1"}
    logs = tmp_path / "scheduler_logs"  # the default directory, in the engine's working directory
    # 8 blocks of KV cache for 4 running requests of 2 blocks each: vLLM must preempt.
    outputs, _, live_rows = run_llm_live(tiny_model, tmp_path, env, _prompts(8, 3), [100] * 8,
                                         lambda: _lines(logs / "per_iteration.csv") - 1, max_num_seqs=4, num_blocks=8)
    assert outputs == [100] * 8
    tables = {name: _csv(logs / name) for name in COLUMNS}
    for name, columns in COLUMNS.items():
        assert (logs / name).read_text().splitlines()[0].split(",") == list(columns)
    requests, iterations = tables["per_request.csv"], tables["per_iteration.csv"]
    # Written every 100 iterations while running; complete once the engine exited.
    assert len(iterations) >= 100 and live_rows >= len(iterations) // 100 * 100
    assert [int(r["iteration_id"]) for r in iterations] == list(range(len(iterations)))

    assert sorted(int(r["output_tokens"]) for r in requests) == sorted(outputs)
    assert {r["finish_reason"] for r in requests} == {"length"}
    for r in requests:
        e2e = int(r["e2e_latency"])
        assert int(r["waiting_time"]) + int(r["execution_time"]) == e2e
        assert 0 < int(r["ttft"]) <= e2e and 1e5 < e2e < 1e12  # ns
        assert int(r["tpot"]) == (int(r["completion_time"]) - int(r["first_token_time"])) // 99
        assert int(r["kv_cache_memory_bytes"]) > 0
    preempted_events = [e for e in tables["events.csv"] if e["event_type"] == "request_preempted"]
    assert sum(int(r["preemption_count"]) for r in requests) == len(preempted_events) > 0
    states = tables["per_iteration_requests.csv"]
    waiting = [r for r in states if r["state"] == "waiting"]
    assert waiting and all(r["queue_position"] != "" and r["waiting_reason"] for r in waiting)
    assert {r["state"] for r in states} >= {"running", "waiting", "preempted", "completed"}
    assert sum(r["state"] == "completed" for r in states) == len(requests)

    doc = subprocess.run([sys.executable, str(FIXTURES / "scheduler_logging_doc_example.py.txt")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=180, env={**os.environ, "MPLBACKEND": "Agg"})
    assert doc.returncode == 0, doc.stderr
    assert f"Total preemptions: {len(preempted_events)}" in doc.stdout
    for png in ("ttft_distribution.png", "batch_size_over_time.png", "kv_cache_utilization.png"):
        assert (tmp_path / png).stat().st_size > 0

    # The other door on the same run: analyze's own tables, made by other code, agree.
    _analyze(tmp_path / "prof", tmp_path / "analysis")
    by_rid = {r["rid"]: r for r in _csv(tmp_path / "analysis" / "request.csv")}
    assert sorted(by_rid) == sorted(r["request_id"] for r in requests)
    for r in requests:
        a = by_rid[r["request_id"]]
        assert int(a["input_tokens"]) == int(r["input_tokens"]) and int(a["output_tokens"]) == int(r["output_tokens"])
        assert int(a["preemptions"]) == int(r["preemption_count"])
        assert abs(float(a["queue_ms"]) - int(r["waiting_time"]) / 1e6) < 1e-5
    batches = {int(b["batch_id"]): b for b in _csv(tmp_path / "analysis" / "batch.csv")}
    assert sorted(batches) == [int(i["iteration_id"]) for i in iterations]
    for i in iterations:
        b = batches[int(i["iteration_id"])]
        assert abs(float(b["during_time(ms)"]) - int(i["scheduling_overhead"]) / 1e6) < 1e-5
        assert abs(float(b["model_run_ms"]) - int(i["forward_pass_duration"]) / 1e6) < 1e-5
        assert abs(float(b["step_ms"]) - int(i["iteration_duration"]) / 1e6) < 1e-5
        assert int(b["total_batch_size"]) == int(i["batch_size"])
        assert int(b["used_blocks"]) == int(i["kv_cache_used"])
    # ... and the scheduler-logging tables analyze replays from the raw run equal the live ones.
    replayed = tmp_path / "analysis" / "scheduler_logs"
    durations = ("waiting_time", "execution_time", "e2e_latency", "ttft", "tpot", "output_tokens", "preemption_count",
                 "eviction_count", "kv_cache_blocks")
    key = {r["request_id"]: [r[c] for c in durations] for r in requests}
    assert {r["request_id"]: [r[c] for c in durations] for r in _csv(replayed / "per_request.csv")} == key
    for name in ("per_iteration_requests.csv", "events.csv"):
        live = [(r["event_type"], r["request_id"]) if name == "events.csv" else
                (r["iteration_id"], r["request_id"], r["state"], r["queue_position"], r["time_in_state"])
                for r in tables[name]]
        again = [(r["event_type"], r["request_id"]) if name == "events.csv" else
                 (r["iteration_id"], r["request_id"], r["state"], r["queue_position"], r["time_in_state"])
                 for r in _csv(replayed / name)]
        assert sorted(again) == sorted(live), name
