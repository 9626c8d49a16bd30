"""The throughput-saturation batch-latency model for one scheduler step's model run.

    Thr(B, S)  = P_max · (1 − e^(−k_B·B)) · (1 − e^(−k_S·S))
    Work(B, S) = w_0 + w_1·S
    T(B, S)    = τ_0 + Work / Thr + τ_B·B + τ_S·S          (ms)

B is the batch size (requests), S the total scheduled tokens. Fitting follows the model's specification:
drop steps with T > max_ms or T < min_ms (300 ms / 1 ms by default), keep B > 0, S > 0, T > 0,
divide B and S by their medians, and solve a bounded non-linear least-squares problem (all
parameters > 0) from a heuristic start. The specification names scipy.optimize.curve_fit; the solver
is `solver.least_squares_bounded` (Levenberg–Marquardt in numpy), which reaches the same optimum
(tests/test_latency_solver.py compares the two) without scipy's ~0.35 s import. ``params`` are
always stored in original units (B in requests, S in tokens, T in ms), so ``predict`` needs no
scaling; ``scales`` records the medians the optimiser worked with.

Large runs: the fit uses at most MAX_FIT_SAMPLES (50,000) of the steps that survive filtering, drawn
deterministically (a seeded random subset, without replacement, in time order) before the train/test
split; the model, its maths and its optimiser are unchanged. A 50k-step sample pins eight parameters
as well as a million steps do, and keeps the fit of a long run to seconds. The JSON says so
(`filtering.n_fit_sample` and a note); `filtering.n_used` and `data_ranges` still cover every step.

Note that P_max, w_0 and w_1 are only identifiable up to a common factor (Work/Thr is unchanged
when all three are multiplied by c); predictions are unaffected, so individual values of those
three should not be compared across fits.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from service_profiler.figures import TITLE_Y, new_figure, save_figure
from service_profiler.outputs import output_dir, write_output_text

PARAM_NAMES: tuple[str, ...] = ("P_max", "k_B", "k_S", "w_0", "w_1", "tau_0", "tau_B", "tau_S")
FORMULA = "T = tau_0 + (w_0 + w_1*S) / (P_max*(1-exp(-k_B*B))*(1-exp(-k_S*S))) + tau_B*B + tau_S*S"
MIN_SAMPLES = 10
SEED_MIN_MS = 1.0
SEED_MAX_MS = 300.0
# Real steps of a tiny model on CPU run well under 1 ms; a 1 ms floor would drop them all.
RELAXED_MIN_MS = 0.05
# Strictly positive lower bound: the model needs every parameter > 0.
_LOWER_BOUND = 1e-12
_MAX_PLOT_POINTS = 5000
MAX_FIT_SAMPLES = 50_000

Float = NDArray[np.float64]


class TooFewSamplesError(ValueError):
    """Fewer than MIN_SAMPLES valid steps survived filtering."""


@dataclass
class LatencyModel:
    """A fitted model; ``params`` in original units (requests, tokens, ms)."""

    params: dict[str, float]
    scales: dict[str, float]
    metrics: dict[str, dict[str, float | None]]
    n_train: int
    n_test: int
    loss: str
    filtering: dict[str, Any] = field(default_factory=dict)
    data_ranges: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def predict(self, batch_size: ArrayLike, total_tokens: ArrayLike) -> float | Float:
        """Predicted model-run time in ms; a float for scalar inputs, an array otherwise."""
        b = np.asarray(batch_size, dtype=float)
        s = np.asarray(total_tokens, dtype=float)
        if np.any(~(b > 0)) or np.any(~(s > 0)):
            # T diverges as B or S → 0; the model is undefined there, so refuse instead of returning inf.
            raise ValueError("batch_size and total_tokens must be > 0 for the latency model")
        out = _model(np.array([self.params[n] for n in PARAM_NAMES]), b, s)
        return float(out) if out.ndim == 0 else out

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": "throughput_saturation",
            "formula": FORMULA,
            "units": {"B": "requests", "S": "tokens", "T": "ms"},
            "params": self.params,
            "scales": self.scales,
            "bounds": {"lower": _LOWER_BOUND, "upper": None, "applies_to": list(PARAM_NAMES)},
            "metrics": self.metrics,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "loss": self.loss,
            "filtering": self.filtering,
            "data_ranges": self.data_ranges,
            "notes": self.notes,
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """The model as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"
        if path is not None:
            write_output_text(path, text)
        return text

    @classmethod
    def from_json(cls, path: str | Path) -> LatencyModel:
        p = Path(path)
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"{p}: no such latency model file") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}: not valid JSON ({exc})") from None
        params = doc.get("params") if isinstance(doc, dict) else None
        missing = [n for n in PARAM_NAMES if not isinstance(params, dict) or n not in params]
        if missing:
            raise ValueError(
                f"{p}: missing parameter(s) {', '.join(missing)} under 'params'; "
                "expected a file written by `service-profiler model fit` or `analyze`"
            )
        assert isinstance(params, dict)
        return cls(
            params={n: float(params[n]) for n in PARAM_NAMES},
            scales={k: float(v) for k, v in doc.get("scales", {}).items()},
            metrics=doc.get("metrics", {}),
            n_train=int(doc.get("n_train", 0)),
            n_test=int(doc.get("n_test", 0)),
            loss=str(doc.get("loss", "linear")),
            filtering=doc.get("filtering", {}),
            data_ranges=doc.get("data_ranges", {}),
            notes=list(doc.get("notes", [])),
        )


