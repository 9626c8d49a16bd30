"""The latency model's numpy solver reaches scipy.optimize.least_squares' optimum (the trust-region
method curve_fit uses with bounds) on the data shapes the model sees, with the bounds held."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from scipy.optimize import least_squares
from test_latency_model import noisy, workload

from service_profiler.model.latency import PARAM_NAMES, _jacobian, _model
from service_profiler.model.solver import least_squares_bounded

LOWER = np.full(len(PARAM_NAMES), 1e-12)
Problem = tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray], np.ndarray, float]


def problem(b: np.ndarray, s: np.ndarray, t: np.ndarray) -> Problem:
    """The scaled problem fit_latency_model solves: median-scaled B and S, the seed's start."""
    sb, ss = float(np.median(b)), float(np.median(s))
    bx, sx = b / sb, s / ss
    start = np.array([np.percentile(s / t, 95), 0.1, 0.01, 0.1, max(np.polyfit(s, t, 1)[0], 1e-6),
                      0.5 * t.min(), 1e-3, 1e-3]) * np.array([1.0, sb, ss, 1.0, ss, 1.0, sb, ss])
    return (lambda p: _model(p, bx, sx) - t), (lambda p: _jacobian(p, bx, sx)), np.maximum(start, 1e-11), \
        max(0.05 * float(np.median(t)), 1e-3)


def with_outliers(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    b, s, t = noisy(n, seed=7)
    t[np.random.default_rng(9).choice(n, n // 20, replace=False)] *= 5
    return b, s, t


def linear_only(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """No saturation at all: the saturation parameters run to their extremes."""
    b, s = workload(n, 11)
    return b, s, 2 + 0.01 * b + 0.001 * s + np.random.default_rng(1).normal(0, 0.01, n)


CASES = {
    "seed-noise-2%": lambda: noisy(300, seed=1, noise=0.02),
    "noise-5%": lambda: noisy(3000, seed=2, noise=0.05),
    "noise-30%": lambda: noisy(2000, seed=5, noise=0.3),
    "near-exact": lambda: noisy(200, seed=4, noise=1e-4),
    "outliers": lambda: with_outliers(3000),
    "linear-only": lambda: linear_only(1000),
}


@pytest.mark.parametrize("loss", ["linear", "huber"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_reaches_scipys_optimum(case: str, loss: str) -> None:
    b, s, t = CASES[case]()
    fun, jac, x0, huber_scale = problem(b, s, t)
    f_scale = huber_scale if loss == "huber" else 1.0
    ref = least_squares(fun, x0, jac=jac, bounds=(LOWER, np.full(len(LOWER), np.inf)), loss=loss,
                        f_scale=f_scale, x_scale=1.0, method="trf", max_nfev=2000)
    ours = least_squares_bounded(fun, jac, x0, LOWER, loss=loss, f_scale=f_scale, max_nfev=2000)
    assert ours.success, ours.message
    assert np.all(ours.x >= LOWER)
    # the same objective value (ours may stop a little lower than scipy: never meaningfully higher)
    assert ours.cost <= ref.cost * (1 + 1e-5), (ours.cost, ref.cost)
    # and the same predictions (residual differences are prediction differences), what the model is for
    assert np.max(np.abs(fun(ours.x) - fun(ref.x))) <= 1e-3 * float(np.max(t))


def test_huber_cost_is_scipys_definition() -> None:
    """cost = ½·f²·Σρ((r/f)²), ρ(z) = z (z ≤ 1) or 2√z − 1: evaluated at a fixed point, no fitting."""
    r = np.array([0.5, -1.0, 3.0, -10.0])
    out = least_squares_bounded(lambda x: r + 0 * x[0], lambda x: np.zeros((4, 1)), np.array([1.0]),
                                np.array([0.0]), loss="huber", f_scale=2.0, max_nfev=1)
    z = (r / 2.0) ** 2
    rho = np.where(z <= 1, z, 2 * np.sqrt(z) - 1)
    assert out.cost == pytest.approx(0.5 * 4.0 * rho.sum())


def test_a_bound_that_binds_is_held_exactly() -> None:
    """min (x0 + 3)² + (x1 − 2)² with x ≥ 0: x0 stops at its bound, x1 at 2."""
    out = least_squares_bounded(lambda x: np.array([x[0] + 3.0, x[1] - 2.0]), lambda x: np.eye(2),
                                np.array([5.0, 5.0]), np.zeros(2))
    assert out.success
    assert out.x[0] == 0.0
    assert out.x[1] == pytest.approx(2.0)
    assert out.cost == pytest.approx(4.5)


def test_running_out_of_evaluations_is_not_success() -> None:
    b, s, t = noisy(300)
    fun, jac, x0, _ = problem(b, s, t)
    out = least_squares_bounded(fun, jac, x0, LOWER, max_nfev=40)
    assert not out.success
    assert "max_nfev" in out.message
    assert out.cost < 0.5 * float(fun(x0) @ fun(x0))  # what it did reach is kept


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="loss"):
        least_squares_bounded(lambda x: x, lambda x: np.eye(1), np.ones(1), np.zeros(1), loss="cauchy")
    with pytest.raises(ValueError, match="not finite"):
        least_squares_bounded(lambda x: x * np.inf, lambda x: np.eye(1), np.ones(1), np.zeros(1))
