"""Classify a window of a run: which of compute, memory, scheduling, cache or front end limits it.

Each rule is a threshold on a number measured from the profiler's step and request rows; a verdict
carries the numbers and the thresholds. Compute-bound is what remains when the engine is busy running
the model and no capacity limit (KV blocks, sequence slots, token budget, lost prefix reuse) explains
the queueing: a limit that makes requests wait, or prompt tokens computed again, is named first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

KINDS = ("compute-bound", "memory-bound", "scheduling-bound", "cache-bound", "front-end-bound")

THRESHOLDS = {
    "kv_usage_full": 0.90,            # KV blocks in use, p90 over steps: "near full"
    "waiting_share": 0.20,            # share of steps with requests waiting: "requests queue"
    "limit_share": 0.50,              # share of waiting steps at a limit: "this limit holds them back"
    "token_budget_full": 0.90,        # scheduled tokens / max_num_batched_tokens: "budget used up"
    "cache_gap": 0.15,                # achievable minus measured prefix hit rate
    "cache_overlap_min": 0.20,        # achievable prefix hit rate worth chasing
    "busy_share": 0.60,               # step time / wall time: "the engine is busy"
    "model_share": 0.60,              # model run / step time: "the model dominates the step"
    "front_end_share": 0.30,          # median (front-end time / end-to-end latency)
    # The engine takes new requests in between steps: a front-end time under a couple of steps is the
    # engine loop finishing its step, not the front end.
    "front_end_steps": 2.0,           # median front-end time / median step time
}


def _values(rows: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    out = [float(r[key]) for r in rows if isinstance(r.get(key), int | float)]
    return np.asarray(out, dtype=float)


def _share(flags: Sequence[bool]) -> float:
    return float(sum(flags)) / len(flags) if flags else 0.0


class BusyIntervals:
    """The engine's step intervals, to take the time spent waiting for a running step out of the front end."""

    def __init__(self, batches: Sequence[dict[str, Any]]) -> None:
        # A step runs from its schedule call to the end of its output update (step_ms covers both).
        spans = sorted((float(b["start_ns"]), float(b["start_ns"]) + float(b["step_ms"]) * 1e6) for b in batches
                       if isinstance(b.get("start_ns"), int | float) and isinstance(b.get("step_ms"), int | float))
        self.starts = np.asarray([a for a, _ in spans], dtype=float)
        self.ends = np.asarray([b for _, b in spans], dtype=float)

    def overlap_ns(self, lo: float, hi: float) -> float:
        if hi <= lo or not self.starts.size:
            return 0.0
        first = max(0, int(np.searchsorted(self.ends, lo)))
        last = int(np.searchsorted(self.starts, hi))
        if last <= first:
            return 0.0
        a = np.maximum(self.starts[first:last], lo)
        b = np.minimum(self.ends[first:last], hi)
        return float(np.clip(b - a, 0, None).sum())


# The request.csv columns the front-end time is measured from (docs/METRICS.md defines each).
FRONT_END_COLUMNS = ("http_arrival_ns", "handoff_ns", "engine_arrival_ns", "engine_first_token_ns",
                     "first_token_ns", "completion_ns", "last_byte_sent_ns")
FRONT_END_BASIS = ("before the engine: engine_arrival_ns - http_arrival_ns, less the engine steps running "
                   "between handoff_ns and engine_arrival_ns; after the engine: (first_token_ns - "
                   "engine_first_token_ns) + (last_byte_sent_ns - completion_ns); share of e2e_ms (from the "
                   "HTTP arrival)")


def _ns(request: dict[str, Any], key: str) -> float | None:
    value = request.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def front_end_ms(request: dict[str, Any], busy: BusyIntervals | None = None) -> tuple[float | None, float | None]:
    """(before, after) in ms, from the HTTP timings analyze puts in request.csv; None where the run did not
    record them (no HTTP server seen: older runs, the offline engine, another front end).

    before: from the HTTP arrival to the engine's scheduler accepting the request (reading the body,
    preprocessing, the hand-off), less the time an engine step was running after the hand-off: the engine
    takes new requests between steps, so that wait belongs to the engine, not to the front end.
    after: the output's way from the engine to the API server, measured on the first token (engine step
    end -> the API server's output processor), plus the last token's way out (the API server's last token
    -> the response's last byte written)."""
    arrival = _ns(request, "http_arrival_ns")
    before = after = None
    engine_seen = _ns(request, "engine_arrival_ns") or _ns(request, "handoff_ns")
    if arrival is not None and engine_seen is not None:
        handoff = _ns(request, "handoff_ns")
        waited = busy.overlap_ns(handoff, engine_seen) if busy is not None and handoff is not None else 0.0
        before = max(0.0, (engine_seen - arrival - waited) / 1e6)
    completion, last_byte = _ns(request, "completion_ns"), _ns(request, "last_byte_sent_ns")
    if arrival is not None and completion is not None and last_byte is not None:
        after = max(0.0, last_byte - completion) / 1e6
        engine_first, api_first = _ns(request, "engine_first_token_ns"), _ns(request, "first_token_ns")
        if engine_first is not None and api_first is not None:
            after += max(0.0, api_first - engine_first) / 1e6
    return before, after


