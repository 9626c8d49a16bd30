"""`service-profiler analyze --input-path P [P ...] --output-path OUT [--format ...]`.

Reads the raw files (tolerantly), builds the analysis tables once, and runs each requested exporter:
  csv    request/batch/kvcache CSVs (reference columns first), summaries, seed-001 lifecycle CSVs
  db     profiler.db (SQLite)
  json   chrome_tracing.json (Perfetto / chrome://tracing)
  plots  PNG charts under plots/
  model  the batch latency model under model/
One exporter failing does not stop the others; it is reported and the exit status is 1. Problems found
in the raw data (torn lines, files without header, ...) are listed at the end and in problems.txt.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import multiprocessing
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

import numpy as np

FORMATS = ("csv", "json", "db", "plots", "model")
EXIT_OK, EXIT_EXPORT_FAILED, EXIT_NO_DATA = 0, 1, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-path", nargs="+", required=True, type=Path, metavar="PATH",
                        help="run directory, directory of runs, or raw files (*.sprof.jsonl); several allowed "
                             "(e.g. one copy per host)")
    parser.add_argument("--output-path", required=True, type=Path, metavar="OUT",
                        help="directory for the outputs (created)")
    parser.add_argument("--format", nargs="+", choices=FORMATS, default=list(FORMATS), metavar="FMT",
                        help=f"outputs to write, any of: {' '.join(FORMATS)} (default: all)")
    parser.add_argument("--quiet", action="store_true", help="no console summary, only errors")


class _Progress:
    """One stderr line per phase with the elapsed time, so a long analysis visibly moves."""

    def __init__(self, stream: TextIO, quiet: bool) -> None:
        self.stream, self.quiet = stream, quiet
        self.t0 = time.perf_counter()

    def __call__(self, message: str) -> None:
        if not self.quiet:
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
            print(f"[analyze {time.perf_counter() - self.t0:6.2f}s {peak_mb:5.0f} MB] {message}",
                  file=self.stream, flush=True)


def _optional(module: str) -> ModuleType | None:
    """Import an exporter written elsewhere; None when that module is not there (yet)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
            return None
        raise


def _finite(*cols: np.ndarray) -> list[np.ndarray]:
    ok = np.ones(len(cols[0]), dtype=bool)
    for c in cols:
        ok &= ~np.isnan(c)
    return [c[ok] for c in cols]


_Outcome = tuple[list[Path], list[str], list[str]]  # produced, notes, failures


def _run_step(label: str, fn: Callable[[], Any], progress: Callable[[str], None]) -> _Outcome:
    """Run one exporter; its failure is reported, never raised (it must not cost the other outputs)."""
    produced: list[Path] = []
    notes: list[str] = []
    try:
        result = fn()
    except Exception as exc:  # an exporter's bug must not cost the user the other outputs
        progress(f"{label}: FAILED ({type(exc).__name__}: {exc})")
        return [], [], [f"{label}: {type(exc).__name__}: {exc}"]
    if isinstance(result, str):
        if "skipped" in result:
            notes.append(result)
        progress(result)
        return [], notes, []
    if isinstance(result, Path):
        produced.append(result)
    elif isinstance(result, list):
        produced.extend(p for p in result if isinstance(p, Path))
    progress(f"{label} done")
    return produced, notes, []


def _merge(outcome: _Outcome, produced: list[Path], notes: list[str], failures: list[str]) -> None:
    produced.extend(outcome[0])
    notes.extend(outcome[1])
    failures.extend(outcome[2])


def _fork_context() -> Any:
    """multiprocessing's fork context where the platform has one (Linux), else None (run in-process)."""
    if os.environ.get("SERVICE_PROFILER_NO_FORK") or "fork" not in multiprocessing.get_all_start_methods():
        return None
    return multiprocessing.get_context("fork")


class _Side:
    """Exporters run by a forked child process, in parallel with the parent's own (2+ cores).

    The child inherits the run and tables copy-on-write (nothing is pickled on the way in); it sends back
    only what each step produced. Where fork is unavailable the steps run in-process at `collect`.
    The child prints its own progress lines (its RSS, not the parent's)."""

    def __init__(self, progress: Callable[[str], None], steps: list[tuple[str, str, Callable[[], Any]]]) -> None:
        self.progress, self.steps = progress, steps
        self.proc: Any = None
        self.conn: Any = None
        ctx = _fork_context() if steps else None
        if ctx is None:
            return
        for stream in (sys.stdout, sys.stderr):  # else the child flushes the parent's pending text again
            stream.flush()
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=self._child, args=(send,), name="analyze-side", daemon=True)
        try:
            proc.start()
        except OSError:  # out of processes / memory: fall back to running in-process
            recv.close()
            send.close()
            return
        send.close()
        self.proc, self.conn = proc, recv

    def _child(self, send: Any) -> None:
        outcomes = [_run_step(label, fn, self.progress) for _, label, fn in self.steps]
        send.send(outcomes)
        send.close()

    def collect(self, produced: list[Path], notes: list[str], failures: list[str]) -> None:
        """Wait for the child (or run the steps here when there is none) and merge what they produced."""
        if self.proc is None:
            for _, label, fn in self.steps:
                _merge(_run_step(label, fn, self.progress), produced, notes, failures)
            return
        try:
            outcomes: list[_Outcome] = self.conn.recv()
        except (EOFError, OSError):
            outcomes = []
        self.conn.close()
        self.proc.join()
        if len(outcomes) != len(self.steps):
            done = len(outcomes)
            outcomes += [([], [], [f"{label}: the exporter process died (exit code {self.proc.exitcode})"])
                         for _, label, _ in self.steps[done:]]
        for outcome in outcomes:
            _merge(outcome, produced, notes, failures)


