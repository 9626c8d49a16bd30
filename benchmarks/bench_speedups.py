"""ns per call of an installed-but-inactive probe: C ProbeSwitch versus the pure-Python wrapper.

    python setup.py build_ext --inplace   # once, in a development checkout
    python benchmarks/bench_speedups.py

Target: an inactive probe adds <= 100 ns over a bare method call (ideally 20-40 ns). Each figure is
the best of REPEATS runs of CALLS calls. Two call forms: a bound method cached up front (what vLLM
keeps from init: `step = engine.step; step(out)`) and a fresh attribute call (`engine.step(out)`).
"""

from __future__ import annotations

import functools
import sys
import timeit
from collections.abc import Callable
from typing import Any

from service_profiler.runtime.speedups import HAVE_SPEEDUPS, make_switch

CALLS = 500_000
REPEATS = 15


class Probe:
    def __init__(self) -> None:
        self.active = False


def step(self: object, scheduler_output: object, n: int = 1) -> int:
    return n


def python_wrapper(fn: Callable[..., Any], probe: Probe) -> Callable[..., Any]:
    """The shape of probes.make_timer's wrapper: the inactive path is one flag test and a forward."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not probe.active:
            return fn(*args, **kwargs)
        return fn(*args, **kwargs)  # (timing elided: never reached here)

    return wrapper


def engine_with(method: Any) -> object:
    cls = type("Engine", (), {"step": method})
    return cls()


def timers(engine: object) -> tuple[timeit.Timer, timeit.Timer]:
    """(cached bound method, attribute call)."""
    out = object()
    cached = timeit.Timer("step(out)", globals={"step": engine.step, "out": out})  # type: ignore[attr-defined]
    attr = timeit.Timer("engine.step(out)", globals={"engine": engine, "out": out})
    return cached, attr


def measure(engines: list[object]) -> list[list[float]]:
    """ns per call for each engine and call form, best of REPEATS; the runs are interleaved so that a
    burst of load on the machine hits every row alike."""
    all_timers = [timers(engine) for engine in engines]
    best = [[float("inf")] * 2 for _ in engines]
    for _ in range(REPEATS):
        for row, pair in enumerate(all_timers):
            for form, timer in enumerate(pair):
                best[row][form] = min(best[row][form], timer.timeit(number=CALLS) / CALLS * 1e9)
    return best


def main() -> None:
    print(f"Python {sys.version.split()[0]}, C extension: {'yes' if HAVE_SPEEDUPS else 'NO (not built)'}")
    probe = Probe()
    wrapper = python_wrapper(step, probe)
    rows: list[tuple[str, object]] = [("bare method", engine_with(step))]
    if HAVE_SPEEDUPS:
        switch, _ = make_switch(step, wrapper)
        rows.append(("ProbeSwitch inactive", engine_with(switch)))
    rows.append(("pure-Python wrapper inactive", engine_with(wrapper)))

    results = list(zip([name for name, _ in rows], measure([engine for _, engine in rows]), strict=True))
    bare = results[0][1]
    print(f"{'':30} {'cached step(out)':>24} {'engine.step(out)':>24}")
    for name, (cached, attr) in results:
        cells = [f"{v:6.1f} ns (+{v - b:5.1f})" for v, b in ((cached, bare[0]), (attr, bare[1]))]
        print(f"{name:30} {cells[0]:>24} {cells[1]:>24}")


if __name__ == "__main__":
    main()
