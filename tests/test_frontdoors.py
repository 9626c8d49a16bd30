"""The front doors without vLLM: activation from the environment alone (real subprocesses), the tap's
files at exit, the builders' joins, the report command's handling of bad input, and symlink safety."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from runtime_harness import Workspace

from service_profiler.runtime.frontdoors.batch_join import MAX_PENDING, BatchJoiner
from service_profiler.runtime.frontdoors.scheduler_tables import PER_ITERATION, PER_REQUEST, SchedulerTables
from service_profiler.runtime.frontdoors.sinks import JsonlWriter

CLI = [sys.executable, "-m", "service_profiler.cli"]

# One scheduler step as the vLLM handlers record it: a request arrives, is scheduled (prefill of 4 tokens),
# runs, and is finished by the step's update after its first (and only) token.
ONE_STEP = """
import os
from service_profiler.runtime import bootstrap
from service_profiler import record
runtime = bootstrap.current_runtime()
print("runtime", runtime is not None)
t = record.now_ns()
record.event("Request", "enqueue", {"rid": "r1", "prompt_tokens": 4, "priority": 0}, t)
record.span("BatchSchedule", "batchFrameworkProcessing", t + 1000, t + 2000,
            {"batch_id": 0, "dp_rank": 0, "reqs": [["r1", 0, 4, 0, 4, 0]], "running": 1, "waiting": 0,
             "preempted": [], "finished": [], "total_tokens": 4, "kv_total_blocks": 10, "kv_used_blocks": 1,
             "kv_usage": 0.1})
record.event("Request", "state", {"rid": "r1", "from": "WAITING", "to": "RUNNING", "batch_id": 0}, t + 2000)
record.span("ModelExecute", "modelExec", t + 2000, t + 9000, {"batch_id": 0, "dp_rank": 0})
record.span("BatchSchedule", "updateFromOutput", t + 9000, t + 9500, {"batch_id": 0, "finished": [["r1", "length"]]})
record.event("Request", "state", {"rid": "r1", "from": "RUNNING", "to": "FINISHED_LENGTH_CAPPED",
                                  "reason": "length", "batch_id": 0}, t + 9500)