def run(args: argparse.Namespace) -> int:
    # The analysis holds millions of small objects and makes no reference cycles worth collecting;
    # with the cyclic collector on, every allocation threshold re-walks them (2x slower exports).
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _run(args)
    finally:
        if was_enabled:
            gc.enable()


def _run(args: argparse.Namespace) -> int:
    from service_profiler.rawfile import read_run

    from .sqlite_export import SqliteExport
    from .summary import format_summary
    from .tables import build_tables

    progress = _Progress(sys.stderr, args.quiet)
    out_dir: Path = args.output_path
    formats: list[str] = list(dict.fromkeys(args.format))
    data = read_run(args.input_path)
    progress(f"read {len(data.processes)} process file(s), {data.num_records:,} records")
    if not data.processes:
        print("error: no readable raw files (*.sprof.jsonl) in " + " ".join(map(str, args.input_path)),
              file=sys.stderr)
        for p in data.problems:
            print(f"  {p}", file=sys.stderr)
        return EXIT_NO_DATA
    out_dir.mkdir(parents=True, exist_ok=True)

    def chrome_out() -> Path | str:
        mod = _optional("service_profiler.analyze.chrome")
        if mod is None:
            return "chrome trace skipped: service_profiler.analyze.chrome is not installed in this build"
        path = out_dir / "chrome_tracing.json"
        mod.write_chrome_trace(data, None, path)
        return path

    # The trace is drawn from the records alone: a forked child writes it while this process builds the
    # tables and writes SQLite / CSV (each process then keeps one core busy).
    chrome_side = _Side(progress, [("json", "chrome trace", chrome_out)]) if "json" in formats else None
    tables = build_tables(data)
    progress(f"tables: {len(tables.requests):,} requests, {len(tables.batches):,} batches")

    produced: list[Path] = []
    failures: list[str] = []
    notes: list[str] = []

    def step(fmt: str, label: str, fn: Callable[[], Any]) -> None:
        if fmt in formats:
            _merge(_run_step(label, fn, progress), produced, notes, failures)

    def csv_out() -> list[Path]:
        from .csv_export import write_csvs
        return write_csvs(data, tables, out_dir)

    pending_db: list[SqliteExport] = []

    def db_start() -> str:
        pending_db.append(SqliteExport(data, tables, out_dir / "profiler.db").start())
        return "SQLite rows written; indexes build in the background"

    def db_finish() -> Path:
        return pending_db[0].finish()

    def plots_out() -> list[Path] | str:
        mod = _optional("service_profiler.analyze.plots")
        if mod is None:
            return "plots skipped: service_profiler.analyze.plots is not installed in this build"
        plot_dir = out_dir / "plots"
        plot_dir.mkdir(parents=True, exist_ok=True)
        return list(mod.write_plots(tables.batches.numeric_columns(), tables.requests.numeric_columns(),
                                    plot_dir))

    def model_out() -> list[Path] | str:
        mod = _optional("service_profiler.model.latency")
        if mod is None:
            return "latency model skipped: service_profiler.model.latency is not installed in this build"
        b = tables.batches
        size, tokens, ms = _finite(b.column("batch_size"), b.column("total_scheduled_tokens"),
                                   b.column("model_run_ms"))
        if len(ms) == 0:
            return "latency model skipped: no batch has a model execution time (modelExec spans)"
        model_dir = out_dir / "model"
        model_dir.mkdir(parents=True, exist_ok=True)
        mod.fit_and_save(size, tokens, ms, model_dir)
        return sorted(p for p in model_dir.rglob("*") if p.is_file())

    # plots + model need only the tables' numeric columns: a forked child draws them on the other core
    # while this process writes SQLite and the CSVs (which need the records)
    side = _Side(progress, [(fmt, label, fn) for fmt, label, fn in (
        ("plots", "plots", plots_out), ("model", "latency model", model_out)) if fmt in formats])
    # SQLite first: its index build (no GIL) then overlaps with the exporters after it
    step("db", "SQLite", db_start)
    step("csv", "CSV", csv_out)
    side.collect(produced, notes, failures)
    if chrome_side is not None:
        chrome_side.collect(produced, notes, failures)
    if pending_db:
        step("db", "SQLite", db_finish)
    if data.problems:
        problems_path = out_dir / "problems.txt"
        problems_path.write_text("\n".join(data.problems) + "\n", encoding="utf-8")
        produced.append(problems_path)

    if not args.quiet:
        print(format_summary(data, tables))
        print(f"\nwrote {len(produced)} file(s) to {out_dir}:")
        for path in produced:
            size = path.stat().st_size if path.exists() else 0
            print(f"  {path.relative_to(out_dir) if path.is_relative_to(out_dir) else path}  ({size:,} bytes)")
        for note in notes:
            print(f"note: {note}")
    if data.problems:
        print(f"\n{len(data.problems)} problem(s) in the raw data (analysis used everything readable):",
              file=sys.stderr)
        for p in data.problems[:20]:
            print(f"  {p}", file=sys.stderr)
        if len(data.problems) > 20:
            print(f"  ... {len(data.problems) - 20} more in {out_dir / 'problems.txt'}", file=sys.stderr)
    for f in failures:
        print(f"error: {f}", file=sys.stderr)
    return EXIT_EXPORT_FAILED if failures else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="service-profiler analyze", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
