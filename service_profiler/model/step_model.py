"""Step-time model v2: one engine step's duration from what the step computes.

    T = c_0 + c_req·B + c_p·P + c_d·D + c_pc·C_p + c_dc·C_d + c_shape·N + c_prefill_only·O     (ms)

B requests in the step, P prefill tokens, D decode tokens, C_p the prefill attention work (Σ chunk ×
(tokens before + chunk/2): each new token attends to the context before it), C_d the decode context
(Σ tokens attended), N = 1 when the step's token count missed the engine's kernel cache (the kernels
for that shape are built first: see twin/shapes.py; 0 otherwise, and for callers that pass only the
first five features), O = 1 for a step of prefill tokens only (no decode token; derived from P and D,
not an input). c_0 and c_req are the per-step and per-request fixed costs (schedule, input
preparation, sampling, update); the token terms the model's work. O is there because measured
prefill-only steps of the CPU engine cost a fixed amount more than a mixed step of the same prefill
(a request arriving at an idle engine, the later chunks of a prompt cut into chunks); fitted on the
mixed and decode steps that outnumber them, those steps came out too cheap, and with them the time to
first token at light load. All coefficients are >= 0
(scipy's non-negative least squares). The fit minimises relative error (rows weighted by 1/T), since the
twin's errors compound in relative terms, and is refitted once without steps whose relative residual is
beyond 5 MADs (host hiccups: a GC pause, another process on the core).

The target is the step's cycle: schedule start to the next schedule start while the engine has work, so
the engine's own loop overheads are in it. Held-out error is reported per regime (decode-only,
prefill-only, mixed), beside the same split scored by the T(B,S) form of `latency.py` fitted to the
same target, so a caller can use whichever predicts better. The noise floor is the error of an oracle
that predicts each step by the median of steps with the very same (B, P, D, N): no model of these
features can do better on average.

`time_scale` is the measured total step time over the predicted total on the training steps that are
not stalls: a fit of relative error leans below the mean, and the scale puts the typical step's mean
back. Stalls (steps beyond 5 MADs: the first step of a new shape, a GC pause, the engine descheduled) are
not spread over every step: they are host events, not a cost of what a step computes, and in short
captures a handful of them can hold half the busy time. They are reported (`metrics["stalls"]`: count,
time beyond the model, share of the busy time) so a caller can say what the prediction leaves out.
The twin multiplies by the scale; the held-out report gives the error with and without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

FEATURES: tuple[str, ...] = ("batch_size", "prefill_tokens", "decode_tokens", "prefill_context", "decode_context",
                             "new_shape")
COEFFICIENTS: tuple[str, ...] = ("c_0", "c_req", "c_p", "c_d", "c_pc", "c_dc", "c_shape", "c_prefill_only")
# Added after the first five features: models saved without them read them as 0.
OPTIONAL_COEFFICIENTS: tuple[str, ...] = ("c_shape", "c_prefill_only")
FORMULA = "T = c_0 + c_req*B + c_p*P + c_d*D + c_pc*C_p + c_dc*C_d + c_shape*N + c_prefill_only*O"
MIN_SAMPLES = 20
_OUTLIER_MADS = 5.0

Float = NDArray[np.float64]


@dataclass
class StepModelV2:
    """Fitted coefficients (ms per unit) and the held-out report."""

    coefficients: dict[str, float]
    metrics: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    time_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in OPTIONAL_COEFFICIENTS:
            self.coefficients.setdefault(name, 0.0)

    def predict_ms(self, batch_size: float, prefill_tokens: float, decode_tokens: float, prefill_context: float,
                   decode_context: float, new_shape: float = 0.0) -> float:
        c = self.coefficients
        prefill_only = float(prefill_tokens > 0 and decode_tokens == 0)
        return (c["c_0"] + c["c_req"] * batch_size + c["c_p"] * prefill_tokens + c["c_d"] * decode_tokens
                + c["c_pc"] * prefill_context + c["c_dc"] * decode_context + c["c_shape"] * new_shape
                + c["c_prefill_only"] * prefill_only)

    def predict_many(self, x: Float) -> Float:
        """x: rows of FEATURES (the last, new_shape, may be left out); returns ms."""
        coef = np.array([self.coefficients[n] for n in COEFFICIENTS])
        return np.asarray(_design(_full(x)) @ coef, dtype=float)

    def to_dict(self) -> dict[str, Any]:
        return {"model": "step_time_v2", "formula": FORMULA, "units": {"T": "ms"},
                "coefficients": self.coefficients, "time_scale": self.time_scale, "metrics": self.metrics,
                "notes": self.notes}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> StepModelV2:
        coefficients = doc.get("coefficients") if isinstance(doc, dict) else None
        required = [n for n in COEFFICIENTS if n not in OPTIONAL_COEFFICIENTS]
        if not isinstance(coefficients, dict) or any(n not in coefficients for n in required):
            raise ValueError(f"not a step_time_v2 model: expected coefficients {', '.join(COEFFICIENTS)}")
        return cls({n: float(coefficients[n]) for n in COEFFICIENTS if n in coefficients}, doc.get("metrics", {}),
                   doc.get("notes", []), float(doc.get("time_scale", 1.0)))


def _full(x: Float) -> Float:
    """Rows of FEATURES; rows of the first five get new_shape = 0."""
    if x.shape[1] == len(FEATURES) - 1:
        return np.column_stack([x, np.zeros(len(x))])
    return x


def _design(x: Float) -> Float:
    """Rows of FEATURES -> the terms the coefficients multiply (COEFFICIENTS' order)."""
    prefill_only = ((x[:, 1] > 0) & (x[:, 2] == 0)).astype(float)
    return np.column_stack([np.ones(len(x)), x, prefill_only])


def _mape(y: Float, pred: Float) -> float | None:
    return float(np.mean(np.abs(pred - y) / y) * 100.0) if y.size else None


def _median_ape(y: Float, pred: Float) -> float | None:
    return float(np.median(np.abs(pred - y) / y) * 100.0) if y.size else None


def _nnls_relative(x: Float, y: Float) -> Float:
    from scipy.optimize import nnls

    a = _design(x) / y[:, None]
    scale = np.maximum(np.abs(a).max(axis=0), 1e-300)
    coef, _ = nnls(a / scale, np.ones_like(y), maxiter=50 * a.shape[1])
    return np.asarray(coef / scale, dtype=float)


def _regimes(x: Float) -> dict[str, NDArray[np.bool_]]:
    prefill, decode = x[:, 1] > 0, x[:, 2] > 0
    return {"decode_only": decode & ~prefill, "prefill_only": prefill & ~decode, "mixed": prefill & decode}


def _report(x: Float, y: Float, pred: Float) -> dict[str, Any]:
    out: dict[str, Any] = {"all": {"n": int(y.size), "mape_pct": _mape(y, pred),
                                   "median_ape_pct": _median_ape(y, pred)}}
    for name, mask in _regimes(x).items():
        out[name] = {"n": int(mask.sum()), "mape_pct": _mape(y[mask], pred[mask]),
                     "median_ape_pct": _median_ape(y[mask], pred[mask])}
    return out


def noise_floor(x: Float, y: Float, min_group: int = 5) -> dict[str, Any]:
    """MAPE of predicting each step by the median of the steps with identical (B, P, D, N)."""
    x = _full(x)
    groups: dict[tuple[float, float, float, float], list[int]] = {}
    for i, row in enumerate(x):
        groups.setdefault((row[0], row[1], row[2], row[5]), []).append(i)
    errors: list[Float] = []
    for members in groups.values():
        if len(members) >= min_group:
            values = y[members]
            errors.append(np.abs(values - np.median(values)) / values)
    if not errors:
        return {"mape_pct": None, "n": 0}
    flat = np.concatenate(errors)
    return {"mape_pct": float(flat.mean() * 100.0), "median_ape_pct": float(np.median(flat) * 100.0),
            "n": int(flat.size), "groups": len(errors)}


def fit_step_model(x: Any, y_ms: Any, *, test_fraction: float = 0.2, seed: int = 0) -> StepModelV2:
    """Fit on rows of FEATURES (or of the first five: new_shape = 0) and step times (ms); a seeded
    `test_fraction` is held out and scored, beside the T(B,S) form fitted to the same training rows.
    Raises ValueError with too few steps."""
    xa = np.asarray(x, dtype=float)
    xa = _full(xa.reshape(-1, xa.shape[-1] if xa.ndim == 2 else len(FEATURES)))
    ya = np.asarray(y_ms, dtype=float).ravel()
    keep = np.isfinite(ya) & (ya > 0) & np.all(np.isfinite(xa), axis=1) & (xa[:, 0] > 0)
    xa, ya = xa[keep], ya[keep]
    if ya.size < MIN_SAMPLES:
        raise ValueError(f"only {ya.size} usable steps (need {MIN_SAMPLES}) to fit the step-time model; "
                         "capture a longer run")
    order = np.random.default_rng(seed).permutation(ya.size)
    n_test = round(test_fraction * ya.size)
    test, train = order[:n_test], order[n_test:]
    coef = _nnls_relative(xa[train], ya[train])
    rel = (_design(xa[train]) @ coef - ya[train]) / ya[train]
    mad = float(np.median(np.abs(rel - np.median(rel)))) or 1e-9
    inliers = np.abs(rel - np.median(rel)) <= _OUTLIER_MADS * mad
    notes = []
    if (~inliers).any():
        notes.append(f"{int((~inliers).sum())} of {train.size} training steps beyond {_OUTLIER_MADS:g} MADs "
                     "left out of the refit")
        coef = _nnls_relative(xa[train][inliers], ya[train][inliers])
    model = StepModelV2({n: float(v) for n, v in zip(COEFFICIENTS, coef, strict=True)}, notes=notes)
    predicted_train = model.predict_many(xa[train])
    # Stalls: outliers on the slow side (rel is (predicted - measured) / measured, so a stall is far below).
    stalls = ~inliers & (rel < np.median(rel))
    total = float(predicted_train[~stalls].sum())
    model.time_scale = max(float(ya[train][~stalls].sum()) / total, 1e-3) if total > 0 else 1.0
    stall_excess = np.maximum(ya[train][stalls] - predicted_train[stalls] * model.time_scale, 0.0)
    metrics: dict[str, Any] = {"n_train": int(train.size), "n_test": int(test.size),
                               "train": _report(xa[train], ya[train], predicted_train),
                               "stalls": {"model": "v2", "count": int(stalls.sum()),
                                          "excess_ms": float(stall_excess.sum()),
                                          "share_of_busy_time": float(stall_excess.sum() / ya[train].sum())}}
    if test.size:
        metrics["test"] = _report(xa[test], ya[test], model.predict_many(xa[test]))
        metrics["test_scaled"] = _report(xa[test], ya[test], model.predict_many(xa[test]) * model.time_scale)
        metrics["test_total_time_error_pct"] = float(
            (model.predict_many(xa[test]).sum() * model.time_scale / ya[test].sum() - 1.0) * 100.0)
        metrics["baseline_tbs_test"] = _baseline(xa[train], ya[train], xa[test], ya[test])
    metrics["noise_floor"] = noise_floor(xa, ya)
    model.metrics = metrics
    return model


def _baseline(x_tr: Float, y_tr: Float, x_te: Float, y_te: Float) -> dict[str, Any]:
    """The T(B,S) model of latency.py fitted to the same training steps, scored on the same test steps."""
    from .latency import RELAXED_MIN_MS, fit_latency_model

    s_tr = x_tr[:, 1] + x_tr[:, 2]
    s_te = x_te[:, 1] + x_te[:, 2]
    try:
        base = fit_latency_model(x_tr[:, 0], s_tr, y_tr, min_ms=min(RELAXED_MIN_MS, float(y_tr.min())),
                                 max_ms=float(y_tr.max()) + 1.0, test_fraction=0.0)
    except ValueError as exc:
        return {"error": str(exc)}
    ok = s_te > 0
    pred = np.asarray(base.predict(x_te[ok, 0], s_te[ok]), dtype=float)
    report = _report(x_te[ok], y_te[ok], pred)
    report["params"] = base.params
    return report
