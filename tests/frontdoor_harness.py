"""Run vLLM's offline engine (`vllm.LLM`, the CPU build, the tiny local model) in a subprocess with the
front doors' environment variables, as a user would: no config file, no code change."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vllm_service import _group_alive

_DRIVER = r"""
import json, sys, time
from vllm import LLM, SamplingParams
spec = json.loads(sys.argv[1])
llm = LLM(model=spec["model"], max_model_len=512, dtype="bfloat16", seed=0, enforce_eager=True,
          max_num_seqs=spec["max_num_seqs"], max_num_batched_tokens=spec.get("max_num_batched_tokens", 2048),
          num_gpu_blocks_override=spec.get("num_blocks"))
params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in spec["max_tokens"]]
outputs = llm.generate(spec["prompts"], params, use_tqdm=False)
print("OUTPUT_TOKENS " + json.dumps([len(o.outputs[0].token_ids) for o in outputs]), flush=True)
pause = spec.get("pause_s", 0)
if pause:
    time.sleep(pause)
"""


def clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SERVICE_PROF_", "VLLM_SCHEDULER_", "VLLM_ENABLE_SCHEDULER"))
           and k != "PROFILING_SYMBOLS_PATH"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.update(extra)
    return env


GROUP_EXIT_TIMEOUT_S = 60.0


def _wait_for_group(pgid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)


def run_llm_live(model: Path, cwd: Path, env: Mapping[str, str], prompts: Sequence[str], max_tokens: Sequence[int],
                 while_running: Callable[[], Any], *, wait_s: float = 1.5, max_num_seqs: int = 4,
                 num_blocks: int | None = None, timeout_s: float = 600.0) -> tuple[list[int], str, Any]:
    """Like `run_llm`, but `wait_s` after generation ended, while the engine is still up (the driver
    sleeps a little longer, then exits normally), calls `while_running()`: what the front doors had
    written by then. Returns its result too. The driver runs in its own session, killed as a group at the
    end whatever happens (vLLM's helper processes included)."""
    spec = {"model": str(model), "prompts": list(prompts), "max_tokens": list(max_tokens),
            "max_num_seqs": max_num_seqs, "num_blocks": num_blocks, "pause_s": wait_s + 2.0}
    log_path = cwd / "driver.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", _DRIVER, json.dumps(spec)], cwd=cwd, env=clean_env(env),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    counts: list[int] | None = None
    seen: Any = None
    deadline = time.monotonic() + timeout_s
    try:
        while counts is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
            for line in log_path.read_text(errors="replace").splitlines():
                if line.startswith("OUTPUT_TOKENS "):
                    counts = json.loads(line.split(" ", 1)[1])
        if counts is not None:
            time.sleep(wait_s)
            if proc.poll() is not None:
                raise RuntimeError("the engine ended before the live check")
            seen = while_running()
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        # The driver's exit starts the EngineCore's shutdown; its last flush comes after: wait for it.
        _wait_for_group(proc.pid, GROUP_EXIT_TIMEOUT_S)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if proc.poll() is None:
            proc.wait(timeout=30)
    output = log_path.read_text(errors="replace")
    if counts is None or proc.returncode != 0:
        raise RuntimeError(f"vLLM exited with {proc.returncode}:\n{output[-6000:]}")
    return counts, output, seen