def _model(p: Float, b: Float, s: Float) -> Float:
    p_max, k_b, k_s, w0, w1, t0, t_b, t_s = p
    # -expm1(-x) keeps 1 - e^(-x) accurate when k·B or k·S is tiny.
    thr = p_max * -np.expm1(-k_b * b) * -np.expm1(-k_s * s)
    return np.asarray(t0 + (w0 + w1 * s) / thr + t_b * b + t_s * s, dtype=float)


def _jacobian(p: Float, b: Float, s: Float) -> Float:
    p_max, k_b, k_s, w0, w1, _t0, _tb, _ts = p
    eb, es = -np.expm1(-k_b * b), -np.expm1(-k_s * s)
    inv_thr = 1.0 / (p_max * eb * es)
    q = (w0 + w1 * s) * inv_thr  # Work / Thr
    return np.column_stack(
        [
            -q / p_max,
            -q * b * np.exp(-k_b * b) / eb,
            -q * s * np.exp(-k_s * s) / es,
            inv_thr,
            s * inv_thr,
            np.ones_like(b),
            b,
            s,
        ]
    )


def _metrics(y: Float, pred: Float) -> dict[str, float | None]:
    if y.size == 0:
        return {"r2": None, "rmse_ms": None, "mae_ms": None, "mape_pct": None, "n": 0}
    err = pred - y
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(err**2)) / ss_tot if ss_tot > 0 else None
    return {
        "r2": r2,
        "rmse_ms": float(np.sqrt(np.mean(err**2))),
        "mae_ms": float(np.mean(np.abs(err))),
        "mape_pct": float(np.mean(np.abs(err) / y) * 100.0),  # y > 0 after filtering
        "n": int(y.size),
    }


def _filter(
    b: Float, s: Float, t: Float, min_ms: float, max_ms: float
) -> tuple[NDArray[np.bool_], dict[str, Any]]:
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(b) & np.isfinite(s) & np.isfinite(t) & (b > 0) & (s > 0) & (t > 0)
        below = valid & (t < min_ms)
        above = valid & (t > max_ms)
    keep = valid & ~below & ~above
    info = {
        "min_ms": min_ms,
        "max_ms": max_ms,
        "n_input": int(b.size),
        "n_invalid": int(b.size - valid.sum()),
        "n_below_min": int(below.sum()),
        "n_above_max": int(above.sum()),
        "n_used": int(keep.sum()),
    }
    return keep, info


