"""Bounded non-linear least squares (numpy only) for the latency model's eight parameters.

Levenberg–Marquardt with Marquardt's diagonal scaling, lower bounds held by projection and an active
set (a parameter at its bound whose gradient pushes it further out is frozen for that step), and the
Huber loss by iteratively reweighted least squares. Every step is accepted only when it lowers the true
(robust) cost, so the result is a local minimum of the same objective scipy.optimize.least_squares
minimises: ½·Σ r² (linear), or ½·f²·Σ ρ((r/f)²) with ρ(z) = z for z ≤ 1 and 2√z − 1 beyond (huber).

Why not scipy: importing scipy.optimize costs ~0.35 s of CPU (a quarter of `analyze`'s budget on a
1,000-request run) for a fit that takes ~10 ms. tests/test_latency_solver.py checks that this solver
reaches scipy's optimum (trust-region-reflective, the method curve_fit uses with bounds) on the data
shapes the model sees.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

Float = NDArray[np.float64]

_LAMBDA_START = 1e-3  # relative to the largest diagonal entry of JᵀJ
_LAMBDA_MAX = 1e16  # no step lowers the cost any more: a minimum within rounding
_TINY = 1e-300
_WINDOW = 20


@dataclass
class FitResult:
    x: Float
    cost: float
    success: bool
    message: str
    nfev: int
    njev: int


def _weights(r: Float, loss: str, f_scale: float) -> tuple[float, Float | None]:
    """(cost, row weights √ρ'(z)) for the residuals; weights None for the linear loss."""
    if loss == "linear":
        return 0.5 * float(r @ r), None
    z = (r / f_scale) ** 2
    big = z > 1.0
    rho = np.where(big, 2.0 * np.sqrt(np.where(big, z, 1.0)) - 1.0, z)
    w = np.where(big, 1.0 / np.sqrt(np.sqrt(np.where(big, z, 1.0))), 1.0)  # √ρ'(z), ρ' = 1/√z beyond 1
    return 0.5 * f_scale**2 * float(rho.sum()), w


def least_squares_bounded(
    fun: Callable[[Float], Float],
    jac: Callable[[Float], Float],
    x0: Float,
    lower: Float,
    *,
    loss: str = "linear",
    f_scale: float = 1.0,
    max_nfev: int = 2000,
    ftol: float = 1e-8,
    xtol: float = 1e-8,
    gtol: float = 1e-10,
) -> FitResult:
    """Minimise the (robust) sum of squares of `fun(x)` subject to x ≥ `lower`.

    Success: an accepted step gained less than `ftol` relative (so did its prediction and the undamped
    Gauss–Newton step's), every parameter moved by less than `xtol` relative, the last 20 steps
    together gained less than 20·`ftol`, the scaled gradient of the free parameters is below `gtol`,
    or no damping finds a lower cost. Not success: `max_nfev` evaluations ran out (the best x found
    is returned)."""
    if loss not in ("linear", "huber"):
        raise ValueError(f"loss must be 'linear' or 'huber', got {loss!r}")
    # A trial step may overshoot into overflow; it is rejected by its non-finite cost, quietly.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return _minimise(fun, jac, x0, lower, loss, f_scale, max_nfev, ftol, xtol, gtol)


def _minimise(fun: Callable[[Float], Float], jac: Callable[[Float], Float], x0: Float, lower: Float, loss: str,
              f_scale: float, max_nfev: int, ftol: float, xtol: float, gtol: float) -> FitResult:
    x = np.maximum(np.asarray(x0, dtype=float), lower)
    r = fun(x)
    cost, w = _weights(r, loss, f_scale)
    if not np.isfinite(cost):
        raise ValueError("the residuals are not finite at the starting point")
    nfev, njev = 1, 0
    lam: float | None = None
    recent = [cost]  # the cost after each of the last _WINDOW accepted steps
    while nfev < max_nfev:
        j = jac(x)
        njev += 1
        if w is not None:
            j, rw = j * w[:, None], r * w
        else:
            rw = r
        g = j.T @ rw
        a = j.T @ j
        free = ~((x <= lower * (1.0 + 1e-12) + _TINY) & (g > 0.0))
        diag = np.maximum(np.diag(a)[free], _TINY)
        gf = g[free]
        if float(np.max(np.abs(gf) / np.sqrt(diag), initial=0.0)) <= gtol * max(np.sqrt(2.0 * cost), _TINY):
            return FitResult(x, cost, True, "gradient below gtol", nfev, njev)
        af = a[np.ix_(free, free)]
        if lam is None:
            lam = _LAMBDA_START
        while True:
            try:
                step = np.linalg.solve(af + lam * np.diag(diag), -gf)
            except np.linalg.LinAlgError:
                step = None
            if step is not None and np.all(np.isfinite(step)):
                x_new = x.copy()
                x_new[free] += step
                x_new = np.maximum(x_new, lower)
                r_new = fun(x_new)
                nfev += 1
                cost_new, w_new = _weights(r_new, loss, f_scale)
                if np.isfinite(cost_new) and cost_new < cost:
                    # per parameter: a norm over all of them is dominated by the largest (P_max ~ 1e3)
                    still = bool(np.all(np.abs(x_new - x) <= xtol * (xtol + np.abs(x_new))))
                    predicted = float(-(gf @ step) - 0.5 * step @ af @ step)  # by the damped step
                    actual = cost - cost_new
                    # Converged when this step gained next to nothing *and* so would the undamped
                    # Gauss–Newton step (½·gᵀA⁺g): a heavily damped step in a flat valley gains little
                    # too, long before the minimum (stopping there cost 1-2 % on real runs).
                    small_drop = actual <= ftol * cost and predicted <= ftol * cost and \
                        0.5 * float(gf @ np.linalg.lstsq(af, gf, rcond=None)[0]) <= ftol * cost
                    x, r, cost, w = x_new, r_new, cost_new, w_new
                    lam = max(lam / 3.0, 1e-15)
                    if small_drop:
                        return FitResult(x, cost, True, "relative cost reduction below ftol", nfev, njev)
                    recent = [*recent[-_WINDOW:], cost]
                    if len(recent) > _WINDOW and recent[0] - cost <= _WINDOW * ftol * cost:
                        # crawling along a flat valley: the last steps together gained ~nothing
                        return FitResult(x, cost, True, f"cost stalled over {_WINDOW} steps", nfev, njev)
                    if still:
                        return FitResult(x, cost, True, "relative step below xtol", nfev, njev)
                    break
            lam *= 4.0
            if lam > _LAMBDA_MAX:
                return FitResult(x, cost, True, "no step lowers the cost (local minimum)", nfev, njev)
            if nfev >= max_nfev:
                break
    return FitResult(x, cost, False, f"stopped after {nfev} evaluations (max_nfev)", nfev, njev)
