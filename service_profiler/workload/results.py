"""Per-cell numbers from the profiler's own records, and the checks that what was asked for is what ran.

- M: each measured request's prefix-cache hit (the profiler's `prefix_hit_tokens`) must be within one
  block of M x block_size.
- B: at least 95 % of the measured steps must hold exactly B requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..columnar.rows import RunRows, load_rows

BATCH_EQUAL_SHARE = 0.95
CLOCK_SLACK_NS = 50_000_000


def _stats(values: Sequence[float | None]) -> dict[str, float | None]:
    arr = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if not arr.size:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "cv": None, "n": 0}
    mean = float(arr.mean())
    return {"mean": mean, "p50": float(np.percentile(arr, 50)), "p90": float(np.percentile(arr, 90)),
            "p99": float(np.percentile(arr, 99)), "cv": float(arr.std() / mean) if mean else None, "n": int(arr.size)}


def _requests_by_client_id(tables: RunRows) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for row in tables.requests:
        rows[str(row.get("api_rid") or row["rid"])] = row
    return rows


def steps_with_requests(tables: RunRows) -> list[tuple[dict[str, Any], set[str]]]:
    """Each non-empty step with the client ids of the requests it scheduled. Steps are matched to a
    repetition by the requests they ran, not by clocks: the driver's and the engine's processes are
    aligned to wall time only approximately."""
    client_of = {str(r["rid"]): str(r.get("api_rid") or r["rid"]) for r in tables.requests}
    out = []
    for row, rids in zip(tables.batches, tables.batch_rids, strict=True):
        ids = {client_of.get(str(rid), str(rid)) for rid in rids}
        if row.get("batch_size") and ids:
            out.append((row, ids))
    return out


def _measured_steps(steps: list[tuple[dict[str, Any], set[str]]], rids: set[str], profiling_type: str
                    ) -> list[dict[str, Any]]:
    out = []
    for row, ids in steps:
        if not ids <= rids:
            continue
        prefill = (row.get("num_prefill_reqs") or 0) > 0
        if (profiling_type == "prefill" and not prefill) or (profiling_type == "decode" and prefill):
            continue
        out.append(row)
    return out


def _memory(steps: list[dict[str, Any]]) -> dict[str, Any]:
    usage = [float(s["kv_usage"]) for s in steps if s.get("kv_usage") is not None]
    used = [int(s["kv_used_blocks"]) for s in steps if s.get("kv_used_blocks") is not None]
    total = next((int(s["kv_total_blocks"]) for s in steps if s.get("kv_total_blocks")), None)
    return {"kv_usage_mean": float(np.mean(usage)) if usage else None,
            "kv_usage_max": max(usage) if usage else None,
            "kv_used_blocks_max": max(used) if used else None, "kv_total_blocks": total}


def cell_results(run_dir: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    tables = load_rows(run_dir)
    all_steps = steps_with_requests(tables)
    by_id = _requests_by_client_id(tables)
    out = []
    for cell in manifest.get("cells", []):
        config = cell["config"]
        block, prefix, batch = int(config["block_size"]), int(config["M"]) * int(config["block_size"]), int(config["B"])
        measured = [r for r in cell["reps"] if r["kind"] == "measure"]
        windows = [(r["start_ns"], r["end_ns"]) for r in measured]
        rids = [rid for r in measured for rid in r["rids"]]
        steps = _measured_steps(all_steps, set(rids), config["profiling_type"])
        reqs = [by_id[rid] for rid in rids if rid in by_id]
        hits = [int(r.get("prefix_hit_tokens") or 0) for r in reqs]
        hits_ok = sum(1 for h in hits if abs(h - prefix) <= block)
        sizes = [int(s["batch_size"]) for s in steps]
        b_equal = sum(1 for size in sizes if size == batch)
        wall_s = sum(hi - lo for lo, hi in windows) / 1e9
        prompt_tokens = sum(int(r.get("input_tokens") or 0) for r in reqs)
        output_tokens = sum(int(r.get("output_tokens") or 0) for r in reqs)
        m_check = {"expected_hit_tokens": prefix, "tolerance_tokens": block, "requests": len(hits),
                   "within_tolerance": hits_ok, "observed_hit_tokens": sorted(set(hits)),
                   "passed": bool(hits) and hits_ok == len(hits)}
        b_check = {"expected_batch_size": batch, "steps": len(sizes), "equal": b_equal,
                   "share_equal": b_equal / len(sizes) if sizes else 0.0, "required_share": BATCH_EQUAL_SHARE,
                   "observed_sizes": sorted(set(sizes)),
                   "passed": bool(sizes) and b_equal / len(sizes) >= BATCH_EQUAL_SHARE}
        out.append({
            "name": cell["name"], "config": config, "run_dir": str(run_dir),
            "requests_measured": len(reqs), "requests_missing": len(rids) - len(reqs),
            "steps_measured": len(steps),
            "step_time_ms": _stats([s["step_ms"] for s in steps]),
            "model_run_ms": _stats([s.get("model_run_ms") for s in steps]),
            "prefill_latency_ms": _stats([r.get("prefill_ms") for r in reqs]),
            "decode_latency_ms_per_token": _stats([r.get("tpot_ms") for r in reqs
                                                   if int(r.get("output_tokens") or 0) > 1]),
            "ttft_ms": _stats([r.get("ttft_ms") for r in reqs]),
            "throughput": {"requests_per_s": len(reqs) / wall_s if wall_s else None,
                           "prompt_tokens_per_s": prompt_tokens / wall_s if wall_s else None,
                           "output_tokens_per_s": output_tokens / wall_s if wall_s else None,
                           "measured_wall_s": wall_s},
            "memory": _memory(steps),
            "cache": {"hit_rate": sum(hits) / prompt_tokens if prompt_tokens else None,
                      "expected_hit_rate": prefix / int(config["C"])},
            # With M = 0 there is no prefix to check: only B is.
            "checks": {"M": m_check, "B": b_check, "passed": b_check["passed"] and (m_check["passed"] or not prefix)},
        })
    return out


def latency_summary(reqs: list[dict[str, Any]]) -> dict[str, Any]:
    """Request-level metrics in the twin's names (ttft_ms_p50, tpot_ms_p90, output_throughput_tok_s, ...)."""
    metrics: dict[str, Any] = {}
    for key in ("ttft_ms", "tpot_ms", "e2e_ms", "queue_ms"):
        stats = _stats([r.get(key) for r in reqs])
        for q in ("p50", "p90", "p99", "mean"):
            metrics[f"{key}_{q}"] = stats[q]
    starts_any = [r.get("arrival_ns") or r.get("engine_arrival_ns") for r in reqs]
    starts = [int(s) for s in starts_any if s]
    ends = [r["completion_ns"] for r in reqs if r.get("completion_ns")]
    span_s = (max(ends) - min(starts)) / 1e9 if starts and ends else 0.0
    out_tokens = sum(int(r.get("output_tokens") or 0) for r in reqs)
    hits = sum(int(r.get("prefix_hit_tokens") or 0) for r in reqs)
    prompt = sum(int(r.get("input_tokens") or 0) for r in reqs)
    metrics.update({
        "output_throughput_tok_s": out_tokens / span_s if span_s else None,
        "request_throughput_req_s": len(reqs) / span_s if span_s else None,
        "preemptions": sum(int(r.get("preemptions") or 0) for r in reqs),
        "prefix_cache_hit_rate": hits / prompt if prompt else None,
        "requests": len(reqs), "duration_s": span_s,
    })
    return metrics


