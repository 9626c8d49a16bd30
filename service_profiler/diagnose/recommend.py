"""Recommendations for a verdict: the engine knob, a suggested value, and the twin's prediction of its
effect on this workload (when the twin can replay the run)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

PREDICTED_KEYS = ("ttft_ms_p50", "ttft_ms_p90", "tpot_ms_p50", "e2e_ms_p50", "output_throughput_tok_s", "preemptions")

Predictor = Callable[[dict[str, Any]], dict[str, Any]]


def _kv_blocks(signals: dict[str, Any], engine: dict[str, Any]) -> int | None:
    blocks = engine.get("num_gpu_blocks_override") or signals.get("kv_total_blocks")
    return int(blocks) if blocks else None


def suggestions(verdict: dict[str, Any], signals: dict[str, Any], engine: dict[str, Any]) -> list[dict[str, Any]]:
    kind = verdict["kind"]
    out: list[dict[str, Any]] = []

    def rec(knob: str, current: Any, suggested: Any, why: str) -> None:
        out.append({"knob": knob, "current": current, "suggested": suggested, "why": why})

    if kind == "memory-bound":
        blocks = _kv_blocks(signals, engine)
        if blocks:
            rec("num_gpu_blocks_override", blocks, blocks * 2,
                "twice the KV blocks: fewer preemptions (or raise kv_cache_memory_bytes / gpu_memory_utilization)")
        seqs = engine.get("max_num_seqs") or signals.get("max_num_seqs")
        if seqs and int(seqs) > 2:
            rec("max_num_seqs", seqs, max(2, int(seqs) // 2), "fewer sequences share the KV cache: no recompute")
    elif kind == "scheduling-bound":
        if verdict["evidence"].get("limit") == "max_num_seqs":
            slots = int(signals.get("max_num_seqs") or 1)
            rec("max_num_seqs", slots, max(slots * 4, slots + 4), "more sequence slots for the waiting requests")
        else:
            budget = int(signals.get("max_num_batched_tokens") or 2048)
            rec("max_num_batched_tokens", budget, budget * 2, "a larger token budget per step")
    elif kind == "cache-bound":
        if signals.get("prefix_caching") is False:
            rec("enable_prefix_caching", False, True, "reuse the KV blocks of shared prompt prefixes")
        else:
            blocks = _kv_blocks(signals, engine)
            if blocks:
                rec("num_gpu_blocks_override", blocks, blocks * 2, "keep cached prefixes from being evicted")
    elif kind == "compute-bound":
        current = engine.get("max_num_batched_tokens") or signals.get("max_num_batched_tokens")
        if current:
            rec("max_num_batched_tokens", current, max(256, int(current) // 2),
                "smaller prefill chunks: shorter steps for running decodes (lower TPOT), at some TTFT cost")
        rec("enable_chunked_prefill", engine.get("enable_chunked_prefill"), True,
            "split long prompts across steps so decodes are not stalled behind them")
    elif kind == "front-end-bound":
        rec("api_server_count", engine.get("api_server_count", 1), 2,
            "more API server processes for tokenization and response handling")
    return out


def predict_effects(recs: list[dict[str, Any]], engine: dict[str, Any], predictor: Predictor | None
                    ) -> str | None:
    """Fill `predicted` of each engine recommendation with the twin's before/after; returns a note when the
    twin could not be used."""
    if predictor is None:
        for r in recs:
            r["predicted"] = None
        return "no twin prediction (the twin needs an `analyze` output directory of this run)"
    try:
        base = predictor({})
    except Exception as exc:  # the twin's failure must not cost the diagnosis
        for r in recs:
            r["predicted"] = None
        return f"the twin could not replay this run: {type(exc).__name__}: {exc}"
    for r in recs:
        if r["knob"] == "api_server_count":
            r["predicted"] = None  # outside the engine: the twin does not model it
            continue
        try:
            after = predictor({r["knob"]: r["suggested"]})
        except Exception as exc:
            r["predicted"] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        r["predicted"] = {k: {"before": base.get(k), "after": after.get(k)} for k in PREDICTED_KEYS}
    return None
