"""A real `vllm serve` stopped under load keeps every EngineCore step up to its shutdown.

vLLM's process manager SIGTERMs the EngineCore and force-kills it a few seconds later, usually in the
middle of its teardown: without the `EngineCore.shutdown` flush (engines/vllm/lifecycle.py) the steps of the
last second(s) were lost and the file did not say so. Ground truth is a side file that a test handler
appends to (unbuffered) after every step it hands to the recorder.

A second run SIGKILLs the EngineCore: nothing can flush then, but the file says up to when it is
complete (`flushed`), and at most about one flush interval is missing after that.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from runtime_harness import read_records
from vllm_service import PROMPTS, run_workload, running_server

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

STEP_COUNTER = '''
import os
from service_profiler import record

_fd = None


def step_handler(original_func, this, *args, **kwargs):
    global _fd
    if _fd is None:
        _fd = os.open(os.path.join(os.environ["STEP_SIDE_DIR"], f"{os.getpid()}.steps"),
                      os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    start = record.now_ns()
    try:
        return original_func(this, *args, **kwargs)
    finally:
        end = record.now_ns()
        record.span("EngineCore", "step", start, end, None)
        os.write(_fd, b"%d\\n" % end)
'''

SYMBOLS = """
- symbol: vllm.v1.engine.core:EngineCore.step
  handler: stepcounter:step_handler
  domain: EngineCore
  name: step
- symbol: vllm.v1.engine.core:EngineCore.shutdown
  handler: service_profiler.engines.vllm.lifecycle:engine_shutdown_handler
  domain: EngineCore
  name: shutdown
- symbol: vllm.v1.executor.multiproc_executor:WorkerProc.shutdown
  handler: service_profiler.engines.vllm.lifecycle:worker_shutdown_handler
  domain: Worker
  name: shutdown
"""


def _setup(tmp_path: Path) -> tuple[dict[str, str], Path, Path]:
    (tmp_path / "stepcounter.py").write_text(STEP_COUNTER)
    side, prof = tmp_path / "side", tmp_path / "prof"
    side.mkdir()
    config, symbols = tmp_path / "config.json", tmp_path / "symbols.yaml"
    config.write_text(json.dumps({"enable": 1, "prof_dir": str(prof)}))
    symbols.write_text(SYMBOLS)
    env = {"SERVICE_PROF_CONFIG_PATH": str(config), "PROFILING_SYMBOLS_PATH": str(symbols),
           "STEP_SIDE_DIR": str(side), "PYTHONFAULTHANDLER": "1",  # SIGABRT dumps every thread's stack
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH", "")]))}
    return env, side, prof


def _load(server) -> threading.Thread:  # type: ignore[no-untyped-def]
    requests = [(PROMPTS[i % len(PROMPTS)], 48, i % 2 == 0, None) for i in range(200)]

    def send() -> None:
        try:
            # uvicorn's graceful shutdown waits for every open connection to close; a request vLLM never
            # answers once its engine is gone would hold it for the client's whole timeout.
            run_workload(server, requests, concurrency=8, timeout_s=15.0)
        except BaseException:
            pass  # the server goes away under it: that is the point

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def _wait_or_dump_stacks(server, timeout_s: float) -> None:  # type: ignore[no-untyped-def]
    """Wait for the server to exit; if it hangs, SIGABRT its process group (faulthandler then writes every
    thread's stack into the server's log) and fail with the log's end, so a rare hang says where."""
    try:
        server.process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.process.pid, signal.SIGABRT)
        time.sleep(5.0)
        pytest.fail(f"vllm serve still running {timeout_s:.0f} s after SIGTERM; its log's end, with the stacks:\n"
                    f"{server.log()[-12000:]}")


def _engine_steps(side: Path, prof: Path) -> tuple[list[int], list[list[int]], list[dict[str, object]]]:
    (side_file,) = side.glob("*.steps")
    truth = [int(line) for line in side_file.read_text().split()]
    engine = _runs(prof)[int(side_file.stem)]
    return truth, engine.spans("step"), engine.lines


def _runs(prof: Path) -> dict[int, Any]:
    (run_dir,) = prof.iterdir()
    return read_records(run_dir)


def test_sigterm_under_load_keeps_every_engine_step(tiny_model: Path, tmp_path: Path) -> None:
    env, side, prof = _setup(tmp_path)
    with running_server(tiny_model, tmp_path / "serve.log", profiler_env=env) as server:
        load = _load(server)
        time.sleep(6.0)
        server.process.send_signal(signal.SIGTERM)  # an ordinary stop of the whole service
        _wait_or_dump_stacks(server, timeout_s=90)
        load.join(timeout=30)
    truth, steps, lines = _engine_steps(side, prof)
    assert len(truth) >= 20, len(truth)  # it was under load
    # When steps are missing, say whether the file ended with the shutdown's `close` (a loss the file
    # hides) or was cut off before it (the file then says up to when it is complete).
    ending = [(line["t"], line.get("reason", line.get("until"))) for line in lines[-3:]]
    assert len(steps) == len(truth), (len(steps), len(truth), ending, truth[-1])
    assert sorted(r[2] for r in steps) == truth
    closes = [line for line in lines if line["t"] == "close"]
    assert lines[-1]["t"] == "close" and closes[0]["reason"] == "engine_shutdown", lines[-3:]
    flushed = [line for line in lines if line["t"] == "flushed"]
    assert flushed and all(isinstance(line["until"], int) for line in flushed)
    # The API server closes at exit. The executor's worker closes in its own shutdown when it gets that
    # far; vLLM's process manager SIGKILLs it when the whole teardown runs late, and then its file still
    # says up to when it is complete (its last line is a `flushed`); killed before it recorded anything
    # (this test records nothing in the worker but its shutdown) it has no file at all.
    ends = {run.header["role"]: (run.lines[-1]["t"], run.lines[-1].get("reason")) for run in _runs(prof).values()}
    assert ends.get("APIServer", ends.get("main")) == ("close", "exit"), ends
    assert ends.get("VllmWorker-0") in (("close", "worker_shutdown"), ("flushed", None), None), ends


def test_sigkill_of_the_engine_loses_at_most_about_one_flush_interval(tiny_model: Path, tmp_path: Path) -> None:
    env, side, prof = _setup(tmp_path)
    with running_server(tiny_model, tmp_path / "serve.log", profiler_env=env) as server:
        load = _load(server)
        time.sleep(6.0)
        (side_file,) = side.glob("*.steps")
        os.kill(int(side_file.stem), signal.SIGKILL)
        load.join(timeout=60)
    truth, steps, lines = _engine_steps(side, prof)
    assert not [line for line in lines if line["t"] == "close"]  # it did not end cleanly, and says so
    until = max(line["until"] for line in lines if line["t"] == "flushed")
    # Everything the file claims to be complete up to is there ...
    assert sorted(r[2] for r in steps if r[2] <= until) == [t for t in truth if t <= until]
    # ... and what is missing is the last flush interval (1 s) at most, with slack for a busy machine.
    assert (truth[-1] - until) / 1e9 <= 2.5, (truth[-1] - until) / 1e9
