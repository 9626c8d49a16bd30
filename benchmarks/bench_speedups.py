"""The C speedups against their pure-Python fallbacks.

    python setup.py build_ext --inplace   # once, in a development checkout
    python benchmarks/bench_speedups.py [--raw RUN_DIR]

1. ns per call of an installed-but-inactive probe: C ProbeSwitch versus the pure-Python wrapper.
   Target: an inactive probe adds <= 100 ns over a bare method call (ideally 20-40 ns). Each figure is
   the best of REPEATS runs of CALLS calls. Two call forms: a bound method cached up front (what vLLM
   keeps from init: `step = engine.step; step(out)`) and a fresh attribute call (`engine.step(out)`).
2. ns per call of an active custom handler's wrapper (`probes.make_handler_wrapper`): C HandlerCall
   versus the Python wrapper, with a handler that only calls the original, against that handler called
   with the original itself (no wrapper, no `original_func` object).
3. ns per call of the recording API while the runtime is the sink (`record.span`, `record.event`,
   `record.enabled`): the C `Emitter`'s methods versus the Python functions through the runtime's
   `domain_enabled` / `span` (records go into the runtime's recorder buffer, emptied every 1,000 calls).
4. µs per record of encoding `rec` lines of 256 records (what the writer thread does): the C
   `encode_rec_line` versus the stdlib encoder, on the records of a raw run (`--raw`: a run directory;
   default: a small synthetic run), after checking that both write the same bytes.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
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


def bench_handler_wrapper() -> None:
    from service_profiler.runtime import probes

    class ActiveProbe:
        active = True
        caller_filter = None

        def note_error(self, what: str, detail: str) -> None:
            pass

    def handler(original_func: Any, this: Any, *args: Any, **kwargs: Any) -> Any:
        return original_func(this, *args, **kwargs)

    rows: list[tuple[str, object]] = [
        ("handler, no wrapper", engine_with(lambda self, out, n=1: handler(step, self, out, n)))]
    if probes.HandlerCall is not None:
        rows.append(("C HandlerCall", engine_with(probes.make_handler_wrapper(step, ActiveProbe(), handler, True))))
    saved, probes.HandlerCall = probes.HandlerCall, None
    try:
        rows.append(("Python wrapper", engine_with(probes.make_handler_wrapper(step, ActiveProbe(), handler, True))))
    finally:
        probes.HandlerCall = saved
    results = list(zip([name for name, _ in rows], measure([engine for _, engine in rows]), strict=True))
    base = results[0][1][1]
    print("\nan active handler's wrapper (engine.step(out)): ns per call (+ over the handler alone)")
    for name, (_cached, attr) in results:
        print(f"{name:30} {attr:8.1f} ns (+{attr - base:6.1f})")


def bench_recording_api() -> None:
    from service_profiler import record
    from service_profiler.runtime import core
    from service_profiler.runtime.recorder import Recorder

    attrs = {"batch_id": 1}
    calls = {
        "span": lambda: record.span("EngineCore", "step", 1, 2, attrs),
        "event": lambda: record.event("Request", "state", attrs, 5),
        "enabled": lambda: record.enabled("Request"),
    }
    emitter = core.Emitter
    print("\nthe recording API, the runtime as the sink: ns per call")
    for name, through_c in (("C Emitter", True), ("Python functions", False)):
        if through_c and emitter is None:
            continue
        core.Emitter = emitter if through_c else None
        runtime = core.Runtime(None, {})
        runtime.recorder = Recorder(Path(tempfile.mkdtemp(prefix="sp-bench-")), max_buffered=10_000_000)
        runtime.enabled = True
        previous = record.set_sink(runtime)
        try:
            figures = []
            buffer = runtime.recorder.buffer
            for call in calls.values():
                def thousand(call: Callable[[], None] = call, buffer: list[Any] = buffer) -> None:
                    for _ in range(1_000):
                        call()
                    buffer.clear()
                best = min(timeit.repeat(thousand, number=100, repeat=REPEATS)) / 100 / 1_000 * 1e9
                figures.append(f"{best:6.1f}")
        finally:
            record.set_sink(previous)
            core.Emitter = emitter
        print(f"{name:30} " + "   ".join(f"{call} {figure} ns" for call, figure in zip(calls, figures, strict=True)))


def _records(raw: Path | None) -> list[tuple[Any, ...]]:
    if raw is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from synthetic import SyntheticConfig, generate_run

        raw = Path(tempfile.mkdtemp(prefix="sp-bench-")) / "run"
        generate_run(raw, SyntheticConfig(requests=500, output_tokens=32, max_num_seqs=16, seed=1))
    records: list[tuple[Any, ...]] = []
    for path in sorted(raw.glob("*.sprof.jsonl")):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.startswith('{"t":"rec"'):
                    records.extend(tuple(r) for r in json.loads(line)["r"])
    return records


def bench_encoder(raw: Path | None) -> None:
    from service_profiler.runtime.recorder import _encode
    from service_profiler.runtime.speedups import encode_rec_line

    records = _records(raw)
    chunks = [records[i:i + 256] for i in range(0, len(records), 256)]
    encoders: list[tuple[str, Callable[[list[Any]], object]]] = [
        ("stdlib json.JSONEncoder", lambda chunk: _encode({"t": "rec", "r": chunk}))]
    if encode_rec_line is not None:
        assert all(encode_rec_line(c) == _encode({"t": "rec", "r": c}) for c in chunks), "encoders differ"
        encoders.append(("C encode_rec_line", encode_rec_line))
    best = {name: float("inf") for name, _ in encoders}
    for _ in range(7):  # interleaved, best of 7: thread CPU time, so other work on the machine counts less
        for name, encode in encoders:
            start = time.thread_time()
            for chunk in chunks:
                encode(chunk)
            best[name] = min(best[name], (time.thread_time() - start) / len(records) * 1e6)
    print(f"\nrecord lines of 256 records, {len(records):,} records: µs per record (same bytes from both)")
    for name, us in best.items():
        print(f"{name:30} {us:8.3f} µs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, default=None, help="a run directory whose records are encoded")
    args = parser.parse_args()
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
    bench_handler_wrapper()
    bench_recording_api()
    bench_encoder(args.raw)


if __name__ == "__main__":
    main()