def front_end_signals(requests: Sequence[dict[str, Any]], busy: BusyIntervals) -> dict[str, Any]:
    """Median front-end time and its share of e2e over the complete requests the HTTP server recorded."""
    measured = [r for r in requests if r.get("complete") != 0 and isinstance(r.get("e2e_ms"), int | float)
                and r["e2e_ms"] > 0]
    before, after, total, share = [], [], [], []
    for r in measured:
        b, a = front_end_ms(r, busy)
        if b is None and a is None:
            continue
        before.append(b or 0.0)
        after.append(a or 0.0)
        total.append((b or 0.0) + (a or 0.0))
        share.append(total[-1] / float(r["e2e_ms"]))

    def median(values: list[float]) -> float | None:
        return float(np.median(values)) if values else None

    if share:
        basis = FRONT_END_BASIS
    elif not requests:
        basis = "not measured: no request in this window"
    elif "http_arrival_ns" not in requests[0]:
        basis = ("not measured: request.csv has no HTTP timing columns (http_arrival_ns, last_byte_sent_ns, ...): "
                 "analyzed by a profiler version without them; run `service-profiler analyze` again on the raw run")
    else:
        basis = ("not measured: no request has HTTP timings (http_arrival_ns empty: the run had no HTTP server "
                 "recorded, e.g. the offline engine, another front end, or a capture without the Request domain)")
    return {"front_end_requests": len(share), "front_end_basis": basis,
            "front_end_share_p50": median(share), "front_end_ms_p50": median(total),
            "front_end_before_ms_p50": median(before), "front_end_after_ms_p50": median(after)}


def window_signals(batches: Sequence[dict[str, Any]], requests: Sequence[dict[str, Any]],
                   engine: dict[str, Any], overlap: float | None) -> dict[str, Any]:
    rows = [b for b in batches if b.get("batch_size")]
    starts, ends = _values(batches, "start_ns"), _values(batches, "end_ns")
    wall_ms = (ends.max() - starts.min()) / 1e6 if starts.size and ends.size else 0.0
    step_ms, model_ms = _values(rows, "step_ms"), _values(rows, "model_run_ms")
    waiting = [int(r.get("waiting") or 0) > 0 for r in rows]
    waiting_rows = [r for r, w in zip(rows, waiting, strict=True) if w]
    kv = _values(rows, "kv_usage")
    max_seqs = engine.get("max_num_seqs")
    budget = engine.get("max_num_batched_tokens")
    slots_inferred = max_seqs is None
    if max_seqs is None and rows:
        max_seqs = int(max(int(r.get("batch_size") or 0) for r in rows))
    at_slots = [int(r.get("batch_size") or 0) >= int(max_seqs or 0) for r in waiting_rows]
    at_budget = ([float(r.get("total_scheduled_tokens") or 0) >= THRESHOLDS["token_budget_full"] * budget
                  for r in waiting_rows] if budget else [])
    prompt = sum(int(r.get("input_tokens") or 0) for r in requests)
    hits = sum(int(r.get("prefix_hit_tokens") or 0) for r in requests)
    e2e = [float(r["e2e_ms"]) for r in requests if isinstance(r.get("e2e_ms"), int | float)]
    return {
        "steps": len(rows), "wall_ms": wall_ms,
        "busy_share": float(step_ms.sum() / wall_ms) if wall_ms else 0.0,
        "model_share": (float(model_ms.sum() / step_ms.sum())
                        if step_ms.size and model_ms.size and step_ms.sum() else 0.0),
        "step_ms_p50": float(np.median(step_ms)) if step_ms.size else None,
        "tokens_per_step_mean": float(_values(rows, "total_scheduled_tokens").mean()) if rows else None,
        "waiting_share": _share(waiting),
        "waiting_max": int(max((int(r.get("waiting") or 0) for r in rows), default=0)),
        "kv_usage_p90": float(np.percentile(kv, 90)) if kv.size else None,
        "kv_usage_max": float(kv.max()) if kv.size else None,
        "preemptions": int(_values(rows, "num_preempted").sum()),
        "max_num_seqs": max_seqs, "max_num_seqs_inferred": slots_inferred,
        "max_num_batched_tokens": budget,
        "at_seq_limit_share": _share(at_slots), "at_token_budget_share": _share(at_budget),
        "prefix_hit_rate": hits / prompt if prompt else None,
        "prefix_overlap": overlap,
        "prefix_caching": engine.get("enable_prefix_caching"),
        "requests": len(requests), "e2e_ms_p50": float(np.median(e2e)) if e2e else None,
    } | front_end_signals(requests, BusyIntervals(batches))


