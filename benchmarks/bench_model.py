"""Time the latency-model fit (and its two plots) on 70k synthetic steps.

    .venv/bin/python benchmarks/bench_model.py [--n 70000] [--loss linear|huber]

Steps are drawn from a known T(B, S) with 2 % multiplicative noise, so the printed held-out
error also says whether the fit is still right, not only whether it is fast. The analysis plots are
timed with the rest of `analyze` (bench_columnar.py --format plots).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from service_profiler.model.latency import PARAM_NAMES, _model, fit_and_save, fit_latency_model

TRUE = np.array([100.0, 0.15, 0.004, 50.0, 1.0, 5.0, 0.05, 0.002])  # PARAM_NAMES order


def synthetic_steps(n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    b = rng.integers(1, 129, n).astype(float)
    s = np.where(rng.random(n) < 0.3, b - 1 + rng.integers(16, 4096, n), b)
    t = _model(TRUE, b, s) * (1 + 0.02 * rng.standard_normal(n))
    return b, s, t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=70_000, help="number of steps (default 70000)")
    parser.add_argument("--loss", choices=("linear", "huber"), default="linear")
    args = parser.parse_args()

    b, s, t = synthetic_steps(args.n)
    import matplotlib  # noqa: F401  # import once up front so the timings below exclude it

    t0 = time.perf_counter()
    model = fit_latency_model(b, s, t, loss=args.loss)
    fit_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        fit_and_save(b, s, t, Path(tmp) / "model", loss=args.loss)
        save_s = time.perf_counter() - t0

    test = model.metrics["test"]
    print(f"steps: {args.n} ({model.n_train} train / {model.n_test} held out), loss={args.loss}")
    print(f"fit_latency_model:         {fit_s:.3f} s")
    print(f"fit_and_save (fit + 2 PNG): {save_s:.3f} s")
    print(
        f"held-out R² {test['r2']:.5f}  RMSE {test['rmse_ms']:.3f} ms  MAE {test['mae_ms']:.3f} ms  "
        f"MAPE {test['mape_pct']:.2f} %"
    )
    print("params:", ", ".join(f"{k}={model.params[k]:.4g}" for k in PARAM_NAMES))


if __name__ == "__main__":
    main()
