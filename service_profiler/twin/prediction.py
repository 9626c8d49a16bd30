"""A twin prediction: per-request and per-step rows in the schema of `service-profiler analyze`, and the
summary metrics a user compares configurations by."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from service_profiler.columns import BREAKDOWN_COLUMNS

from .simulator import SimResult

REQUEST_COLUMNS = (
    "http_rid", "start_datetime", "recv_token_size", "reply_token_size", "execution_time(ms)",
    "queue_wait_time(ms)", "first_token_latency(ms)", "cache_hit_rate", "rid", "api_rid", "arrival_ns",
    "engine_arrival_ns", "first_scheduled_ns", "first_token_ns", "completion_ns", "queue_ms", "prefill_ms",
    "decode_ms", "ttft_ms", "tpot_ms", "e2e_ms", "input_tokens", "output_tokens", "preemptions",
    "prefix_hit_tokens", "kv_blocks", "finish_reason", "num_iterations", "first_batch_id", "dp_rank", "process",
    # the per-request HTTP breakdown is not simulated part by part: its columns are there, empty
    "timing_source", *BREAKDOWN_COLUMNS, "complete", "incomplete_reason")
BATCH_COLUMNS = (
    "name", "res_list", "start_time", "end_time", "during_time(ms)", "batch_type", "prof_id", "total_batch_size",
    "total_blocks", "used_blocks", "free_blocks", "blocks_allocated", "blocks_freed", "kvcache_usage_rate",
    "Prefill_batch_size", "Decode_batch_size", "Prefill_scheduled_tokens", "Decode_scheduled_tokens",
    "total_scheduled_tokens", "dp_rank", "batch_id", "process", "start_ns", "end_ns", "model_run_ms", "step_ms",
    "running", "waiting", "num_preempted", "num_finished")
METRIC_KEYS = (*(f"{m}_ms_p{p}" for m in ("ttft", "tpot", "e2e") for p in (50, 90, 99)),
               "output_throughput_tok_s", "preemptions", "completed_requests", "duration_s")
PROCESS = "twin"


def _datetime(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _ms(a: int | None, b: int | None) -> float | None:
    return (b - a) / 1e6 if a is not None and b is not None else None


def summarize(ttft: Sequence[float], tpot: Sequence[float], e2e: Sequence[float], output_tokens: int,
              first_arrival_ns: int, last_completion_ns: int, preemptions: int) -> dict[str, float | int | None]:
    """The metrics dict (keys METRIC_KEYS): percentiles in ms, output tokens/s over first arrival -> last
    completion."""
    out: dict[str, float | int | None] = {}
    for name, values in (("ttft", ttft), ("tpot", tpot), ("e2e", e2e)):
        arr = np.asarray(values, dtype=float)
        for p in (50, 90, 99):
            out[f"{name}_ms_p{p}"] = round(float(np.percentile(arr, p)), 6) if arr.size else None
    duration = (last_completion_ns - first_arrival_ns) / 1e9
    out["output_throughput_tok_s"] = round(output_tokens / duration, 6) if duration > 0 else None
    out["preemptions"] = preemptions
    out["completed_requests"] = len(e2e)
    out["duration_s"] = round(duration, 9)
    return out


@dataclass
class Prediction:
    """What the twin predicts for one engine configuration.

    - `metrics`: ttft_ms_p50/p90/p99, tpot_ms_p50/p90/p99, e2e_ms_p50/p90/p99 (ms, client side: front-end
      delays included), output_throughput_tok_s, preemptions, completed_requests, duration_s.
    - `requests`, `batches`: rows (dicts) with the columns of analyze's request.csv and batch.csv.
    - `settings`: the scheduler settings replayed (after the engine args); `step_times`: "measured", or the
      step-time model used ("v2" or "tbs") and `step_model` its report; `notes`: what was assumed.
    - `write(dir)`: request.csv, batch.csv, prediction.json.
    """

    metrics: dict[str, Any]
    settings: dict[str, Any]
    step_times: str
    step_model: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    captured_metrics: dict[str, Any] | None = None
    result: SimResult | None = field(default=None, repr=False)
    origin_ns: int = 0
    _rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False)

    @property
    def requests(self) -> list[dict[str, Any]]:
        """request.csv rows (built on first use: a sweep that reads only `metrics` never pays for them)."""
        if "requests" not in self._rows:
            rows = request_rows(self.result, self.origin_ns, int(self.settings["block_size"])) if self.result else []
            self._rows["requests"] = rows
        return self._rows["requests"]

    @property
    def batches(self) -> list[dict[str, Any]]:
        """batch.csv rows, one per scheduler step that ran a batch."""
        if "batches" not in self._rows:
            self._rows["batches"] = batch_rows(self.result, self.origin_ns) if self.result else []
        return self._rows["batches"]

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"metrics": self.metrics, "settings": self.settings, "step_times": self.step_times,
                               "step_model": self.step_model, "notes": self.notes}
        if self.captured_metrics is not None:
            doc["captured_metrics"] = self.captured_metrics
        return doc

    def write(self, directory: str | Path) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        _write_csv(out / "request.csv", REQUEST_COLUMNS, self.requests)
        _write_csv(out / "batch.csv", BATCH_COLUMNS, self.batches)
        (out / "prediction.json").write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n",
                                             encoding="utf-8")
        return out


def _write_csv(path: Path, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})


def request_rows(result: SimResult, origin_ns: int, block_size: int) -> list[dict[str, Any]]:
    rows = []
    for sim in result.requests:
        t = sim.trace
        arrival = origin_ns + sim.arrival_ns
        def at(ns: int | None, base: int = origin_ns) -> int | None:
            return base + ns if ns is not None else None
        first_token, completion = at(sim.first_token_ns), at(sim.completion_ns)
        first_sched, engine_arrival = at(sim.first_scheduled_ns), at(sim.engine_arrival_ns)
        ttft, e2e = _ms(arrival, first_token), _ms(arrival, completion)
        tpot = (_ms(first_token, completion) or 0.0) / (sim.generated - 1) if sim.generated > 1 and completion else None
        complete = completion is not None
        rows.append({
            "http_rid": t.rid, "start_datetime": _datetime(arrival), "recv_token_size": t.prompt_tokens,
            "reply_token_size": sim.generated, "execution_time(ms)": e2e, "queue_wait_time(ms)":
            _ms(engine_arrival, first_sched), "first_token_latency(ms)": ttft,
            "cache_hit_rate": round(sim.prefix_hit_tokens / t.prompt_tokens, 6), "rid": t.rid, "api_rid": t.rid,
            "arrival_ns": arrival, "engine_arrival_ns": engine_arrival, "first_scheduled_ns": first_sched,
            "first_token_ns": first_token, "completion_ns": completion, "queue_ms": _ms(engine_arrival, first_sched),
            "prefill_ms": _ms(first_sched, first_token), "decode_ms": _ms(first_token, completion), "ttft_ms": ttft,
            "tpot_ms": tpot, "e2e_ms": e2e, "input_tokens": t.prompt_tokens, "output_tokens": sim.generated,
            "preemptions": sim.preemptions, "prefix_hit_tokens": sim.prefix_hit_tokens,
            "kv_blocks": -(-(t.prompt_tokens + sim.generated) // block_size),
            "finish_reason": "abort" if sim.aborted else "length", "num_iterations": sim.num_iterations,
            "first_batch_id": sim.first_batch_id, "dp_rank": 0, "process": PROCESS, "timing_source": "twin",
            "complete": 1 if complete else 0, "incomplete_reason": "" if complete else "never scheduled"})
    return rows


def batch_rows(result: SimResult, origin_ns: int) -> list[dict[str, Any]]:
    rows = []
    for step in result.steps:
        f = step.features
        start, end = origin_ns + step.start_ns, origin_ns + step.end_ns
        kinds = [k for k, n in (("Prefill", f.num_prefill_reqs), ("Decode", f.num_decode_reqs)) if n]
        res = [[rid, 0 if phase == "prefill" else 1, tokens, before, prompt, 0]
               for rid, phase, tokens, before, prompt in step.composition]
        rows.append({
            "name": "batchFrameworkProcessing", "res_list": json.dumps(res, separators=(",", ":")),
            "start_time": _datetime(start), "end_time": _datetime(end), "during_time(ms)": (end - start) / 1e6,
            "batch_type": ",".join(kinds), "prof_id": PROCESS, "total_batch_size": f.batch_size,
            "total_blocks": step.kv_total_blocks, "used_blocks": step.kv_used_blocks,
            "free_blocks": step.kv_total_blocks - step.kv_used_blocks, "blocks_allocated": "", "blocks_freed": "",
            "kvcache_usage_rate": step.kv_used_blocks / step.kv_total_blocks if step.kv_total_blocks else 0.0,
            "Prefill_batch_size": f.num_prefill_reqs, "Decode_batch_size": f.num_decode_reqs,
            "Prefill_scheduled_tokens": f.prefill_tokens, "Decode_scheduled_tokens": f.decode_tokens,
            "total_scheduled_tokens": f.total_tokens, "dp_rank": 0, "batch_id": step.batch_id, "process": PROCESS,
            "start_ns": start, "end_ns": end, "model_run_ms": (end - start) / 1e6, "step_ms": (end - start) / 1e6,
            "running": step.running, "waiting": step.waiting, "num_preempted": len(step.preempted),
            "num_finished": step.finished})
    return rows


def metrics_of(result: SimResult) -> dict[str, Any]:
    done = [s for s in result.requests if s.completion_ns is not None]
    ttft = [(s.first_token_ns - s.arrival_ns) / 1e6 for s in done if s.first_token_ns is not None]
    tpot = [(s.completion_ns - s.first_token_ns) / 1e6 / (s.generated - 1) for s in done
            if s.generated > 1 and s.first_token_ns is not None and s.completion_ns is not None]
    e2e = [(s.completion_ns - s.arrival_ns) / 1e6 for s in done if s.completion_ns is not None]
    first = min((s.arrival_ns for s in result.requests), default=0)
    last = max((s.completion_ns for s in done if s.completion_ns is not None), default=first)
    return summarize(ttft, tpot, e2e, sum(s.generated for s in done), first, last, result.preemptions)


def captured_metrics(truth: Sequence[dict[str, str]], preemptions: int) -> dict[str, Any]:
    """The same metrics for the captured run's complete requests (request.csv rows)."""
    def values(key: str) -> list[float]:
        return [float(r[key]) for r in truth if r.get(key) not in (None, "")]
    arrivals = [int(r["arrival_ns"]) for r in truth if r.get("arrival_ns")]
    completions = [int(r["completion_ns"]) for r in truth if r.get("completion_ns")]
    tokens = sum(int(float(r["output_tokens"])) for r in truth if r.get("output_tokens"))
    return summarize(values("ttft_ms"), values("tpot_ms"), values("e2e_ms"), tokens, min(arrivals, default=0),
                     max(completions, default=0), preemptions)
