"""Capture a real vLLM CPU run (tiny model) under the profiler, for the twin's parity and fidelity checks.

`python twin_engine_run.py MODEL PROF_DIR WORKLOAD_JSON ENGINE_ARGS_JSON` runs vLLM's real `LLMEngine`
in this process (EngineCore in-process, synchronous or async scheduling as the engine args say) and
feeds it a workload on the wall clock: each request is added once its arrival time has passed, between
engine steps, as the EngineCore's busy loop does. The profiler is switched on by the caller's
environment (SERVICE_PROF_CONFIG_PATH), exactly as in a served engine.

`served=True` runs it as `vllm serve` does, without the HTTP layer: vLLM's `AsyncLLM` with the EngineCore
in its own process and its busy loop, each request handed over at its arrival time by its own task, so
a request that arrives while a step runs waits for it, as a client's request does (the in-process loop
above adds requests only between steps, so its TTFT leaves that wait out).

`capture(...)` runs either in a subprocess (a fresh profiler state and a final flush per run), then
`service-profiler analyze`, and returns the analysis directory. Workloads are lists of
`{"arrival_s", "prompt_token_ids", "max_tokens"}`.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from statistics import median
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service_profiler.twin import Twin

TWIN_SYMBOLS_NOTE = "the shipped symbols, which include the twin capture handler"


def workload(n: int, rate_per_s: float, *, seed: int = 0, prompt_range: tuple[int, int] = (16, 200),
             output_range: tuple[int, int] = (4, 48), shared_prefix: int = 0, vocab: int = 500
             ) -> list[dict[str, Any]]:
    """Poisson arrivals, uniform prompt/output lengths; `shared_prefix` tokens common to every other
    request (prefix-cache hits when caching is on)."""
    rng = random.Random(seed)
    prefix = [rng.randrange(3, vocab) for _ in range(shared_prefix)]
    t = 0.0
    out = []
    for i in range(n):
        t += rng.expovariate(rate_per_s)
        length = rng.randint(*prompt_range)
        body = [rng.randrange(3, vocab) for _ in range(length)]
        prompt = (prefix + body) if (shared_prefix and i % 2 == 0) else body
        out.append({"arrival_s": round(t, 6), "prompt_token_ids": prompt,
                    "max_tokens": rng.randint(*output_range)})
    return out


def _drive(model: str, requests: list[dict[str, Any]], engine_args: dict[str, Any]) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.llm_engine import LLMEngine

    args = EngineArgs(model=model, dtype="bfloat16", seed=0, skip_tokenizer_init=True, **engine_args)
    engine = LLMEngine.from_engine_args(args)
    start = time.monotonic()
    pending = sorted(requests, key=lambda r: r["arrival_s"])
    i = 0
    while i < len(pending) or engine.has_unfinished_requests():
        now = time.monotonic() - start
        while i < len(pending) and pending[i]["arrival_s"] <= now:
            r = pending[i]
            engine.add_request(f"req-{i}", TokensPrompt(prompt_token_ids=r["prompt_token_ids"]),
                               SamplingParams(max_tokens=r["max_tokens"], ignore_eos=True, detokenize=False))
            i += 1
        if engine.has_unfinished_requests():
            engine.step()
        elif i < len(pending):
            time.sleep(max(0.0, pending[i]["arrival_s"] - (time.monotonic() - start)))
    del engine


def _serve(model: str, requests: list[dict[str, Any]], engine_args: dict[str, Any]) -> None:
    import asyncio

    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.async_llm import AsyncLLM

    async def run() -> None:
        args = AsyncEngineArgs(model=model, dtype="bfloat16", seed=0, skip_tokenizer_init=True, **engine_args)
        engine = AsyncLLM.from_engine_args(args)
        start = time.monotonic()

        async def one(i: int, r: dict[str, Any]) -> None:
            await asyncio.sleep(max(0.0, r["arrival_s"] - (time.monotonic() - start)))
            params = SamplingParams(max_tokens=r["max_tokens"], ignore_eos=True, detokenize=False)
            async for _ in engine.generate(TokensPrompt(prompt_token_ids=r["prompt_token_ids"]), params,
                                           request_id=f"req-{i}"):
                pass

        try:
            await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
        finally:
            engine.shutdown()

    asyncio.run(run())


def capture(model: Path, root: Path, requests: list[dict[str, Any]], engine_args: dict[str, Any],
            timeout_s: float = 600.0, *, served: bool = False) -> Path:
    """Run the workload on the real engine with the profiler on; return `service-profiler analyze`'s
    output directory (root/analysis)."""
    root.mkdir(parents=True, exist_ok=True)
    config = root / "ms_service_profiler_config.json"
    config.write_text(json.dumps({"enable": 1, "prof_dir": str(root / "prof")}), encoding="utf-8")
    (root / "workload.json").write_text(json.dumps(requests), encoding="utf-8")
    (root / "engine_args.json").write_text(json.dumps(engine_args), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SERVICE_PROF", "PROFILING_SYMBOLS"))}
    env.update({"SERVICE_PROF_CONFIG_PATH": str(config), "PROFILING_SYMBOLS_PATH": str(root / "symbols.yaml"),
                "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING",
                "VLLM_ENABLE_V1_MULTIPROCESSING": "1" if served else "0"})
    mode = "served" if served else "in-process"
    proc = subprocess.run([sys.executable, __file__, str(model), str(root / "workload.json"),
                           str(root / "engine_args.json"), mode], env=env, capture_output=True, text=True,
                          timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"engine run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    runs = sorted((root / "prof").iterdir())
    analysis = root / "analysis"
    proc = subprocess.run([sys.executable, "-m", "service_profiler.cli", "analyze", "--input-path", str(runs[-1]),
                           "--output-path", str(analysis)], capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"analyze failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return analysis


# decode steps of one batch size needed in both runs for their median times to be compared
MIN_DECODE_STEPS = 20


def decode_step_ms(twin: Twin) -> dict[int, float]:
    """Median cycle (ms) of a capture's decode-only steps that met no new kernel shape, by batch size."""
    by_size: dict[int, list[float]] = {}
    for step in twin.captured.steps:
        if step.followed_by_work and step.decode_tokens and not step.prefill_tokens and not step.new_shape:
            by_size.setdefault(step.num_decode_reqs, []).append(step.cycle_ns / 1e6)
    return {size: median(times) for size, times in by_size.items() if len(times) >= MIN_DECODE_STEPS}


