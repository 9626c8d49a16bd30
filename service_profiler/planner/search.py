"""Search engine settings with the twin: objectives, coordinate descent, and the SLO request-rate bisection.

Coordinate descent: from the captured run's settings, each knob in turn is set to each of its candidates
(the others held) and the best is kept; passes repeat until a pass changes nothing. Every configuration
the search touches is kept (it feeds the ranking and the Pareto table). SLO mode scores a configuration
by the highest request rate (the workload's arrivals compressed or stretched in time) whose P90 TTFT and
TPOT stay under the limits, found by bisection.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .space import KNOBS, Plan, SearchSpace, structurally_valid

OBJECTIVES = ("throughput", "latency", "memory", "cache", "balanced")
INFEASIBLE = -1e18
# A change the twin predicts to gain less than this on the objective (relative to the captured settings)
# is within the error of a step model fitted on a shared machine: ranked above the captured settings it
# would recommend noise. Such plans are still listed, after the captured settings.
MIN_GAIN = 0.05


@dataclass
class Evaluation:
    plan: Plan
    metrics: dict[str, Any] | None
    score: float
    error: str | None = None
    slo_rate: float | None = None


@dataclass(frozen=True)
class Slo:
    ttft_ms: float | None = None
    tpot_ms: float | None = None

    @property
    def active(self) -> bool:
        return self.ttft_ms is not None or self.tpot_ms is not None

    def met(self, metrics: dict[str, Any]) -> bool:
        ttft, tpot = metrics.get("ttft_ms_p90"), metrics.get("tpot_ms_p90")
        return ((self.ttft_ms is None or (ttft is not None and ttft <= self.ttft_ms))
                and (self.tpot_ms is None or tpot is None or tpot <= self.tpot_ms))


def hit_rate(requests: Sequence[dict[str, Any]]) -> float:
    prompt = sum(float(r.get("input_tokens") or 0) for r in requests)
    return sum(float(r.get("prefix_hit_tokens") or 0) for r in requests) / prompt if prompt else 0.0


def score(objective: str, metrics: dict[str, Any], plan: Plan, base: dict[str, Any]) -> float:
    """Higher is better. `base`: the captured configuration's predicted metrics (for ratios and floors)."""
    thr = float(metrics.get("output_throughput_tok_s") or 0.0)
    ttft = float(metrics.get("ttft_ms_p50") or math.inf)
    tpot = float(metrics.get("tpot_ms_p50") or 0.0)
    if objective == "throughput":
        return thr - 1e-9 * ttft
    if objective == "latency":
        return -ttft - 1e-3 * tpot
    if objective == "memory":
        # The smallest KV cache that keeps 95 % of the captured throughput and adds no preemption.
        floor = 0.95 * float(base.get("output_throughput_tok_s") or 0.0)
        if thr < floor or int(metrics.get("preemptions") or 0) > int(base.get("preemptions") or 0):
            return INFEASIBLE + thr
        return -float(plan.kv_tokens()) + 1e-6 * thr
    if objective == "cache":
        return float(metrics.get("prefix_hit_rate") or 0.0) + 1e-9 * thr
    if objective == "balanced":
        return _balanced(metrics, base)
    raise ValueError(f"objective {objective!r}: use one of {', '.join(OBJECTIVES)}")


def _balanced(metrics: dict[str, Any], base: dict[str, Any]) -> float:
    """log(throughput ratio) - (log(TTFT ratio) + log(TPOT ratio)) / 2, against the captured settings."""
    thr = float(metrics.get("output_throughput_tok_s") or 0.0)
    ttft = float(metrics.get("ttft_ms_p50") or math.inf)
    tpot = float(metrics.get("tpot_ms_p50") or 0.0)
    thr0 = float(base.get("output_throughput_tok_s") or 1.0) or 1.0
    ttft0 = float(base.get("ttft_ms_p50") or 1.0) or 1.0
    tpot0 = float(base.get("tpot_ms_p50") or 1.0) or 1.0
    return (math.log(max(thr, 1e-9) / thr0) - 0.5 * math.log(max(ttft, 1e-9) / ttft0)
            - 0.5 * math.log(max(tpot, 1e-9) / tpot0))


