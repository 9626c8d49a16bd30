"""From a captured run to ranked plans: the twin as the predictor, the search, and the output files
(custom_schedule_plans.json, pareto_table.md, a `vllm bench sweep serve --serve-params` file)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .search import MIN_GAIN, Evaluation, Search, Slo, hit_rate, scaled_arrivals
from .space import Plan, SearchSpace, plan_from_settings

PLANS_FILE = "custom_schedule_plans.json"
PARETO_FILE = "pareto_table.md"
SWEEP_FILE = "vllm_bench_sweep_serve_params.json"
TABLE_KEYS = ("output_throughput_tok_s", "ttft_ms_p50", "ttft_ms_p90", "tpot_ms_p50", "e2e_ms_p50", "preemptions",
              "prefix_hit_rate")


class TwinPredictor:
    """(plan, rate multiplier) -> the twin's metrics, plus the prefix hit rate of its request rows."""

    def __init__(self, twin: Any) -> None:
        self.twin = twin
        self._scaled: dict[float, Any] = {1.0: twin}

    def __call__(self, plan: Plan, rate: float = 1.0) -> dict[str, Any]:
        twin = self._scaled.get(rate)
        if twin is None:
            twin = self._scaled[rate] = self.twin.with_requests(scaled_arrivals(self.twin.requests, rate))
        prediction = twin.run(plan.engine_args())
        metrics = dict(prediction.metrics)
        metrics["prefix_hit_rate"] = hit_rate(prediction.requests)
        return metrics


def captured_plan(twin: Any) -> tuple[Plan, int]:
    """The captured run's configuration as a plan, and its max_model_len."""
    from ..twin import engine_config

    settings = engine_config.resolve_settings(twin.base_settings, {})
    return plan_from_settings(settings.to_dict()), settings.max_model_len


