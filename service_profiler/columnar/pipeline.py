"""The analysis pipeline: build the tables once (`run.analyze_run`), then run each requested exporter.

An exporter is a small class with a `name` and `export(run, out_dir) -> list[Path]`; it reads the
tables through `run.con` and writes its files into `out_dir`. Exporters run one after another in this
process; or (`jobs` > 1) `jobs` at a time in threads of this process (the plots' and the model's
exporters hand their drawing to the figure process, `figure_process`, and wait for it); or (`jobs` > 1, a
`shared` analysis) in a process pool whose workers open the analysis database read-only. Threads write
within a share of the memory limit (`OUTPUTS_SHARE_OF_LIMIT`); once one runs out of it, no other starts
side by side: it is run again, and those not started yet are run, one at a time within the whole limit.
On a small run the figures' exporters start before the last tables are built (`EarlyOutputs`).
One exporter failing does not stop the others: it is reported and the pipeline's result says so.
"""

from __future__ import annotations

import importlib
import multiprocessing
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import duckdb

from .figure_process import FigureProcess
from .raw import memory_limit_bytes
from .run import SMALL_RUN_RECORDS, AnalysisRun, duckdb_threads, set_threads

OUTPUTS_SHARE_OF_LIMIT = 3 / 4
"""Threads write the outputs within this share of the memory limit the tables were built in. DuckDB's
allocator keeps memory it freed for a while, outside the limit; with two outputs at a time sorting and
freeing large buffers, that grew to most of the limit again, and a 10 M-record run's process tree passed
2 GB with the 1 GB limit (benchmarks/README.md). An output that does not fit the share is written again
afterwards, alone, within the whole limit."""

SIDE_BY_SIDE_RECORDS_PER_GIB = 15_000_000
"""Above this many records per GiB of the memory limit, threads write the outputs one at a time. Side by
side, each within its share of the limit, a 29 M-record run's trace, profiler.db and CSVs (1 GB limit)
each ran out of memory part way and were written again alone: more time than writing them one by one,
and the process tree's memory went past 2 GB meanwhile. A 10 M-record run's outputs fit side by side
(benchmarks/README.md)."""


class Exporter(Protocol):
    name: str

    def export(self, run: AnalysisRun, out_dir: Path) -> list[Path]: ...


# output format -> (module, exporter class); a module is imported only when its format is asked for
EXPORTERS: dict[str, tuple[str, str]] = {
    "csv": ("service_profiler.columnar.csv_out", "CsvExporter"),
    "summary": ("service_profiler.columnar.summary", "SummaryExporter"),
    "db": ("service_profiler.columnar.sqlite_out", "SqliteExporter"),
    "plots": ("service_profiler.columnar.plots_out", "PlotsExporter"),
    "model": ("service_profiler.columnar.model_out", "ModelExporter"),
    "json": ("service_profiler.columnar.trace_out", "TraceExporter"),
}


def exporter(fmt: str, options: dict[str, Any]) -> Exporter:
    """The exporter of `fmt`, made with its own options (e.g. the trace's window)."""
    module, cls = EXPORTERS[fmt]
    found: Exporter = getattr(importlib.import_module(module), cls)(**options)
    return found


EARLY_FORMATS = ("plots", "model")
"""Outputs that read only the batch and request tables and hand their drawing to the figure process. On a
small run that process is the last to end, and it idled while the other tables were built: there they
start as soon as the batch and request tables exist (`EarlyOutputs`), each in a thread of its own that
mostly waits for the figure process, so they take no place among the `jobs` written side by side."""


class EarlyOutputs:
    """The `EARLY_FORMATS` among `formats`, drawn by `figures`, started by `start` (given to `analyze_run` as
    `batches_built`) on a run of under `SMALL_RUN_RECORDS` records; `export_all(started=futures)` collects
    them. (Without a figure process both would draw with matplotlib in threads of this process at once.)"""

    def __init__(self, formats: list[str], out_dir: Path, figures: FigureProcess) -> None:
        self.formats = [fmt for fmt in formats if fmt in EARLY_FORMATS]
        self.out_dir, self.figures = out_dir, figures
        self.futures: dict[str, Future[Outcome]] = {}
        self._threads: ThreadPoolExecutor | None = None

    def start(self, run: AnalysisRun) -> Callable[[], None]:
        if self.formats and run.count("record") < SMALL_RUN_RECORDS:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._threads = ThreadPoolExecutor(max_workers=len(self.formats), thread_name_prefix="sprof-early")
            self.futures = {fmt: self._threads.submit(_in_thread, _own_connection(run), fmt, {"figures": self.figures},
                                                      self.out_dir)
                            for fmt in self.formats}
        return self.wait

    def wait(self) -> None:
        """Wait for the outputs started to end (before the run is closed)."""
        if self._threads is not None:
            self._threads.shutdown(wait=True)