def relative_gain(objective: str, metrics: dict[str, Any], base: dict[str, Any]) -> float | None:
    """The predicted gain over the captured settings as a fraction; None for the objectives whose score
    has its own floor (memory keeps 95 % of the throughput; cache is a hit rate)."""
    if objective == "throughput":
        thr0 = float(base.get("output_throughput_tok_s") or 0.0)
        return float(metrics.get("output_throughput_tok_s") or 0.0) / thr0 - 1.0 if thr0 else None
    if objective == "latency":
        ttft0 = float(base.get("ttft_ms_p50") or 0.0)
        return 1.0 - float(metrics.get("ttft_ms_p50") or math.inf) / ttft0 if ttft0 else None
    if objective == "balanced":
        return math.expm1(_balanced(metrics, base))
    return None


Predictor = Callable[[Plan, float], dict[str, Any]]
"""(plan, rate multiplier) -> predicted metrics (raises for a configuration vLLM rejects)."""


@dataclass
class Search:
    predictor: Predictor
    space: SearchSpace
    objective: str
    max_model_len: int
    slo: Slo = field(default_factory=Slo)
    max_passes: int = 3
    bisection_steps: int = 6
    evaluations: dict[tuple[Any, ...], Evaluation] = field(default_factory=dict)
    base_metrics: dict[str, Any] = field(default_factory=dict)
    twin_runs: int = 0
    min_gain: float = MIN_GAIN

    def _predict(self, plan: Plan, rate: float = 1.0) -> dict[str, Any]:
        self.twin_runs += 1
        return self.predictor(plan, rate)

    def max_rate(self, plan: Plan) -> float:
        """Highest arrival-rate multiplier meeting the SLO (0 when even 1/64 of the load misses it)."""
        def ok(rate: float) -> bool:
            return self.slo.met(self._predict(plan, rate))

        lo, hi = 1.0, 1.0
        if ok(1.0):
            while hi < 64 and ok(hi * 2):
                hi *= 2
            lo, hi = hi, hi * 2
        else:
            while lo > 1 / 64 and not ok(lo / 2):
                lo /= 2
            if lo <= 1 / 64:
                return 0.0
            lo, hi = lo / 2, lo
        for _ in range(self.bisection_steps):
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if ok(mid) else (lo, mid)
        return lo

    def evaluate(self, plan: Plan) -> Evaluation:
        key = plan.key()
        if key in self.evaluations:
            return self.evaluations[key]
        reason = structurally_valid(plan, self.max_model_len)
        if reason:
            ev = Evaluation(plan, None, INFEASIBLE * 2, error=reason)
        else:
            try:
                metrics = self._predict(plan)
                if self.slo.active:
                    rate = self.max_rate(plan)
                    ev = Evaluation(plan, metrics, rate, slo_rate=rate)
                else:
                    ev = Evaluation(plan, metrics, score(self.objective, metrics, plan, self.base_metrics))
            except Exception as exc:  # vLLM rejected the configuration (EngineArgsError) or the twin failed
                ev = Evaluation(plan, None, INFEASIBLE * 2, error=f"{type(exc).__name__}: {exc}")
        self.evaluations[key] = ev
        return ev

    def run(self, start: Plan, budget_s: float = 300.0) -> list[Evaluation]:
        started = time.monotonic()
        self.base_metrics = self._predict(start)
        best = self.evaluate(start)
        for _ in range(self.max_passes):
            moved = False
            for knob in KNOBS:
                if time.monotonic() - started > budget_s:
                    break
                for candidate in self.space.neighbours(best.plan, knob):
                    ev = self.evaluate(candidate)
                    if ev.score > best.score + 1e-12:
                        best, moved = ev, True
            if not moved:
                break
        return self.ranked(start)

    def ranked(self, start: Plan) -> list[Evaluation]:
        """Best first; plans predicted to gain less than `min_gain` come after the captured settings."""
        ranked = sorted(self.evaluations.values(), key=lambda e: e.score, reverse=True)
        captured = self.evaluations[start.key()]
        if self.slo.active or self.min_gain <= 0 or captured.metrics is None:
            return ranked

        def significant(e: Evaluation) -> bool:
            if e is captured or e.metrics is None:
                return False
            gain = relative_gain(self.objective, e.metrics, self.base_metrics)
            return gain is None or gain >= self.min_gain

        first = [e for e in ranked if significant(e)]
        return first + [captured] + [e for e in ranked if e is not captured and not significant(e)]


def scaled_arrivals(requests: Sequence[Any], rate: float) -> list[Any]:
    """The trace with its arrival times divided by `rate` (rate 2 = the same requests twice as fast)."""
    if rate == 1.0:
        return list(requests)
    return [dataclasses.replace(r, arrival_s=r.arrival_s / rate) for r in requests]