record.span("EngineCore", "step", t + 500, t + 10000, {"batch_id": 0, "dp_rank": 0})
"""


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_environment_alone_starts_both_front_doors(workspace: Workspace) -> None:
    proc = workspace.run_python(ONE_STEP, SERVICE_PROF_CONFIG_PATH="", VLLM_SCHEDULER_LOGGING="1",
                                VLLM_ENABLE_SCHEDULER_PROFILING="true", VLLM_SCHEDULER_PROFILING_LOG="sched.jsonl")
    assert "runtime True" in proc.stdout
    logs = workspace.root / "scheduler_logs"
    (request,) = _rows(logs / PER_REQUEST)
    assert (request["e2e_latency"], request["ttft"], request["waiting_time"], request["output_tokens"]) == \
        ("9500", "9000", "1000", "1")
    (iteration,) = _rows(logs / PER_ITERATION)
    assert (iteration["iteration_duration"], iteration["scheduling_overhead"], iteration["forward_pass_duration"]) \
        == ("9500", "1000", "7000")
    (line,) = [json.loads(x) for x in (workspace.root / "sched.jsonl").read_text().splitlines()]
    assert (line["schedule_duration_ms"], line["model_run_duration_ms"], line["total_step_duration_ms"]) == \
        (0.001, 0.007, 0.0095)
    # The raw run goes inside the CSV directory, for `analyze`.
    assert list((logs / "raw").glob("*/*.sprof.jsonl"))


def test_the_engines_shutdown_writes_the_front_door_files_before_a_kill(workspace: Workspace) -> None:
    # `EngineCore.shutdown`'s handler calls `record.process_ending`; vLLM's process manager may kill the
    # process right after, so no exit hook runs (os._exit here): the files must be complete already.
    ending = ONE_STEP + 'record.process_ending("engine_shutdown")\nos._exit(0)\n'
    workspace.run_python(ending, SERVICE_PROF_CONFIG_PATH="", VLLM_SCHEDULER_LOGGING="1",
                         VLLM_ENABLE_SCHEDULER_PROFILING="true", VLLM_SCHEDULER_PROFILING_LOG="sched.jsonl")
    logs = workspace.root / "scheduler_logs"
    (request,) = _rows(logs / PER_REQUEST)
    assert request["e2e_latency"] == "9500"
    assert len(_rows(logs / PER_ITERATION)) == 1
    assert len((workspace.root / "sched.jsonl").read_text().splitlines()) == 1
    (raw,) = (logs / "raw").glob("*/*.sprof.jsonl")
    last = json.loads(raw.read_text().splitlines()[-1])
    assert (last["t"], last["reason"]) == ("close", "engine_shutdown")


def test_front_doors_stay_off_without_their_variables_or_when_disabled(workspace: Workspace) -> None:
    proc = workspace.run_python(ONE_STEP, SERVICE_PROF_CONFIG_PATH="", VLLM_SCHEDULER_LOGGING="0")
    assert "runtime False" in proc.stdout
    proc = workspace.run_python(ONE_STEP, SERVICE_PROF_CONFIG_PATH="", VLLM_SCHEDULER_LOGGING="1",
                                SERVICE_PROF_DISABLE="1")
    assert "runtime False" in proc.stdout
    assert not (workspace.root / "scheduler_logs").exists()


def test_a_config_file_decides_when_collection_runs(workspace: Workspace) -> None:
    workspace.write_config(enable=0)
    proc = workspace.run_python(ONE_STEP, VLLM_SCHEDULER_LOGGING="1")
    assert "runtime True" in proc.stdout
    assert not (workspace.root / "scheduler_logs").exists()  # collection off: nothing scheduled was seen


def _schedule(joiner: BatchJoiner, batch_id: int, t: int, tokens: int = 1) -> None:
    joiner.schedule(t, t + 1, {"batch_id": batch_id, "total_tokens": tokens, "reqs": []})


def test_batches_are_released_in_order_once_complete_also_with_a_batch_queue() -> None:
    joiner = BatchJoiner()
    # Batch queue: step 0 schedules batch 0; step 1 schedules batch 1 and processes batch 0's output.
    _schedule(joiner, 0, 0)
    joiner.step(0, 5, {"batch_id": 0})
    _schedule(joiner, 1, 10)
    assert joiner.release() == []  # batch 0's output has not been processed yet
    joiner.model(2, 12, {"batch_id": 0})
    joiner.update(12, 13, {"batch_id": 0, "finished": []})
    joiner.step(10, 14, {"batch_id": 1, "output_batch_id": 0})
    assert [b.batch_id for b in joiner.release()] == [0]
    # A batch whose parts never come holds the rest back only up to MAX_PENDING batches.
    for batch_id in range(2, MAX_PENDING + 3):
        _schedule(joiner, batch_id, batch_id * 10)
        joiner.step(batch_id * 10, batch_id * 10 + 5, {"batch_id": batch_id})
        joiner.update(0, 1, {"batch_id": batch_id})
    assert next(b.batch_id for b in joiner.release()) == 1
    assert [b.batch_id for b in joiner.release(final=True)] == []


def test_tables_count_tokens_through_a_preemption() -> None:
    tables = SchedulerTables(t0=0, wall_offset_ns=0)
    tables.feed("Request", "enqueue", 0, 0, {"rid": "r", "prompt_tokens": 4})
    batches = [  # (rid, phase, scheduled, computed before, prompt): prefill, 2 decodes, preempted, recompute
        [["r", 0, 4, 0, 4]], [["r", 1, 1, 4, 4]], [["r", 1, 1, 5, 4]], [], [["r", 0, 7, 0, 4, 1]]]
    for batch_id, reqs in enumerate(batches):
        t = 100 * (batch_id + 1)
        tables.feed("BatchSchedule", "batchFrameworkProcessing", t, t + 10,
                    {"batch_id": batch_id, "reqs": reqs, "total_tokens": sum(r[2] for r in reqs),
                     "preempted": ["r"] if batch_id == 3 else []})
        tables.feed("ModelExecute", "modelExec", t + 10, t + 50, {"batch_id": batch_id})
        tables.feed("BatchSchedule", "updateFromOutput", t + 50, t + 60, {"batch_id": batch_id, "finished": []})
        tables.feed("EngineCore", "step", t, t + 70, {"batch_id": batch_id})
    tables.feed("Request", "state", 360, 360, {"rid": "r", "from": "RUNNING", "to": "PREEMPTED", "batch_id": 3})
    tables.feed("Request", "state", 560, 560, {"rid": "r", "from": "RUNNING", "to": "FINISHED_LENGTH_CAPPED",
                                               "reason": "length", "batch_id": 4})
    tables.release(final=True)
    rows = tables.take()
    (request,) = rows[PER_REQUEST]
    # 1 token from the prefill, 1 per decode step, 1 after the recompute of all 7 known tokens.
    assert request[9] == 4 and request[13] == 1  # output_tokens, preemption_count
    assert request[3] == 150 and request[10] == 150  # first token: end of batch 0's model run


def test_report_skips_bad_lines_and_rejects_files_without_any(tmp_path: Path) -> None:
    good = {"batch_id": 0, "schedule_duration_ms": 0.2, "model_run_duration_ms": 5.0, "total_step_duration_ms": 5.5,
            "num_prefill_reqs": 1, "num_decode_reqs": 0, "total_scheduled_tokens": 8, "prefill_chunk_sizes": [8],
            "decode_chunk_sizes": []}
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(good) + "\n" + '{"batch_id": 1, "sched' + "\n" + json.dumps({**good, "batch_id": 2}))
    proc = subprocess.run([*CLI, "scheduler-report", str(path), "-o", str(tmp_path / "r")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "batches: 2" in proc.stdout
    assert f"{path}:2: not JSON" in proc.stderr and "Traceback" not in proc.stderr
    assert len(list((tmp_path / "r").glob("*.png"))) == 6
    path.write_text("not json\n")
    proc = subprocess.run([*CLI, "scheduler-report", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"{path} has no scheduler-profiling lines" in proc.stderr
    proc = subprocess.run([*CLI, "scheduler-report", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no per_iteration.csv" in proc.stderr and "Traceback" not in proc.stderr


def test_report_takes_odd_values_as_missing_and_writes_through_no_link(tmp_path: Path) -> None:
    """Values of the wrong type, NaN, infinities and numbers past a float cost only themselves (read as
    missing): every chart is drawn, no traceback; a link planted at an output's name is replaced."""
    good = {"batch_id": 0, "schedule_duration_ms": 0.2, "model_run_duration_ms": 5.0, "total_step_duration_ms": 5.5,
            "num_prefill_reqs": 1, "num_decode_reqs": 0, "total_scheduled_tokens": 8, "prefill_chunk_sizes": [8],
            "decode_chunk_sizes": [1, 1]}
    odd = [{"prefill_chunk_sizes": 5}, {"decode_chunk_sizes": 2.5}, {"prefill_chunk_sizes": [None, "x", True, 1e999]},
           {"batch_id": float("inf")}, {"schedule_duration_ms": float("nan")}, {"model_run_duration_ms": 2**1100},
           {"num_prefill_reqs": "1e999"}, {"total_scheduled_tokens": [1]}, {"batch_id": -2**63}]
    lines = [json.dumps({**good, "batch_id": i, **change}) for i, change in enumerate(odd)] + [json.dumps(good)]
    path = tmp_path / "s.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "r"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    os.symlink(victim, out / "summary.txt")
    proc = subprocess.run([*CLI, "scheduler-report", str(path), "-o", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert f"batches: {len(lines)}" in proc.stdout and "prefill chunk size: avg 8.000 tokens" in proc.stdout
    assert victim.read_text() == "keep me" and not (out / "summary.txt").is_symlink()
    assert len(list(out.glob("*.png"))) == 6
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "per_request.csv").write_text("ttft,tpot,preemption_count\n1e999,nan,x\n2000000,1000,0\n")
    (logs / "per_iteration.csv").write_text("iteration_id,batch_size,kv_cache_used,kv_cache_total\n"
                                            "0,1,5,0\ninf,2,1e400,10\n2,3,4,10\n")
    proc = subprocess.run([*CLI, "scheduler-report", str(logs), "-o", str(tmp_path / "r2")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr
    assert "requests: 2, iterations: 3" in proc.stdout and len(list((tmp_path / "r2").glob("*.png"))) == 3
    assert "average KV cache utilization: 40.000 %" in proc.stdout  # 4 of 10; no total, no ratio


def test_writers_never_follow_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    os.symlink(victim, tmp_path / "scheduler_profiling.jsonl")
    problems: list[str] = []
    writer = JsonlWriter(tmp_path / "scheduler_profiling.jsonl", problems.append)
    writer.write(["{}", "{}"], 0)
    writer.write(["{}"], 0)
    assert victim.read_text() == "keep me"
    assert writer.lost == 3 and len(problems) == 1 and "cannot write" in problems[0]


STEPS = """
import os, sys
from pathlib import Path
from service_profiler.runtime import bootstrap
from service_profiler import record
runtime = bootstrap.current_runtime()
done = 0

def steps(n):
    global done
    for i in range(done, done + n):
        t = record.now_ns()
        rid = f"r{i}"
        record.event("Request", "enqueue", {"rid": rid, "prompt_tokens": 4, "priority": 0}, t)
        record.span("BatchSchedule", "batchFrameworkProcessing", t + 1000, t + 2000,
                    {"batch_id": i, "dp_rank": 0, "reqs": [[rid, 0, 4, 0, 4, 0]], "running": 1, "waiting": 0,
                     "preempted": [], "finished": [], "total_tokens": 4, "kv_total_blocks": 10,
                     "kv_used_blocks": 1, "kv_usage": 0.1})
        record.span("ModelExecute", "modelExec", t + 2000, t + 9000, {"batch_id": i, "dp_rank": 0})
        record.span("BatchSchedule", "updateFromOutput", t + 9000, t + 9500,
                    {"batch_id": i, "finished": [[rid, "length"]]})
        record.span("EngineCore", "step", t + 500, t + 10000, {"batch_id": i, "dp_rank": 0})
    done += n
    runtime.recorder.flush()
    rows = len(Path("scheduler_logs/per_iteration.csv").read_text().splitlines()) - 1
    print("rows", done, rows, flush=True)

for n in (150, 60, 5):
    steps(n)
os._exit(0)  # no final flush: what is in the file is what the flushes while running wrote
"""


def test_the_scheduler_csvs_hold_every_whole_hundred_of_iterations_while_running(workspace: Workspace) -> None:
    # One flush may see any number of steps (a fast engine runs hundreds per flush interval): after each
    # flush the file holds at least every completed hundred, as the scheduler-logging document says.
    proc = workspace.run_python(STEPS, SERVICE_PROF_CONFIG_PATH="", VLLM_SCHEDULER_LOGGING="1")
    seen = [tuple(int(x) for x in line.split()[1:]) for line in proc.stdout.splitlines() if line.startswith("rows")]
    assert len(seen) == 3, proc.stdout + proc.stderr
    for done, rows in seen:
        assert done // 100 * 100 <= rows <= done, seen
    assert seen[1] == (210, 210)  # the second hundred completed in that flush: written, with what came with it