# The order exporters start in when they run side by side. The plots first: their drawing, in the figure
# process, is the last thing to end on a small run, and their thread only waits for it. Then the longest
# first, so that the shorter ones fill in after them: profiler.db and the trace take longest from a
# few hundred thousand records up (benchmarks/README.md).
_START_ORDER = ["plots", "db", "json", "csv", "model", "summary"]


@dataclass
class Outcome:
    fmt: str
    paths: list[Path] = field(default_factory=list)
    error: str | None = None
    out_of_memory: bool = False


def _run_one(run: AnalysisRun, fmt: str, options: dict[str, Any], out_dir: Path) -> Outcome:
    try:
        return Outcome(fmt, exporter(fmt, options).export(run, out_dir))
    except Exception as exc:  # one exporter's failure is reported, the others still run
        return Outcome(fmt, error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}",
                       out_of_memory=isinstance(exc, duckdb.OutOfMemoryException))


def _in_worker(run: AnalysisRun, fmt: str, options: dict[str, Any], out_dir: Path) -> Outcome:
    own = run.reopen_read_only()
    try:
        return _run_one(own, fmt, options, out_dir)
    finally:
        own.con.close()


def _own_connection(run: AnalysisRun) -> AnalysisRun:
    """The run with a connection of its own to the same database, for a thread: made by the thread that
    holds `run.con`, since a DuckDB connection is not to be used by two threads at once."""
    return replace(run, con=run.con.cursor())


def _in_thread(own: AnalysisRun, fmt: str, options: dict[str, Any], out_dir: Path) -> Outcome:
    """`fmt` written through `own` (`_own_connection`), which is closed after."""
    try:
        return _run_one(own, fmt, options, out_dir)
    finally:
        own.con.close()


def _set_memory_limit(run: AnalysisRun, limit: str) -> None:
    """DuckDB's memory limit from now on; left as it is where DuckDB cannot free enough for it (a limit
    below what its tables hold in memory right now)."""
    try:
        run.con.execute(f"SET memory_limit = '{limit}'")
    except duckdb.OutOfMemoryException:
        pass


def export_all(run: AnalysisRun, formats: list[str], out_dir: Path, jobs: int = 1,
               progress: Callable[[str], None] | None = None,
               options: dict[str, dict[str, Any]] | None = None,
               outputs_share: float = OUTPUTS_SHARE_OF_LIMIT,
               started: dict[str, Future[Outcome]] | None = None) -> list[Outcome]:
    """Run the exporters of `formats`; `options`: per format, its exporter's keyword arguments;
    `outputs_share`: of the memory limit, for exporters running side by side in threads; `started`: the
    formats already under way (`EarlyOutputs`), whose outcomes are collected with the others."""
    options = options or {}
    started = started or {}
    out_dir.mkdir(parents=True, exist_ok=True)
    records = run.count("record")
    if jobs > 1 and not run.shared and records > SIDE_BY_SIDE_RECORDS_PER_GIB * memory_limit_bytes(run.con) / (1 << 30):
        jobs = 1
        if progress:
            progress("outputs written one at a time: side by side they would not fit in the memory limit")
    if jobs > 1 and len(formats) > 1 and not run.shared:
        outcomes = _export_in_threads(run, formats, out_dir, jobs, records, progress, options, outputs_share, started)
        return sorted(outcomes, key=lambda o: formats.index(o.fmt))
    outcomes = _export_apart(run, [fmt for fmt in formats if fmt not in started], out_dir, jobs, progress, options)
    for fmt, future in started.items():
        outcomes.append(future.result())
        if progress:
            progress(f"{fmt} {'failed' if outcomes[-1].error else 'done'}")
    return sorted(outcomes, key=lambda o: formats.index(o.fmt))


