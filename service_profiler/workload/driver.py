"""Runs inside the profiled process: builds vLLM's offline engine and feeds it the job's cells or requests.

    python -m service_profiler.workload.driver JOB.json

It is started by `ProfilingRunner` with the profiler's environment variables set, so the profiler loads
into this process and every engine process vLLM starts. No HTTP client competes for the CPU: requests go
straight into `LLMEngine.add_request` and the loop calls `step()`. A profiling cell's B requests are
queued while the scheduler is paused and released together, so its first step holds exactly B requests.
The manifest it writes says which requests and which wall-clock window belong to which repetition.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from .config import EngineSettings, ProfilingConfig
from .requests import ArrivalSpec, WorkloadRequest, read_requests, shared_prefix_prompts


class _Engine:
    def __init__(self, settings: EngineSettings) -> None:
        from vllm import LLM

        self.llm = LLM(**settings.llm_kwargs())
        self.engine = self.llm.llm_engine
        self.vocab_size = int(self.engine.model_config.get_vocab_size())

    def _params(self, output_tokens: int) -> Any:
        from vllm import SamplingParams

        return SamplingParams(max_tokens=output_tokens, min_tokens=output_tokens, ignore_eos=True, temperature=0.0)

    def add(self, rid: str, token_ids: list[int], output_tokens: int) -> None:
        from vllm.inputs import TokensPrompt

        self.engine.add_request(rid, TokensPrompt(prompt_token_ids=token_ids), self._params(output_tokens))

    def _utility(self, method: str, *args: Any) -> None:
        core = self.engine.engine_core
        call = getattr(core, "call_utility", None)
        if call is not None:  # engine core in its own process: pause/resume through its utility channel
            call(method, *args)

    def run_together(self, batch: list[tuple[str, list[int], int]]) -> None:
        """Queue every request while the scheduler is paused, release them at once, run to completion."""
        self._utility("pause_scheduler", "keep", False)
        for rid, ids, out in batch:
            self.add(rid, ids, out)
        self._utility("resume_scheduler")
        self.drain()

    def drain(self) -> int:
        finished = 0
        while self.engine.has_unfinished_requests():
            finished += sum(1 for out in self.engine.step() if out.finished)
        return finished

    def shutdown(self) -> None:
        core = self.engine.engine_core
        shutdown = getattr(core, "shutdown", None)
        if shutdown is not None:
            shutdown()


def run_cell(engine: _Engine, index: int, cell: ProfilingConfig) -> dict[str, Any]:
    reps: list[dict[str, Any]] = []
    prefix: list[int] | None = None
    plan = [("prime", 0)] if cell.M else []
    plan += [("warmup", i) for i in range(cell.num_warmup)] + [("measure", i) for i in range(cell.num_measurements)]
    for number, (kind, rep) in enumerate(plan):
        seed = index * 1_000_003 + number * 7919 + 17
        if kind == "prime":  # puts the shared prefix into the prefix cache before anything is measured
            prefix, prompts = shared_prefix_prompts(1, cell.prefix_tokens + 1, cell.prefix_tokens,
                                                    engine.vocab_size, seed)
            batch = [(f"c{index}-prime", prompts[0], 1)]
        else:
            prefix, prompts = shared_prefix_prompts(cell.B, cell.C, cell.prefix_tokens, engine.vocab_size, seed,
                                                     prefix=prefix)
            batch = [(f"c{index}-{kind}{rep}-{i}", ids, cell.output_tokens) for i, ids in enumerate(prompts)]
        start = time.time_ns()
        engine.run_together(batch)
        reps.append({"kind": kind, "rep": rep, "rids": [rid for rid, _, _ in batch],
                     "start_ns": start, "end_ns": time.time_ns()})
    return {"config": cell.to_dict(), "name": cell.name, "reps": reps}


def run_requests(engine: _Engine, requests: list[WorkloadRequest], arrival: ArrivalSpec,
                 warmup: int) -> dict[str, Any]:
    """Requests at their arrival times (open loop), or `concurrency` in flight (closed loop)."""
    if warmup:
        engine.run_together([(f"warmup-{i}", list(r.token_ids or ()), r.output_tokens)
                             for i, r in enumerate(requests[:warmup])])
    pending = list(requests)
    in_flight = 0
    start_ns = time.time_ns()
    started = time.perf_counter()
    while pending or engine.engine.has_unfinished_requests():
        now = time.perf_counter() - started
        while pending and (in_flight < arrival.concurrency if arrival.process == "closed"
                           else pending[0].arrival_s <= now):
            request = pending.pop(0)
            engine.add(request.rid, list(request.token_ids or ()), request.output_tokens)
            in_flight += 1
        if engine.engine.has_unfinished_requests():
            done = sum(1 for out in engine.engine.step() if out.finished)
            in_flight -= done
        elif pending:
            time.sleep(max(0.0, min(0.05, pending[0].arrival_s - (time.perf_counter() - started))))
    return {"rids": [r.rid for r in requests], "start_ns": start_ns, "end_ns": time.time_ns(),
            "arrival": arrival.to_dict(), "num_requests": len(requests)}


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    engine = _Engine(EngineSettings.from_dict(job["engine"]))
    manifest: dict[str, Any] = {"engine": job["engine"], "vocab_size": engine.vocab_size, "cells": []}
    try:
        for index, cell in enumerate(job.get("cells", [])):
            manifest["cells"].append(run_cell(engine, index, ProfilingConfig.from_dict(cell)))
        if job.get("requests"):
            requests = read_requests(Path(job["requests"]), engine.vocab_size)
            manifest["requests"] = run_requests(engine, requests, ArrivalSpec(**job.get("arrival", {})),
                                                int(job.get("warmup_requests", 0)))
    finally:
        Path(job["manifest"]).write_text(json.dumps(manifest, indent=1))
        engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