def classify(s: dict[str, Any]) -> list[dict[str, Any]]:
    """Verdicts for one window's signals, most limiting first; empty when nothing limits it."""
    t = THRESHOLDS
    verdicts: list[dict[str, Any]] = []

    def add(kind: str, summary: str, evidence: dict[str, Any], thresholds: dict[str, Any]) -> None:
        verdicts.append({"kind": kind, "summary": summary, "evidence": evidence, "thresholds": thresholds})

    queued = s["waiting_share"] >= t["waiting_share"]
    kv_full = s["kv_usage_p90"] is not None and s["kv_usage_p90"] >= t["kv_usage_full"]
    if s["preemptions"] > 0 or (kv_full and queued):
        add("memory-bound", f"KV cache near full (p90 usage {s['kv_usage_p90']:.0%}) with {s['preemptions']} "
            f"preemption(s); requests waiting in {s['waiting_share']:.0%} of steps",
            {k: s[k] for k in ("kv_usage_p90", "kv_usage_max", "preemptions", "waiting_share")},
            {"kv_usage_p90 >=": t["kv_usage_full"], "or preemptions >": 0, "waiting_share >=": t["waiting_share"]})
    memory = bool(verdicts)
    if queued and not memory:
        slots = s["at_seq_limit_share"] >= t["limit_share"]
        budget = s["at_token_budget_share"] >= t["limit_share"]
        if slots or budget:
            limit = "max_num_seqs" if slots else "max_num_batched_tokens"
            add("scheduling-bound",
                f"requests wait in {s['waiting_share']:.0%} of steps while the KV cache has room; "
                f"{limit} holds them back ({(s['at_seq_limit_share'] if slots else s['at_token_budget_share']):.0%} "
                "of waiting steps at the limit)",
                {k: s[k] for k in ("waiting_share", "waiting_max", "at_seq_limit_share", "at_token_budget_share",
                                   "max_num_seqs", "max_num_seqs_inferred", "max_num_batched_tokens",
                                   "kv_usage_p90")} | {"limit": limit},
                {"waiting_share >=": t["waiting_share"], "at_limit_share >=": t["limit_share"],
                 "token_budget_full": t["token_budget_full"]})
    overlap, hit = s["prefix_overlap"], s["prefix_hit_rate"] or 0.0
    if overlap is not None and overlap >= t["cache_overlap_min"] and overlap - hit >= t["cache_gap"]:
        add("cache-bound", f"prefix cache serves {hit:.0%} of prompt tokens where the workload's shared prefixes "
            f"allow {overlap:.0%}" + (" (prefix caching is off)" if s["prefix_caching"] is False else ""),
            {"prefix_hit_rate": hit, "prefix_overlap": overlap, "prefix_caching": s["prefix_caching"]},
            {"overlap - hit_rate >=": t["cache_gap"], "overlap >=": t["cache_overlap_min"]})
    fe, fe_ms, step = s["front_end_share_p50"], s["front_end_ms_p50"], s["step_ms_p50"] or 0.0
    if fe is not None and fe >= t["front_end_share"] and fe_ms is not None and fe_ms >= t["front_end_steps"] * step:
        add("front-end-bound", f"time outside the engine is {fe:.0%} of a request's end-to-end latency (median "
            f"{fe_ms:.1f} ms, {fe_ms / step if step else float('inf'):.1f} steps)",
            {"front_end_share_p50": fe, "front_end_ms_p50": fe_ms,
             "front_end_before_ms_p50": s.get("front_end_before_ms_p50"),
             "front_end_after_ms_p50": s.get("front_end_after_ms_p50"), "step_ms_p50": s["step_ms_p50"],
             "e2e_ms_p50": s["e2e_ms_p50"], "front_end_requests": s.get("front_end_requests"),
             "front_end_columns": list(FRONT_END_COLUMNS), "front_end_basis": s.get("front_end_basis")},
            {"front_end_share_p50 >=": t["front_end_share"], "front_end_ms_p50 / step_ms_p50 >=": t["front_end_steps"]})
    limited = any(v["kind"] in ("memory-bound", "scheduling-bound", "cache-bound") for v in verdicts)
    if not limited and s["busy_share"] >= t["busy_share"] and s["model_share"] >= t["model_share"]:
        add("compute-bound", f"the engine is busy {s['busy_share']:.0%} of the time, {s['model_share']:.0%} of it "
            f"running the model ({s['tokens_per_step_mean']:.0f} tokens per step), and no capacity limit explains "
            "the queueing", {k: s[k] for k in ("busy_share", "model_share", "step_ms_p50", "tokens_per_step_mean",
                                               "waiting_share", "kv_usage_p90")},
            {"busy_share >=": t["busy_share"], "model_share >=": t["model_share"]})
    return verdicts