def _export_apart(run: AnalysisRun, formats: list[str], out_dir: Path, jobs: int,
                  progress: Callable[[str], None] | None, options: dict[str, dict[str, Any]]) -> list[Outcome]:
    """One after another in this process, or (`jobs` > 1, a `shared` analysis) in a process pool."""
    outcomes: list[Outcome] = []
    if jobs <= 1 or len(formats) < 2:
        for fmt in formats:
            outcomes.append(_run_one(run, fmt, options.get(fmt, {}), out_dir))
            if progress:
                progress(f"{fmt} {'failed' if outcomes[-1].error else 'done'}")
        return outcomes
    run.con.close()  # the workers open the database file read-only: DuckDB allows no writer beside them
    # spawned, not forked: a fork would copy DuckDB's threads' locks in whatever state they are
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_in_worker, run, fmt, options.get(fmt, {}), out_dir) for fmt in formats]
        for fmt, future in zip(formats, futures, strict=True):
            try:
                outcomes.append(future.result())
            except BrokenProcessPool as exc:  # a worker killed (out of memory, a signal): the pool is lost
                outcomes.append(Outcome(fmt, error=f"the exporter process died before it finished ({exc})"))
            if progress:
                progress(f"{outcomes[-1].fmt} {'failed' if outcomes[-1].error else 'done'}")
    return outcomes


def _export_in_threads(run: AnalysisRun, formats: list[str], out_dir: Path, jobs: int, records: int,
                       progress: Callable[[str], None] | None, options: dict[str, dict[str, Any]],
                       outputs_share: float, started: dict[str, Future[Outcome]]) -> list[Outcome]:
    """`jobs` exporters at a time in threads of this process: DuckDB's queries and SQLite's inserts run
    without the GIL, so an exporter spending its time in Python (profiler.db's rows, the plots) overlaps
    with the others (an exporter that hands its drawing to the figure process takes a place all the same:
    with one more exporter at a time, a 10 M-record run's process tree went past 2 GB).

    Once one runs out of its share of the memory limit, no other starts beside the ones running: it and
    those not started yet are written afterwards, one at a time, within the whole limit. The run has shown
    that its outputs do not fit side by side, whatever its size and limit."""
    outcomes: list[Outcome] = []
    _set_memory_limit(run, f"{max(int(memory_limit_bytes(run.con) * outputs_share) >> 20, 1)}MiB")
    # DuckDB's threads shared out among the exporters: a query's extra threads cost more CPU than they
    # save while another exporter keeps the other cores busy (benchmarks/README.md)
    all_threads = set_threads(run.con, duckdb_threads(run.con) // jobs)
    to_start = sorted((fmt for fmt in formats if fmt not in started), key=_START_ORDER.index)
    not_started: list[str] = []  # left for after, once one ran out of memory
    out_of_memory: list[str] = []  # ran out of their share side by side
    early = set(started.values())  # under way already, taking no place among the `jobs`
    running: set[Future[Outcome]] = set(early)
    with ThreadPoolExecutor(max_workers=jobs) as threads:
        while to_start or running:
            while to_start and len(running - early) < jobs and not out_of_memory:
                fmt = to_start.pop(0)
                running.add(threads.submit(_in_thread, _own_connection(run), fmt, options.get(fmt, {}), out_dir))
            ended, running = wait(running, return_when=FIRST_COMPLETED)
            for future in ended:
                outcome = future.result()
                if outcome.out_of_memory:
                    out_of_memory.append(outcome.fmt)
                    continue
                outcomes.append(outcome)
                if progress:
                    progress(f"{outcome.fmt} {'failed' if outcome.error else 'done'}")
            if out_of_memory and to_start:
                not_started, to_start = to_start, []
            # none left to start: the threads of those that ended go to the others (not on a small run,
            # where a query's extra thread costs more CPU than it saves, as for its tables)
            if not to_start and 0 < len(running) < jobs and records >= SMALL_RUN_RECORDS:
                set_threads(run.con, all_threads // len(running))
    _set_memory_limit(run, run.memory_limit)
    set_threads(run.con, all_threads)
    if not_started and progress:
        progress(f"outputs written one at a time from here: {', '.join(out_of_memory)} ran out of memory "
                 "side by side")
    for fmt in out_of_memory + not_started:
        outcomes.append(_run_one(run, fmt, options.get(fmt, {}), out_dir))
        if progress:
            again = "again, " if fmt in out_of_memory else ""
            progress(f"{fmt} {'failed' if outcomes[-1].error else 'done'} ({again}alone, within the whole "
                     "memory limit)")
    return outcomes