def fit_latency_model(
    batch_size: ArrayLike,
    total_tokens: ArrayLike,
    model_run_ms: ArrayLike,
    *,
    loss: str = "linear",
    min_ms: float = SEED_MIN_MS,
    max_ms: float = SEED_MAX_MS,
    test_fraction: float = 0.2,
    seed: int = 0,
    huber_scale_ms: float | None = None,
    max_samples: int | None = MAX_FIT_SAMPLES,
) -> LatencyModel:
    """Fit T(B, S) to per-step samples.

    ``min_ms``/``max_ms`` are the outlier thresholds (1 ms and 300 ms); steps outside them,
    and steps with a missing or non-positive B, S or T, are dropped. Pass a smaller ``min_ms``
    (e.g. 0.05) for tiny models whose real steps are sub-millisecond. ``loss`` is ``"linear"``
    (squared error) or ``"huber"``; ``huber_scale_ms`` is the residual where Huber turns linear
    (default 5 % of the median step). A seeded random ``test_fraction`` of the samples is held out
    and scored. More than ``max_samples`` surviving steps: a seeded random subset of that many is fitted
    and scored (None: all). Raises TooFewSamplesError (a ValueError) when fewer than 10 samples survive.
    """
    from .solver import least_squares_bounded

    if loss not in ("linear", "huber"):
        raise ValueError(f"loss must be 'linear' or 'huber', got {loss!r}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    b_all = np.asarray(batch_size, dtype=float).ravel()
    s_all = np.asarray(total_tokens, dtype=float).ravel()
    t_all = np.asarray(model_run_ms, dtype=float).ravel()
    if not b_all.size == s_all.size == t_all.size:
        raise ValueError(
            f"batch_size, total_tokens and model_run_ms differ in length "
            f"({b_all.size}, {s_all.size}, {t_all.size})"
        )
    keep, info = _filter(b_all, s_all, t_all, min_ms, max_ms)
    if info["n_used"] < MIN_SAMPLES:
        hint = (
            f" Steps of small models on CPU are often < 1 ms: try min_ms={RELAXED_MIN_MS}."
            if info["n_below_min"] and min_ms > RELAXED_MIN_MS
            else ""
        )
        raise TooFewSamplesError(
            f"only {info['n_used']} of {info['n_input']} samples survived filtering "
            f"({info['n_invalid']} missing/non-positive, {info['n_below_min']} below min_ms={min_ms}, "
            f"{info['n_above_max']} above max_ms={max_ms}); need at least {MIN_SAMPLES}.{hint}"
        )
    b, s, t = b_all[keep], s_all[keep], t_all[keep]
    data_ranges = {
        k: [float(v.min()), float(v.max())] for k, v in (("batch_size", b), ("total_tokens", s), ("model_run_ms", t))
    }
    sample_note: list[str] = []
    if max_samples is not None and b.size > max_samples:
        pick = np.sort(np.random.default_rng(seed).choice(b.size, size=max_samples, replace=False))
        sample_note.append(
            f"fitted on a deterministic random sample of {max_samples:,} of the {b.size:,} steps that "
            f"survived filtering (seed {seed}); train/test metrics are over that sample"
        )
        b, s, t = b[pick], s[pick], t[pick]
        info["n_fit_sample"] = int(max_samples)

    order = np.random.default_rng(seed).permutation(b.size)
    n_test = min(round(test_fraction * b.size), b.size - 1)
    test_idx, train_idx = order[:n_test], order[n_test:]

    b_tr, s_tr, t_tr = b[train_idx], s[train_idx], t[train_idx]
    # Median scaling keeps k_B·B and k_S·S near O(1) so the Jacobian columns are comparable.
    sb, ss = float(np.median(b_tr)), float(np.median(s_tr))
    bx, sx = b_tr / sb, s_tr / ss

    # The heuristic start, stated in original units, then moved into the scaled parameterisation.
    slope = float(np.polyfit(s_tr, t_tr, 1)[0]) if np.ptp(s_tr) > 0 else 0.0
    start = {
        "P_max": float(np.percentile(s_tr / t_tr, 95)),
        "k_B": 0.1,
        "k_S": 0.01,
        "w_0": 0.1,
        "w_1": max(slope, 1e-6),
        "tau_0": 0.5 * float(t_tr.min()),
        "tau_B": 1e-3,
        "tau_S": 1e-3,
    }
    to_scaled = np.array([1.0, sb, ss, 1.0, ss, 1.0, sb, ss])
    x0 = np.maximum(np.array([start[n] for n in PARAM_NAMES]) * to_scaled, 10 * _LOWER_BOUND)

    f_scale = huber_scale_ms if huber_scale_ms is not None else max(0.05 * float(np.median(t_tr)), 1e-3)
    res = least_squares_bounded(
        lambda p: _model(p, bx, sx) - t_tr,
        lambda p: _jacobian(p, bx, sx),
        x0,
        np.full(len(PARAM_NAMES), _LOWER_BOUND),
        loss=loss,
        f_scale=f_scale if loss == "huber" else 1.0,
        max_nfev=2000,
    )
    fitted = res.x / to_scaled
    params = {n: float(v) for n, v in zip(PARAM_NAMES, fitted, strict=True)}
    p_arr = np.asarray(fitted, dtype=float)
    info.update({"test_fraction": test_fraction, "seed": seed, "relaxed": False})
    if loss == "huber":
        info["huber_scale_ms"] = f_scale
    notes = sample_note + ([] if res.success else [f"optimiser stopped without converging: {res.message}"])
    return LatencyModel(
        params=params,
        scales={"batch_size": sb, "total_tokens": ss},
        metrics={
            "train": _metrics(t_tr, _model(p_arr, b_tr, s_tr)),
            "test": _metrics(t[test_idx], _model(p_arr, b[test_idx], s[test_idx])),
        },
        n_train=int(train_idx.size),
        n_test=int(test_idx.size),
        loss=loss,
        filtering=info,
        data_ranges=data_ranges,
        notes=notes,
    )


def fit_and_save(
    batch_size: ArrayLike,
    total_tokens: ArrayLike,
    model_run_ms: ArrayLike,
    out_dir: Path,
    *,
    loss: str = "linear",
    min_ms: float | None = None,
    max_ms: float = SEED_MAX_MS,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> LatencyModel | None:
    """Fit, then write latency_model.json, latency_residuals.png and latency_contour.png.

    With ``min_ms=None`` the 1 ms floor is tried first and, when fewer than 10 samples
    survive it, relaxed to 0.05 ms (recorded in the JSON). An explicit ``min_ms`` is never
    relaxed. When the data cannot support a fit, a note is printed, nothing is written and None is
    returned, so `analyze` carries on.
    """
    attempts = [SEED_MIN_MS, RELAXED_MIN_MS] if min_ms is None else [min_ms]
    model: LatencyModel | None = None
    reasons: list[str] = []
    for floor in attempts:
        try:
            model = fit_latency_model(
                batch_size, total_tokens, model_run_ms,
                loss=loss, min_ms=floor, max_ms=max_ms, test_fraction=test_fraction, seed=seed,
            )  # fmt: skip
            break
        except TooFewSamplesError as exc:
            reasons.append(str(exc))
        except (ValueError, np.linalg.LinAlgError) as exc:
            reasons.append(f"fit failed: {exc}")
            break
    if model is None:
        print(f"latency model: not fitted: {reasons[-1]}", file=sys.stderr)
        return None
    if len(reasons) > 0:
        model.filtering["relaxed"] = True
        model.notes.append(
            f"fewer than {MIN_SAMPLES} steps within the {SEED_MIN_MS}-{max_ms} ms window; "
            f"min_ms relaxed to {model.filtering['min_ms']} ms (sub-millisecond steps: a small CPU model?)"
        )
        print(f"latency model: {model.notes[-1]}", file=sys.stderr)

    out_dir = output_dir(Path(out_dir))
    model.to_json(out_dir / "latency_model.json")
    b = np.asarray(batch_size, dtype=float).ravel()
    s = np.asarray(total_tokens, dtype=float).ravel()
    t = np.asarray(model_run_ms, dtype=float).ravel()
    keep, _ = _filter(b, s, t, float(model.filtering["min_ms"]), max_ms)
    _plot_residuals(model, b[keep], s[keep], t[keep], out_dir / "latency_residuals.png")
    _plot_contour(model, b[keep], s[keep], out_dir / "latency_contour.png")
    return model


def _subsample(n: int, limit: int) -> NDArray[np.intp]:
    # Drawing 70k markers costs seconds and shows nothing more than 5k do.
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, size=limit, replace=False))


