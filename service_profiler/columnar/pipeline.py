"""The analysis pipeline: build the tables once (`run.analyze_run`), then run each requested exporter.

An exporter is a small class with a `name` and `export(run, out_dir) -> list[Path]`; it reads the
tables through `run.con` and writes its files into `out_dir`. Exporters run one after another in this
process, or (`jobs` > 1, a `shared` analysis) in a process pool whose workers open the analysis database
read-only. One
exporter failing does not stop the others: it is reported and the pipeline's result says so.
"""

from __future__ import annotations

import importlib
import multiprocessing
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
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


def export_all(run: AnalysisRun, formats: list[str], out_dir: Path, jobs: int = 1,
               progress: Callable[[str], None] | None = None,
               options: dict[str, dict[str, Any]] | None = None) -> list[Outcome]:
    """Run the exporters of `formats`; `options`: per format, its exporter's keyword arguments."""
    options = options or {}
    out_dir.mkdir(parents=True, exist_ok=True)
    outcomes: list[Outcome] = []
    if jobs <= 1 or len(formats) < 2 or not run.shared:  # an in-memory database: this process only
        for fmt in formats:
            outcomes.append(_run_one(run, fmt, options.get(fmt, {}), out_dir))
            if progress:
                progress(f"{fmt} {'failed' if outcomes[-1].error else 'done'}")
        return outcomes
    run.con.close()  # the workers open the database file read-only: DuckDB allows no writer beside them
    # spawned, not forked: a fork would copy DuckDB's threads' locks in whatever state they are
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_in_worker, run, fmt, options.get(fmt, {}), out_dir) for fmt in formats]
        for future in futures:
            outcomes.append(future.result())
            if progress:
                progress(f"{outcomes[-1].fmt} {'failed' if outcomes[-1].error else 'done'}")
    return outcomes
