"""The diagnosis of a run: whole-run verdicts, per-phase verdicts when the run changes character,
recommendations with the twin's predicted effect; `performance_analysis.json` and a console report."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .recommend import Predictor, predict_effects, suggestions
from .rules import THRESHOLDS, classify, window_signals
from .signals import RunView, prefix_overlap

PHASES = 4
MIN_STEPS_PER_PHASE = 50


def _requests_in(requests: Sequence[dict[str, Any]], lo: float, hi: float) -> list[dict[str, Any]]:
    out = []
    for r in requests:
        at = r.get("engine_arrival_ns") or r.get("arrival_ns")
        if isinstance(at, int | float) and lo <= at < hi:
            out.append(r)
    return out


def phases(view: RunView, overlap: float | None) -> list[dict[str, Any]]:
    """Equal-time windows of the run, each classified; consecutive windows with the same kinds merged."""
    rows = [b for b in view.batches if isinstance(b.get("start_ns"), int | float)]
    if len(rows) < PHASES * MIN_STEPS_PER_PHASE:
        return []
    t0, t1 = min(b["start_ns"] for b in rows), max(b["end_ns"] or b["start_ns"] for b in rows)
    edges = [t0 + (t1 - t0) * i / PHASES for i in range(PHASES + 1)]
    edges[-1] += 1
    out: list[dict[str, Any]] = []
    for lo, hi in itertools.pairwise(edges):
        window = [b for b in rows if lo <= b["start_ns"] < hi]
        signals = window_signals(window, _requests_in(view.requests, lo, hi), view.engine, overlap)
        kinds = [v["kind"] for v in classify(signals)]
        if out and out[-1]["kinds"] == kinds:
            out[-1]["end_s"] = (hi - t0) / 1e9
            continue
        out.append({"start_s": (lo - t0) / 1e9, "end_s": (hi - t0) / 1e9, "kinds": kinds,
                    "waiting_share": signals["waiting_share"], "kv_usage_p90": signals["kv_usage_p90"],
                    "busy_share": signals["busy_share"]})
    return out if len(out) > 1 else []


def diagnose(view: RunView, predictor: Predictor | None = None) -> dict[str, Any]:
    block_size = int(view.engine.get("block_size") or 16)
    overlap = prefix_overlap(view.workload_path, block_size)
    signals = window_signals(view.batches, view.requests, view.engine, overlap)
    totals = [b.get("kv_total_blocks") for b in view.batches if b.get("kv_total_blocks")]
    signals["kv_total_blocks"] = int(totals[-1] or 0) if totals else None
    verdicts = classify(signals)
    notes: list[str] = []
    for verdict in verdicts:
        verdict["recommendations"] = suggestions(verdict, signals, view.engine)
        note = predict_effects(verdict["recommendations"], view.engine, predictor)
        if note and note not in notes:
            notes.append(note)
    if not verdicts:
        notes.append(f"no bottleneck: the engine was busy {signals['busy_share']:.0%} of the time and requests "
                     f"waited in {signals['waiting_share']:.0%} of steps (below the thresholds: the load is light)")
    if not signals["front_end_requests"]:
        notes.append(f"front-end time {signals['front_end_basis']}: front-end-bound is not assessed")
    if overlap is None:
        notes.append("prefix overlap unknown (no workload with token ids next to the run; pass --workload): "
                     "cache-bound is not assessed")
    return {"source": view.source, "engine": view.engine, "signals": signals, "thresholds": THRESHOLDS,
            "verdicts": verdicts, "primary": verdicts[0]["kind"] if verdicts else None,
            "phases": phases(view, overlap), "notes": notes}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def console_report(doc: dict[str, Any]) -> str:
    lines = ["service-profiler diagnose", "=" * 25]
    s = doc["signals"]
    lines.append(f"{s['steps']} steps over {s['wall_ms'] / 1000:.1f} s; engine busy {s['busy_share']:.0%}, "
                 f"requests waiting in {s['waiting_share']:.0%} of steps, KV p90 "
                 f"{(s['kv_usage_p90'] or 0):.0%}, {s['preemptions']} preemption(s)")
    if not doc["verdicts"]:
        lines.append("verdict: none")
    for v in doc["verdicts"]:
        lines.append(f"\n[{v['kind']}] {v['summary']}")
        lines.append("  evidence:   " + ", ".join(f"{k}={_fmt(x)}" for k, x in v["evidence"].items()))
        lines.append("  thresholds: " + ", ".join(f"{k} {_fmt(x)}" for k, x in v["thresholds"].items()))
        for r in v.get("recommendations", []):
            line = f"  -> set {r['knob']} = {r['suggested']} (now {r['current']}): {r['why']}"
            pred = r.get("predicted")
            if pred and "error" not in pred:
                parts = [f"{k} {_fmt(p['before'])} -> {_fmt(p['after'])}" for k, p in pred.items()
                         if p["before"] is not None]
                line += "\n     twin predicts: " + "; ".join(parts)
            lines.append(line)
    if doc["phases"]:
        lines.append("\nphases:")
        for p in doc["phases"]:
            lines.append(f"  {p['start_s']:7.1f}-{p['end_s']:7.1f} s: {', '.join(p['kinds']) or 'no bottleneck'}")
    for note in doc["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def write_analysis(doc: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "performance_analysis.json"
    path.write_text(json.dumps(doc, indent=2, default=str))
    return path