def _plot_residuals(model: LatencyModel, b: Float, s: Float, t: Float, path: Path) -> None:
    pred = np.asarray(model.predict(b, s))
    resid = t - pred
    idx = _subsample(t.size, _MAX_PLOT_POINTS)
    fig = new_figure((11, 4.5))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.scatter(pred[idx], resid[idx], s=6, alpha=0.4)
    ax1.axhline(0.0, color="black", linewidth=0.8)
    ax1.set_xlabel("predicted model run (ms)")
    ax1.set_ylabel("observed − predicted (ms)")
    ax1.set_title("Residuals vs predicted", y=TITLE_Y)
    counts, edges = np.histogram(resid, bins=60)
    ax2.stairs(counts, edges, fill=True, alpha=0.85)  # one polygon, where ax.hist draws one patch per bin
    ax2.stairs(counts, edges, color="black", linewidth=0.4)
    ax2.set_xlabel("observed − predicted (ms)")
    ax2.set_ylabel("steps")
    test = model.metrics.get("test", {})
    r2 = test.get("r2")
    mape = test.get("mape_pct")
    label = f"held-out R² {r2:.3f}, MAPE {mape:.1f} %" if r2 is not None and mape is not None else ""
    ax2.set_title(f"Residual distribution  {label}", y=TITLE_Y)
    fig.subplots_adjust(wspace=0.3)  # room for the right panel's tick labels and y label
    save_figure(fig, path)