def request_results(run_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    tables = load_rows(run_dir)
    section = manifest.get("requests") or {}
    by_id = _requests_by_client_id(tables)
    wanted = [str(rid) for rid in section.get("rids", [])]
    reqs = [by_id[rid] for rid in wanted if rid in by_id]
    steps = [row for row, ids in steps_with_requests(tables) if ids & set(wanted)]
    return {"metrics": latency_summary(reqs), "requests_missing": len(wanted) - len(reqs),
            "step_time_ms": _stats([s["step_ms"] for s in steps]), "memory": _memory(steps),
            "arrival": section.get("arrival")}


def client_results(rows: Sequence[dict[str, Any]], server_run_dir: Path | None, window_ns: tuple[int, int]
                   ) -> dict[str, Any]:
    """A workload sent over HTTP: latency metrics as the client measured them (`rows`: ClientTiming.to_dict),
    in the twin's names; step times, memory, preemptions and prefix hits from the server's profiler run
    directory when given (its steps and requests inside the client's wall-clock `window_ns`)."""
    ok = [r for r in rows if r["status"] == 200 and r["error"] is None]
    metrics: dict[str, Any] = {}
    for key in ("ttft_ms", "tpot_ms", "e2e_ms", "queue_ms"):
        stats = _stats([r.get(key) for r in ok])
        for q in ("p50", "p90", "p99", "mean"):
            metrics[f"{key}_{q}"] = stats[q]
    span_s = (max(r["sent_s"] + r["e2e_ms"] / 1e3 for r in ok) - min(r["sent_s"] for r in ok)) if ok else 0.0
    out_tokens = sum(int(r["output_tokens"] or 0) for r in ok)
    metrics.update({"output_throughput_tok_s": out_tokens / span_s if span_s else None,
                    "request_throughput_req_s": len(ok) / span_s if span_s else None,
                    "preemptions": None, "prefix_cache_hit_rate": None, "requests": len(ok),
                    "failed": len(rows) - len(ok), "duration_s": span_s})
    doc: dict[str, Any] = {"metrics": metrics, "requests_missing": len(rows) - len(ok),
                           "step_time_ms": _stats([]), "memory": _memory([]), "timing": "client"}
    if server_run_dir is not None:
        # the server's records are placed on the wall clock through each process's clock anchor, which
        # agrees with this process's clock only to a few ms: a request sent right at the start may
        # otherwise fall just outside the window
        lo, hi = window_ns[0] - CLOCK_SLACK_NS, window_ns[1] + CLOCK_SLACK_NS
        tables = load_rows(server_run_dir)
        steps = [b for b in tables.batches if b.get("batch_size") and lo <= (b.get("start_ns") or 0) <= hi]
        reqs = [r for r in tables.requests
                if lo <= (r.get("arrival_ns") or r.get("engine_arrival_ns") or 0) <= hi]
        hits = sum(int(r.get("prefix_hit_tokens") or 0) for r in reqs)
        prompt = sum(int(r.get("input_tokens") or 0) for r in reqs)
        metrics.update({"preemptions": sum(int(r.get("preemptions") or 0) for r in reqs),
                        "prefix_cache_hit_rate": hits / prompt if prompt else None})
        doc.update({"step_time_ms": _stats([s["step_ms"] for s in steps]), "memory": _memory(steps),
                    "server_requests_recorded": len(reqs)})
    return doc