def _peak_concurrency(requests: Sequence[Any]) -> int:
    if not requests:
        return 1
    return max(8, len(requests) // 2)


def pareto(evaluations: Sequence[Evaluation]) -> list[Evaluation]:
    """Configurations no other beats on throughput, p50 TTFT and KV size at once."""
    valid = [e for e in evaluations if e.metrics is not None]

    def point(e: Evaluation) -> tuple[float, float, float]:
        m = e.metrics or {}
        return (-(m.get("output_throughput_tok_s") or 0.0), m.get("ttft_ms_p50") or float("inf"),
                float(e.plan.kv_tokens()))

    out = []
    for e in valid:
        p = point(e)
        dominated = any(all(a <= b for a, b in zip(point(o), p, strict=True)) and point(o) != p for o in valid)
        if not dominated:
            out.append(e)
    return sorted(out, key=lambda e: -(e.metrics or {}).get("output_throughput_tok_s", 0.0))


def _plan_doc(rank: int, e: Evaluation, base: Plan) -> dict[str, Any]:
    changed = {k: v for k, v in e.plan.to_dict().items() if base.to_dict()[k] != v}
    return {"rank": rank, "name": f"plan{rank}", "score": e.score, "slo_rate_multiplier": e.slo_rate,
            "settings": e.plan.to_dict(), "changed_from_captured": changed,
            "vllm_serve_args": e.plan.serve_args(),
            "predicted": {k: (e.metrics or {}).get(k) for k in (*TABLE_KEYS, "ttft_ms_p99", "tpot_ms_p90",
                                                                   "e2e_ms_p90", "duration_s")}}


def apply_engine_settings(twin: Any, engine: Mapping[str, Any]) -> list[str]:
    """Tell the twin the settings the captured run used when its records lack them (EngineArgs names)."""
    from ..twin import engine_config

    known = {k: v for k, v in engine.items() if k in engine_config.SCHEDULER_KNOBS and v is not None}
    for key, value in known.items():
        twin.base_settings[engine_config.SCHEDULER_KNOBS[key]] = value
    return sorted(known)


def quiet_vllm() -> None:
    # Building a scheduler config per candidate logs the same platform notes hundreds of times.
    logging.getLogger("vllm").setLevel(logging.ERROR)


def plan_run(run: Path, objective: str, out_dir: Path, slo: Slo | None = None, top: int = 10,
             budget_s: float = 300.0, twin: Any = None, engine: Mapping[str, Any] | None = None,
             load_multiplier: float = 1.0, min_gain: float = MIN_GAIN) -> dict[str, Any]:
    """Search plans for the workload of an analyzed run and write the output files into `out_dir`.

    `engine`: the captured run's engine settings (EngineArgs names) where its records lack them;
    `load_multiplier`: the workload's arrivals compressed by this factor (throughput is only telling
    when the load reaches the engine's capacity)."""
    from ..twin import Twin

    quiet_vllm()
    started = time.monotonic()
    twin = twin or Twin.from_run(run)
    told = apply_engine_settings(twin, engine or {})
    if load_multiplier != 1.0:
        twin = twin.with_requests(scaled_arrivals(twin.requests, load_multiplier))
    start, max_model_len = captured_plan(twin)
    predictor = TwinPredictor(twin)
    space = SearchSpace.around(start, max_model_len=max_model_len,
                               longest_prompt=max((r.prompt_tokens for r in twin.requests), default=1),
                               peak_concurrency=_peak_concurrency(twin.requests), pool_tokens=start.kv_tokens())
    search = Search(predictor, space, objective, max_model_len, slo or Slo(), min_gain=min_gain)
    ranked = search.run(start, budget_s)
    valid = [e for e in ranked if e.metrics is not None]
    invalid = [e for e in ranked if e.metrics is None]
    base = search.evaluations[start.key()]
    doc: dict[str, Any] = {
        "objective": objective if not (slo and slo.active) else "slo",
        "slo": {"ttft_ms_p90": slo.ttft_ms, "tpot_ms_p90": slo.tpot_ms} if slo and slo.active else None,
        "run": str(run),
        "workload": {"requests": len(twin.requests),
                     "duration_s": max((r.arrival_s for r in twin.requests), default=0.0)},
        "captured": _plan_doc(0, base, start) | {"name": "captured"},
        "plans": [_plan_doc(i + 1, e, start) for i, e in enumerate(valid[:top])],
        "pareto": [_plan_doc(i + 1, e, start) for i, e in enumerate(pareto(valid))],
        "search": {"algorithm": "coordinate descent over " + ", ".join(space.candidates),
                   "candidates": space.candidates, "evaluated": len(ranked), "valid": len(valid),
                   "rejected": len(invalid), "twin_runs": search.twin_runs,
                   "seconds": round(time.monotonic() - started, 2),
                   "rejected_examples": [{"settings": e.plan.to_dict(), "reason": e.error} for e in invalid[:5]]},
        "notes": list(getattr(twin, "notes", [])),
        "engine_settings_given": told, "load_multiplier": load_multiplier,
    }
    if valid and valid[0] is base and not (slo and slo.active) and len(valid) > 1:
        doc["notes"].append(f"no configuration is predicted to beat the captured settings by {min_gain:.0%} or more "
                            f"on the {objective} objective: keep them (smaller predicted gains are within the "
                            "step model's error; the plans after the captured one list them)")
    doc["min_gain"] = min_gain
    rates = [(e.metrics or {}).get("output_throughput_tok_s") or 0.0 for e in valid]
    if objective == "throughput" and rates and max(rates) < 1.02 * min(rates):
        doc["notes"].append("throughput hardly differs between configurations: the captured load is below the "
                            "engine's capacity (raise --load-multiplier to plan for a heavier load)")
    write_outputs(doc, out_dir)
    return doc


def pareto_table(doc: dict[str, Any]) -> str:
    head = "| plan | tok/s | TTFT p50 ms | TTFT p90 ms | TPOT p50 ms | preempt | KV tokens | changed |"
    lines = [head, "|" + "---|" * 8]
    for p in doc["pareto"]:
        m, s = p["predicted"], p["settings"]
        kv = (s["num_gpu_blocks_override"] - 1) * s["block_size"]
        changed = ", ".join(f"{k}={v}" for k, v in p["changed_from_captured"].items()) or "(captured)"
        lines.append(f"| {p['name']} | {m['output_throughput_tok_s'] or 0:.1f} | {m['ttft_ms_p50'] or 0:.1f} | "
                     f"{m['ttft_ms_p90'] or 0:.1f} | {m['tpot_ms_p50'] or 0:.2f} | {m['preemptions']} | {kv} | "
                     f"{changed} |")
    return "\n".join(lines) + "\n"


def write_outputs(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    plans = out_dir / PLANS_FILE
    plans.write_text(json.dumps(doc, indent=2, default=str))
    table = out_dir / PARETO_FILE
    table.write_text(pareto_table(doc))
    # `vllm bench sweep serve --serve-params FILE`: the top plans and the captured settings, by name.
    sweep = {p["name"]: p["settings"] for p in [*doc["plans"][:5], doc["captured"]]}
    sweep_path = out_dir / SWEEP_FILE
    sweep_path.write_text(json.dumps(sweep, indent=2))
    return [plans, table, sweep_path]
