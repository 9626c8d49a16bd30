"""`ProfilingRunner`: run profiling cells or a request workload on a real vLLM engine under the profiler.

The engine runs in a child process (`service_profiler.workload.driver`) whose environment switches the
profiler on (`SERVICE_PROF_CONFIG_PATH`, `PROFILING_SYMBOLS_PATH`), exactly as a user would; the parent
then reads the run directory the profiler wrote and turns it into `<name>_results.json`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..runtime import envvars
from .config import EngineSettings, ProfilingConfig, engine_for_cells
from .http_client import HttpTarget, run_over_http
from .requests import ArrivalSpec, WorkloadRequest, write_requests
from .results import cell_results, client_results, request_results

DEFAULT_TIMEOUT_S = 1800.0


class WorkloadRunError(RuntimeError):
    """The engine process failed; the message holds the end of its log."""


@dataclass
class EngineRun:
    """One engine process: the profiler's run directory and the driver's manifest."""

    run_dir: Path
    manifest: dict[str, Any]
    log_path: Path


def model_vocab_size(model: str, default: int = 32000) -> int:
    try:
        return int(json.loads((Path(model) / "config.json").read_text())["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return default


def _profiler_env(out: Path) -> dict[str, str]:
    config = out / "ms_service_profiler_config.json"
    config.write_text(json.dumps({"enable": 1, "prof_dir": str(out / "prof")}, indent=2))
    env = {k: v for k, v in os.environ.items()
           if k not in (envvars.SERVICE_PROF_CONFIG_PATH, envvars.PROFILING_SYMBOLS_PATH, envvars.SERVICE_PROF_RUN_DIR)}
    env[envvars.SERVICE_PROF_CONFIG_PATH] = str(config)
    # Created from the shipped default on first use when it does not exist.
    env[envvars.PROFILING_SYMBOLS_PATH] = str(out / "service_profiling_symbols.yaml")
    # vLLM's CPU build reserves ~12 GiB of KV cache by default; a profiling cell needs far less.
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    return env


def run_engine(out: Path, job: dict[str, Any], timeout_s: float = DEFAULT_TIMEOUT_S) -> EngineRun:
    """Run the driver once under the profiler in `out` (made fresh) and return what it produced."""
    out.mkdir(parents=True, exist_ok=True)
    job = {**job, "manifest": str(out / "manifest.json")}
    job_path = out / "job.json"
    job_path.write_text(json.dumps(job, indent=1))
    log_path = out / "engine.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "service_profiler.workload.driver", str(job_path)],
                                env=_profiler_env(out), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise WorkloadRunError(f"the engine ran past {timeout_s:.0f}s; see {log_path}") from None
    tail = log_path.read_text(errors="replace")[-3000:]
    if code != 0 or not (out / "manifest.json").exists():
        raise WorkloadRunError(f"the engine process exited with {code}; end of {log_path}:\n{tail}")
    runs = sorted(p for p in (out / "prof").iterdir() if p.is_dir()) if (out / "prof").is_dir() else []
    if not runs:
        raise WorkloadRunError(f"the profiler wrote no run directory under {out / 'prof'}; end of {log_path}:\n{tail}")
    return EngineRun(runs[-1], json.loads((out / "manifest.json").read_text()), log_path)


class ProfilingRunner:
    """Runs profiling cells (C, M, B, block_size; prefill / decode / mixed) on a real engine.

    runner = ProfilingRunner(model="/path/to/model", output_dir="out")
    results = runner.run([ProfilingConfig(C=256, M=2, B=8)])     # writes out/<name>_results.json
    """

    def __init__(self, model: str | Path, output_dir: str | Path, name: str = "profiling",
                 engine_overrides: dict[str, Any] | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 progress: Callable[[str], None] | None = None) -> None:
        self.model = str(model)
        self.output_dir = Path(output_dir)
        self.name = name
        self.engine_overrides = dict(engine_overrides or {})
        self.timeout_s = timeout_s
        self.progress = progress or (lambda message: None)

    def run(self, cells: Sequence[ProfilingConfig]) -> dict[str, Any]:
        """Every cell, one engine per block size; returns (and writes) the results document."""
        if not cells:
            raise ValueError("no profiling cells to run")
        groups: dict[int, list[ProfilingConfig]] = {}
        for cell in cells:
            groups.setdefault(cell.block_size, []).append(cell)
        cell_docs: list[dict[str, Any]] = []
        runs: list[str] = []
        for block_size, group in groups.items():
            settings = engine_for_cells(self.model, group, **self.engine_overrides)
            sub = self.output_dir / f"engine_bs{block_size}"
            self.progress(f"block_size {block_size}: {len(group)} cell(s) on one engine ({sub})")
            run = run_engine(sub, {"engine": settings.to_dict(), "cells": [c.to_dict() for c in group]},
                             self.timeout_s)
            runs.append(str(run.run_dir))
            cell_docs.extend(cell_results(run.run_dir, run.manifest))
        doc = {"name": self.name, "model": self.model, "run_dirs": runs, "cells": cell_docs,
               "all_checks_passed": all(c["checks"]["passed"] for c in cell_docs)}
        self._write(doc)
        return doc

    def run_requests(self, requests: Sequence[WorkloadRequest], arrival: ArrivalSpec,
                     settings: EngineSettings | None = None, warmup_requests: int = 2) -> dict[str, Any]:
        """A request-level workload (arrival process or replayed trace) on one engine."""
        if settings is None:
            longest = max(r.prompt_tokens + r.output_tokens for r in requests)
            settings = EngineSettings(model=self.model, max_model_len=max(2048, longest))
        settings = replace(settings, **self.engine_overrides) if self.engine_overrides else settings
        self.output_dir.mkdir(parents=True, exist_ok=True)
        trace = write_requests(requests, self.output_dir / f"{self.name}_workload.jsonl")
        self.progress(f"{len(requests)} requests, {arrival.process} arrivals, on one engine ({self.output_dir})")
        run = run_engine(self.output_dir / "engine", {"engine": settings.to_dict(), "requests": str(trace),
                                                      "arrival": arrival.to_dict(),
                                                      "warmup_requests": warmup_requests}, self.timeout_s)
        doc = {"name": self.name, "model": self.model, "run_dirs": [str(run.run_dir)], "workload": str(trace),
               "engine": settings.to_dict(), **request_results(run.run_dir, run.manifest)}
        self._write(doc)
        return doc

    def run_over_http(self, target: HttpTarget, requests: Sequence[WorkloadRequest], arrival: ArrivalSpec,
                      server_run_dir: Path | None = None, flush_wait_s: float = 2.5) -> dict[str, Any]:
        """A request-level workload sent to a running server; latencies as the client measured them, and
        the server's step times from its profiler run directory when given."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        trace = write_requests(requests, self.output_dir / f"{self.name}_workload.jsonl")
        self.progress(f"{len(requests)} requests, {arrival.process} arrivals, to {target.url} ({target.model})")
        started = time.time_ns()
        timings, origin = run_over_http(target, requests, arrival, self.timeout_s, self.progress)
        ended = time.time_ns()
        rows = [t.to_dict(origin) for t in timings]
        if server_run_dir is not None:
            time.sleep(flush_wait_s)  # the server's profiler writes its records at least once a second
        doc = {"name": self.name, "model": target.model, "run_dirs": [str(server_run_dir)] if server_run_dir else [],
               "workload": str(trace), "engine": None, "server": target.url, "arrival": arrival.to_dict(),
               **client_results(rows, server_run_dir, (started, ended)), "client_requests": rows}
        self._write(doc)
        return doc

    def _write(self, doc: dict[str, Any]) -> Path:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / f"{self.name}_results.json"
        path.write_text(json.dumps(doc, indent=2))
        return path
