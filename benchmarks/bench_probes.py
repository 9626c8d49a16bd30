"""Per-call overhead of a probe over a bare method call (targets from the collection-runtime issue).

    python benchmarks/bench_probes.py

Targets on the 2-core dev machine: timer enabled <= 800 ns, timer with two attributes <= 1,500 ns,
installed but disabled <= 100 ns (overhead over the bare call, best of several repeats).
"""

from __future__ import annotations

import inspect
import tempfile
import timeit
from pathlib import Path

from service_profiler.runtime import probes
from service_profiler.runtime.expressions import compile_expression
from service_profiler.runtime.recorder import SPAN, Recorder
from service_profiler.runtime.speedups import HAVE_SPEEDUPS, make_switch

CALLS = 200_000
REPEATS = 9


class Target:
    def __init__(self) -> None:
        self.input_batch = [1, 2, 3]

    def step(self, scheduler_output: object, n: int = 1) -> int:
        return n


def _measure(obj: Target, buffer: list[object]) -> float:
    """ns per `obj.step(out)` call, best of REPEATS; the buffer is emptied between repeats, as the
    writer thread does every second in a real process."""
    out = object()
    timer = timeit.Timer("step(out)", globals={"step": obj.step, "out": out})
    best = float("inf")
    for _ in range(REPEATS):
        best = min(best, timer.timeit(number=CALLS))
        buffer.clear()
    return best / CALLS * 1e9


def main() -> None:
    recorder = Recorder(Path(tempfile.mkdtemp()), max_buffered=10_000_000)
    original = Target.step
    signature = inspect.signature(original)

    def probe_for(attributes: tuple[tuple[str, object], ...]) -> probes.Probe:
        return probes.Probe("bench:Target.step", "Bench", "step", recorder.channel(SPAN, "Bench", "step"),
                            recorder.buffer, recorder.max_buffered, recorder.count_dropped, print,
                            attributes=attributes)  # type: ignore[arg-type]

    results: dict[str, float] = {}
    Target.step = original  # type: ignore[method-assign]
    results["bare call"] = _measure(Target(), recorder.buffer)

    plain = probe_for(())
    python_wrapper = probes.make_timer(original, plain)
    Target.step = python_wrapper  # type: ignore[method-assign]
    plain.active = False
    results["disabled, Python wrapper"] = _measure(Target(), recorder.buffer)
    # What the runtime installs for sync targets: the C switch (when built) in front of the wrapper.
    switch, set_active = make_switch(original, python_wrapper)
    Target.step = switch  # type: ignore[method-assign]
    set_active(False)
    results["installed, disabled"] = _measure(Target(), recorder.buffer)
    set_active(True)
    plain.active = True
    results["timer, enabled"] = _measure(Target(), recorder.buffer)
    recorder.buffer.clear()

    two = probe_for((("batch", compile_expression("args[0] | attr input_batch | len", signature)),
                     ("n", compile_expression("n", signature))))
    two.active = True
    Target.step, set_two = make_switch(original, probes.make_timer(original, two))  # type: ignore[method-assign]
    set_two(True)
    results["timer + 2 attributes"] = _measure(Target(), recorder.buffer)
    recorder.buffer.clear()
    Target.step = original  # type: ignore[method-assign]

    print(f"C fast path (service_profiler.runtime._speedups): {'built' if HAVE_SPEEDUPS else 'NOT built'}")
    bare = results["bare call"]
    targets = {"installed, disabled": 100, "timer, enabled": 800, "timer + 2 attributes": 1500}
    print(f"{'case':<24}{'ns/call':>10}{'overhead':>10}{'target':>10}")
    for case, ns in results.items():
        overhead = ns - bare
        target = targets.get(case)
        verdict = "" if target is None else ("  ok" if overhead <= target else "  OVER")
        print(f"{case:<24}{ns:>10.0f}{overhead:>10.0f}{'' if target is None else target:>10}{verdict}")


if __name__ == "__main__":
    main()
