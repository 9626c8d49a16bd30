"""Run vLLM's offline engine (`vllm.LLM`, the CPU build, the tiny local model) in a subprocess with the
front doors' environment variables, as a user would: no config file, no code change."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

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


def run_llm(model: Path, cwd: Path, env: Mapping[str, str], prompts: Sequence[str], max_tokens: Sequence[int], *,
            max_num_seqs: int = 4, num_blocks: int | None = None, pause_s: float = 0.0,
            timeout_s: float = 600.0) -> tuple[list[int], str]:
    """(output token counts per prompt, the process's output). Raises with the output when it fails."""
    spec = {"model": str(model), "prompts": list(prompts), "max_tokens": list(max_tokens),
            "max_num_seqs": max_num_seqs, "num_blocks": num_blocks, "pause_s": pause_s}
    proc = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(spec)], cwd=cwd, env=clean_env(env),
                          capture_output=True, text=True, timeout=timeout_s)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"vLLM exited with {proc.returncode}:\n{output[-6000:]}")
    for line in proc.stdout.splitlines():
        if line.startswith("OUTPUT_TOKENS "):
            return json.loads(line.split(" ", 1)[1]), output
    raise RuntimeError(f"no OUTPUT_TOKENS line:\n{output[-6000:]}")