def speed_ratio(base: Twin, target: Twin) -> float:
    """How much longer the machine took over the same decode step in the target's run than in the base's:
    the geometric mean, over the batch sizes both ran often enough, of the ratio of their median
    decode-only step times. On this shared machine it was 0.35 to 1.6 between runs minutes apart. Only
    for a target whose change leaves decode steps alone (not prefix caching: that costs host time per
    request per step)."""
    before, after = decode_step_ms(base), decode_step_ms(target)
    common = [size for size in before if size in after]
    if not common:
        raise ValueError(f"no decode batch size with {MIN_DECODE_STEPS} steps in both runs: "
                         f"{sorted(before)} / {sorted(after)}")
    return math.exp(sum(math.log(after[size] / before[size]) for size in common) / len(common))


def scaled(key: str, value: float, ratio: float) -> float:
    """A predicted metric at the speed of the real run it is compared with (`speed_ratio`): times scale with
    the machine's speed; output throughput, set by the arrivals at light load, does not."""
    return value if "throughput" in key else value * ratio


def paired_errors(key: str, predictions: list[dict[str, float]], ratios: list[float],
                  reals: list[dict[str, float]]) -> list[float]:
    """Each pair's prediction of `key`, scaled by that pair's speed ratio, against the pair's real run:
    relative errors, in pair order."""
    return [scaled(key, p[key], ratio) / real[key] - 1.0 for p, ratio, real in zip(predictions, ratios, reals,
                                                                                  strict=True)]


def main() -> None:
    model, workload_path, args_path, mode = sys.argv[1:5]
    drive = _serve if mode == "served" else _drive
    drive(model, json.loads(Path(workload_path).read_text()), json.loads(Path(args_path).read_text()))


if __name__ == "__main__":
    main()
