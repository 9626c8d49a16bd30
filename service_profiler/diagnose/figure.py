"""`vllm_performance_analysis.png`: the series the verdicts rest on, over the run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from service_profiler.figures import new_figure, save_figure


def _series(rows: list[dict[str, Any]], key: str) -> np.ndarray:
    return np.asarray([float(r[key]) if isinstance(r.get(key), int | float) else np.nan for r in rows], dtype=float)


def write_figure(batches: list[dict[str, Any]], doc: dict[str, Any], path: Path) -> Path:
    rows = sorted((b for b in batches if isinstance(b.get("start_ns"), int | float)), key=lambda b: b["start_ns"])
    t = (_series(rows, "start_ns") - (rows[0]["start_ns"] if rows else 0)) / 1e9
    fig = new_figure((10, 9))
    axes = fig.subplots(4, 1, sharex=True)
    axes[0].plot(t, _series(rows, "step_ms"), lw=0.8, label="step")
    axes[0].plot(t, _series(rows, "model_run_ms"), lw=0.8, label="model run")
    axes[0].set_ylabel("ms")
    axes[0].legend(loc="upper right")
    axes[1].plot(t, _series(rows, "batch_size"), lw=0.8, label="batch size")
    axes[1].plot(t, _series(rows, "waiting"), lw=0.8, label="waiting")
    seqs = doc["signals"].get("max_num_seqs")
    if seqs:
        axes[1].axhline(seqs, ls="--", c="grey", lw=0.8, label="max_num_seqs")
    axes[1].legend(loc="upper right")
    axes[2].plot(t, _series(rows, "kv_usage"), lw=0.8, c="tab:red", label="KV usage")
    axes[2].axhline(doc["thresholds"]["kv_usage_full"], ls="--", c="grey", lw=0.8)
    axes[2].set_ylim(0, 1.05)
    axes[2].legend(loc="upper right")
    axes[3].plot(t, _series(rows, "total_scheduled_tokens"), lw=0.8, c="tab:green", label="scheduled tokens")
    budget = doc["signals"].get("max_num_batched_tokens")
    if budget:
        axes[3].axhline(budget, ls="--", c="grey", lw=0.8, label="max_num_batched_tokens")
    axes[3].legend(loc="upper right")
    axes[3].set_xlabel("s since the first step")
    kinds = ", ".join(v["kind"] for v in doc["verdicts"]) or "no bottleneck"
    fig.suptitle(f"service-profiler diagnose: {kinds}")
    for phase in doc.get("phases", []):
        for ax in axes:
            ax.axvline(phase["start_s"], c="k", lw=0.5, alpha=0.3)
    fig.tight_layout()  # one figure per diagnosis: measuring its labels is affordable here
    return save_figure(fig, path, margins_in=None, dpi=90)
