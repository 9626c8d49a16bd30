"""A process of its own that draws the figures (the plots, the latency model's) beside this one.

matplotlib is Python holding the GIL: its import and a dozen figures take about a second on any run,
small or large. In a thread of this process they held back the Python parts of the other exporters
(profiler.db's and the trace's); in a process of their own they run beside them where a core is free (on
a 2-core machine both cores are busy either way and wall time is the same: benchmarks/README.md). It is
started when `analyze` starts, so its imports happen while DuckDB builds the tables.

The exporters hand it plain data (lists, arrays) and a module-level function; nothing of DuckDB's
crosses. Spawned, not forked: a fork would copy DuckDB's threads' locks in whatever state they are.
If the process is gone (killed, out of memory), the work is done in this process instead.
"""

from __future__ import annotations

import atexit
import importlib
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

T = TypeVar("T")

# what the figures need, imported by the process as soon as it starts
_WARM_UP_MODULES = ("matplotlib.figure", "matplotlib.backends.backend_agg", "numpy",
                    "service_profiler.model.latency", "service_profiler.columnar.plots_draw")


def _warm_up(parent: int) -> None:
    # a process killed outright leaves its pool's worker waiting for work that never comes: it goes too
    threading.Thread(target=_exit_with, args=(parent,), name="sprof-parent-watch", daemon=True).start()
    # A spawned worker ends through sys.exit: the interpreter's teardown then frees every module and
    # object matplotlib made, while analyze waits for it (a tenth of a second after a dozen figures).
    # By the time atexit runs, multiprocessing has sent the last result and flushed the standard
    # streams, so nothing is left to do: end there.
    atexit.register(os._exit, 0)
    for module in _WARM_UP_MODULES:
        try:
            importlib.import_module(module)
        except Exception:  # the figure's own import fails again and is reported there
            continue


def _exit_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


class FigureProcess:
    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        self._pool.submit(_warm_up, os.getpid())

    def submit(self, fn: Callable[..., T], *args: object) -> Callable[[], T]:
        """Start fn(*args) in the figure process; the function returned waits for its result (or runs it
        here, if that process is gone). fn's exceptions propagate from that function."""
        future = None
        if self._pool is not None:
            try:
                future = self._pool.submit(fn, *args)
            except BrokenProcessPool as exc:
                self._lost(exc)

        def result() -> T:
            if future is not None:
                try:
                    return future.result()
                except BrokenProcessPool as exc:
                    self._lost(exc)
            return fn(*args)
        return result

    def _lost(self, exc: BrokenProcessPool) -> None:
        if self._pool is not None:
            print(f"figures: the figure process ended ({exc}); drawing in this process instead", file=sys.stderr)
            self._pool = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def submit(figures: FigureProcess | None, fn: Callable[..., T], *args: object) -> Callable[[], T]:
    """fn(*args) started in `figures`' process (the function returned waits for its result), or run now in
    this one when there is none."""
    if figures is not None:
        return figures.submit(fn, *args)
    done = fn(*args)
    return lambda: done
