"""The analysis pipeline: build the tables once (`run.analyze_run`), then run each requested exporter.

An exporter is a small class with a `name` and `export(run, out_dir) -> list[Path]`; it reads the
tables through `run.con` and writes its files into `out_dir`. Exporters run one after another in this
process; or (`jobs` > 1) `jobs` at a time in threads of this process (the plots' and the model's
exporters hand their drawing to the figure process, `figure_process`, and wait for it); or (`jobs` > 1, a
`shared` analysis) in a process pool whose workers open the analysis database read-only.
One exporter failing does not stop the others: it is reported and the pipeline's result says so.
"""

from __future__ import annotations

import importlib
import multiprocessing
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from .run import AnalysisRun


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


# the order exporters start in when they run side by side: the longest first
_LONGEST_FIRST = ["db", "plots", "csv", "json", "model", "summary"]


@dataclass
class Outcome:
    fmt: str
    paths: list[Path] = field(default_factory=list)
    error: str | None = None


def _run_one(run: AnalysisRun, fmt: str, options: dict[str, Any], out_dir: Path) -> Outcome:
    try:
        return Outcome(fmt, exporter(fmt, options).export(run, out_dir))
    except Exception as exc:  # one exporter's failure is reported, the others still run
        return Outcome(fmt, error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}")


def _in_worker(run: AnalysisRun, fmt: str, options: dict[str, Any], out_dir: Path) -> Outcome:
    own = run.reopen_read_only()
    try:
        return _run_one(own, fmt, options, out_dir)
    finally:
        own.con.close()


def _in_thread(run: AnalysisRun, fmt: str, options: dict[str, Any], out_dir: Path) -> Outcome:
    own = replace(run, con=run.con.cursor())  # a connection of its own to the same database
    try:
        return _run_one(own, fmt, options, out_dir)
    finally:
        own.con.close()


def export_all(run: AnalysisRun, formats: list[str], out_dir: Path, jobs: int = 1,
               progress: Callable[[str], None] | None = None,
               options: dict[str, dict[str, Any]] | None = None) -> list[Outcome]:
    """Run the exporters of `formats`; `options`: per format, its exporter's keyword arguments."""
    options = options or {}
    out_dir.mkdir(parents=True, exist_ok=True)
    outcomes: list[Outcome] = []
    if jobs <= 1 or len(formats) < 2:
        for fmt in formats:
            outcomes.append(_run_one(run, fmt, options.get(fmt, {}), out_dir))
            if progress:
                progress(f"{fmt} {'failed' if outcomes[-1].error else 'done'}")
        return outcomes
    if not run.shared:
        # threads of this process: DuckDB's queries and SQLite's inserts run without the GIL, so an
        # exporter spending its time in Python (profiler.db's rows, the plots) overlaps with the others
        # (an exporter that hands its drawing to the figure process takes a place all the same: with one
        # more exporter at a time, a 10 M-record run's process tree went past 2 GB)
        with ThreadPoolExecutor(max_workers=jobs) as threads:
            futures = [threads.submit(_in_thread, run, fmt, options.get(fmt, {}), out_dir)
                       for fmt in sorted(formats, key=_LONGEST_FIRST.index)]
            for future in as_completed(futures):
                outcomes.append(future.result())
                if progress:
                    progress(f"{outcomes[-1].fmt} {'failed' if outcomes[-1].error else 'done'}")
        return sorted(outcomes, key=lambda o: formats.index(o.fmt))
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
