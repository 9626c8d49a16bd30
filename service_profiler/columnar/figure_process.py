"""Processes of their own that draw the figures (the plots, the latency model's) beside this one.

matplotlib is Python holding the GIL: its import and a dozen figures take about a second on any run,
small or large. In a thread of this process they held back the Python parts of the other exporters
(profiler.db's and the trace's); in processes of their own they run beside them where a core is free.
They are started when `analyze` starts, so that matplotlib is imported while DuckDB builds the tables: on
a small run two workers forked by multiprocessing's fork server, which imports it once for both; on a
larger one a single spawned worker (`FigureProcess`). Never forked from this process: a fork would copy
DuckDB's threads' locks in whatever state they are.

The exporters hand them plain data (lists, arrays) and a module-level function; nothing of DuckDB's
crosses. If the workers are gone (killed, out of memory), the work is done in this process instead.
"""

from __future__ import annotations

import importlib
import multiprocessing
import multiprocessing.forkserver
import os
import select
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

T = TypeVar("T")

# what the figures need, imported by the fork server once (`figure_server` first)
_WARM_UP_MODULES = ("service_profiler.columnar.figure_server", "matplotlib.figure", "matplotlib.backends.backend_agg",
                    "numpy", "service_profiler.model.latency", "service_profiler.columnar.plots_draw")


def _start_worker(analyze_pid: int) -> None:
    # A worker of an analyze killed outright would wait for work that never comes (it holds its queues'
    # both ends), and so would a fork server (its workers hold its pipe open): the worker goes too.
    threading.Thread(target=_exit_with, args=(analyze_pid,), name="sprof-analyze-watch", daemon=True).start()
    for module in _WARM_UP_MODULES:  # a fork server's worker has them already
        try:
            importlib.import_module(module)
        except Exception:  # the figure's own import fails again and is reported there
            continue


def _exit_with(pid: int) -> None:
    """End this process once process `pid` has ended."""
    try:
        # a descriptor of that very process (not of another given its pid later), readable once it ended
        with os.fdopen(os.pidfd_open(pid), "rb", buffering=0) as ended:
            select.select([ended], [], [])
    except (AttributeError, OSError):  # no pidfd here (another OS, an old kernel), or it ended already
        while _exists(pid):
            time.sleep(0.5)
    os._exit(0)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _start(pool: ProcessPoolExecutor) -> None:
    try:
        pool.submit(os.getpid)
    except Exception:  # a pool that could not start a worker is broken: `submit` then draws here
        return


class FigureProcess:
    """`workers` figures drawn at a time. Two are forked by a fork server that imports matplotlib once
    (the server and each worker hold its ~100 MB, mostly shared): on a small run the figures are the last
    thing to end, and two at a time they end sooner (benchmarks/README.md). One is spawned, a fresh
    interpreter importing matplotlib itself: the least memory, for a large run, where the figures are a
    small part of the time."""

    def __init__(self, workers: int = 1) -> None:
        # never forked from this process: a fork would copy DuckDB's threads' locks in whatever state they are
        context = multiprocessing.get_context("forkserver" if workers > 1 else "spawn")
        if workers > 1:
            context.set_forkserver_preload(list(_WARM_UP_MODULES))
        self._pool: ProcessPoolExecutor | None = ProcessPoolExecutor(
            max_workers=workers, mp_context=context, initializer=_start_worker, initargs=(os.getpid(),))
        # A first worker started now, from a thread: starting one under the fork server waits for its
        # imports, which go on beside the tables being built.
        threading.Thread(target=_start, args=(self._pool,), name="sprof-figures-start", daemon=True).start()

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
            _stop_fork_server()


def _stop_fork_server() -> None:
    """The fork server ended and waited for, as its workers are by it: it would otherwise stay until this
    process ends, unwaited, and its workers' CPU time would count as nobody's (`time`, `getrusage`). Its
    stop is the one multiprocessing's own tests use; where a Python lacks it, the server ends with this
    process as before."""
    server = getattr(multiprocessing.forkserver, "_forkserver", None)
    stop = getattr(server, "_stop", None)
    if callable(stop):
        try:
            stop()
        except OSError:  # gone already
            pass


def submit(figures: FigureProcess | None, fn: Callable[..., T], *args: object) -> Callable[[], T]:
    """fn(*args) started in `figures`' process (the function returned waits for its result), or run now in
    this one when there is none."""
    if figures is not None:
        return figures.submit(fn, *args)
    done = fn(*args)
    return lambda: done