def _axis_grid(lo: float, hi: float, n: int = 80) -> tuple[Float, bool]:
    # A log axis when the range spans decades (decode S≈B next to 8k-token prefills).
    if hi > lo * 50:
        return np.geomspace(lo, hi, n), True
    return np.linspace(lo, hi if hi > lo else lo + 1.0, n), False


def _plot_contour(model: LatencyModel, b: Float, s: Float, path: Path) -> None:
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import LogLocator

    gb, log_b = _axis_grid(float(b.min()), float(b.max()))
    gs, log_s = _axis_grid(float(s.min()), float(s.max()))
    bb, ssg = np.meshgrid(gb, gs)
    tt = np.asarray(model.predict(bb, ssg))
    fig = new_figure((8, 6))
    ax = fig.subplots()
    # T blows up towards B, S → 0, so levels span only what the observed steps reach (the corner
    # beyond is one "extend" colour) and are log-spaced when that range covers a decade or more.
    lo = float(tt.min())
    hi = max(float(np.max(model.predict(b, s))), lo * 1.05)
    log_t = hi > 10 * lo
    levels = np.geomspace(lo, hi, 21) if log_t else np.linspace(lo, hi, 21)
    norm = LogNorm(lo, hi) if log_t else None
    filled = ax.contourf(bb, ssg, tt, levels=levels, norm=norm, cmap="viridis", extend="max")
    # Unlabelled lines: clabel's label placement alone took longer than the rest of the figure; the
    # colorbar carries the values.
    ax.contour(bb, ssg, tt, levels=levels[::2], colors="white", linewidths=0.6)
    fig.colorbar(filled, ax=ax, label="predicted model run (ms)", format="%.3g")
    idx = _subsample(b.size, _MAX_PLOT_POINTS)
    ax.scatter(b[idx], s[idx], s=5, c="red", alpha=0.35)
    # log axes: minor ticks at 2x and 5x each decade only (the default 2x..9x made minor-tick creation
    # ~40 % of this figure's drawing time, and crowds the axis)
    if log_b:
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    if log_s:
        ax.set_yscale("log")
        ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    ax.set_xlabel("batch size B (requests)")
    ax.set_ylabel("total scheduled tokens S (tokens)")
    ax.set_title("Latency model T(B, S) (ms); red: observed steps", y=TITLE_Y)
    save_figure(fig, path, margins_in=(0.95, 0.1, 0.6, 0.45))  # the colorbar axes sit inside the right margin
