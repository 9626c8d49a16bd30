"""`service-profiler analyze --input-path P [P ...] --output-path OUT [--format ...]`.

Reads the raw files (tolerantly), builds the analysis tables once, and runs each requested exporter:
  csv    request/batch/kvcache CSVs (msserviceprofiler's columns first), summaries, scheduler-logging lifecycle CSVs
  db     profiler.db (SQLite)
  json   chrome_tracing.json (Perfetto / chrome://tracing)
  plots  PNG charts under plots/
  model  the batch latency model under model/
One exporter failing does not stop the others; it is reported and the exit status is 1. Problems found
in the raw data (torn lines, files without header, ...) are listed at the end and in problems.txt.

Processes (where the platform can fork):
- plots and the latency model: a helper forked before the run is read (its heap stays small) that
  imports matplotlib while the run is read, is sent the tables' numeric columns through a pipe, then
  draws five of the plots while two processes it forks draw the other four and fit the model (and
  draw its two plots); on long runs (SIDE_BY_SIDE_PLOTS_MAX_BATCHES) it does all three itself, one
  after another, as the two more processes would add to the memory peak;
- profiler.db (`db_process`): on large runs a process forked before the read that streams the raw
  files into SQLite's raw tables (~60 MB of memory), is then handed the analysis tables, in parts, and
  the batches' entries (it builds the per-request rows itself) through a spool file that it reads while
  it is written (started as soon as the batch and request tables are built), and also writes the CSVs
  made from what it inserts (batch.csv, per_iteration_requests.csv, request.csv, events.csv,
  state_transitions.csv); on small runs a process forked after the tables are built, which inherits
  the records and tables. Either works beside this process's trace and CSVs.
On large runs the records themselves are processed in one process: a child forked after the read
would end up with its own copy of every page the parent then touches (CPython's reference counts are
writes), i.e. a second copy of the run. `--jobs 2` accepts part of that trade for the chrome trace: a
child forked after the read writes it while this process builds the tables and writes the CSVs. With --jobs 1 the
records other than the batch spans are released once the trace is written.
SERVICE_PROFILER_NO_FORK=1 runs everything in-process.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib
import multiprocessing
import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from service_profiler.outputs import OutputPathError, check_output_dir, output_dir, write_output_text

from .steps import fork_context, merge, receive_forked, receive_outcomes, run_step, start_forked

if TYPE_CHECKING:
    from .db_process import DatabaseProcess
    from .tables import AnalysisTables

FORMATS = ("csv", "json", "db", "plots", "model")
MODEL_COLUMNS = ("batch_size", "total_scheduled_tokens", "model_run_ms")  # the latency model's B, S and T
SIDE_BY_SIDE_PLOTS_MAX_BATCHES = 20_000  # more batches: one plots/model process, not three
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
    parser.add_argument("--scheduler-logs", action="store_true",
                        help="also write the front doors' files from the run: scheduler_profiling.jsonl and "
                             "scheduler_logs/*.csv (docs/FRONT_DOORS.md); with csv in --format")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="N > 1: the chrome trace is written by a process forked after the read, next to "
                             "the tables / CSVs (the records then exist partly twice: more memory; it pays off "
                             "only with 3+ cores, as the database process and the plots helper already use a "
                             "second one). Default 1: the records are processed in one process; profiler.db, "
                             "plots and the latency model always run in small helper processes")


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


def _helper_columns(tables: AnalysisTables) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The numeric batch and request columns the plots and the latency model read (every numeric column
    where the plots module is not installed); complete requests only."""
    from .summary import complete_rows

    requests = complete_rows(tables.requests)  # latency plots, like the statistics, show whole requests only
    plots = _optional("service_profiler.analyze.plots")
    if plots is None:
        return tables.batches.numeric_columns(), requests.numeric_columns()
    return (tables.batches.numeric_columns({*plots.BATCH_COLUMNS, *MODEL_COLUMNS}),
            requests.numeric_columns(plots.REQUEST_COLUMNS))


def _long_run(batch_columns: dict[str, np.ndarray]) -> bool:
    """More batches than SIDE_BY_SIDE_PLOTS_MAX_BATCHES: one process draws the plots, a figure at a time."""
    return max((len(c) for c in batch_columns.values()), default=0) > SIDE_BY_SIDE_PLOTS_MAX_BATCHES


def _finite(*cols: np.ndarray) -> list[np.ndarray]:
    ok = np.ones(len(cols[0]), dtype=bool)
    for c in cols:
        ok &= ~np.isnan(c)
    return [c[ok] for c in cols]


class _Side:
    """Exporters run by a forked child process, in parallel with the parent's own (2+ cores).

    The child inherits the run and tables copy-on-write (nothing is pickled on the way in); it sends back
    only what each step produced. Where fork is unavailable the steps run in-process at `collect`.
    The child prints its own progress lines (its RSS, not the parent's)."""

    def __init__(self, progress: Callable[[str], None], steps: list[tuple[str, str, Callable[[], Any]]]) -> None:
        self.progress, self.steps = progress, steps
        self.proc: Any = None
        self.conn: Any = None
        started = start_forked("analyze-side", self._child) if steps else None
        if started is not None:  # else (no fork) the steps run in-process at `collect`
            self.proc, self.conn = started

    def _child(self, conn: Any) -> None:
        outcomes = [run_step(label, fn, self.progress) for _, label, fn in self.steps]
        conn.send(outcomes)
        conn.close()

    def collect(self, produced: list[Path], notes: list[str], failures: list[str]) -> None:
        """Wait for the child (or run the steps here when there is none) and merge what they produced."""
        if self.proc is None:
            for _, label, fn in self.steps:
                merge(run_step(label, fn, self.progress), produced, notes, failures)
            return
        for outcome in receive_outcomes(self.conn, self.proc, [label for _, label, _ in self.steps]):
            merge(outcome, produced, notes, failures)


class _Feeder:
    """Exporters that need only a small payload (numeric columns), run by a child forked *before* the
    run is read: its heap stays small, while a child forked later would keep its own copy of every page
    of the records the parent then touches (refcount updates are writes). `feed` sends the payload
    through a pipe; `collect` gathers what the steps produced. Without fork, both run in-process."""

    def __init__(self, progress: Callable[[str], None], steps: list[tuple[str, Callable[[Any], Any]]],
                 warm: Sequence[str] = ()) -> None:
        """`warm`: modules the child imports while it waits for its payload."""
        self.progress, self.steps, self.warm = progress, steps, warm
        self.proc: Any = None
        self.conn: Any = None
        self.payload: Any = None
        self.fed = False
        self.sender: threading.Thread | None = None
        started = start_forked("analyze-plots", self._child) if steps else None
        if started is not None:  # else (no fork) the steps run in-process at `collect`
            self.proc, self.conn = started

    in_helper = False  # True in the helper process

    def _child(self, conn: Any) -> None:
        _Feeder.in_helper = True
        for module in self.warm:  # imported while the parent reads the run
            try:
                importlib.import_module(module)
            except Exception:  # the step itself reports a missing or broken module
                break
        try:
            order = conn.recv()
        except EOFError:
            return
        if order is None:
            return
        payload, side_by_side = order
        if side_by_side:
            # The steps after the first run in processes forked from this one now: the modules imported
            # above are imported once and shared, and the steps draw / fit side by side.
            forked = [self._fork_step(label, fn, payload) for label, fn in self.steps[1:]]
            label, fn = self.steps[0]
            outcomes = [run_step(label, functools.partial(fn, payload), self.progress)]
            for (recv, pid), (label, _) in zip(forked, self.steps[1:], strict=True):
                outcomes += receive_forked(recv, pid, label)
        else:
            outcomes = [run_step(label, functools.partial(fn, payload), self.progress) for label, fn in self.steps]
        conn.send(outcomes)
        conn.close()

    def _fork_step(self, label: str, fn: Callable[[Any], Any], payload: Any) -> tuple[Any, int | None]:
        """Run one step in a process forked from this helper (os.fork: a daemonic multiprocessing
        process may not start children of its own); (pipe end, pid), or (None, None) when fork failed."""
        recv, send = multiprocessing.Pipe(duplex=False)
        try:
            pid = os.fork()
        except OSError:
            recv.close()
            send.close()
            return None, None
        if pid == 0:  # the grandchild: run the step, send its outcome, leave without any exit handlers
            code = 0
            try:
                recv.close()
                send.send(run_step(label, functools.partial(fn, payload), self.progress))
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        send.close()
        return recv, pid

    def feed(self, payload: Any, side_by_side: bool = True) -> None:
        """Send the payload from a thread: the helper reads it only once its imports are done, and a
        payload larger than the pipe's buffer would block this process until then (~0.3 s on a
        1,000-request run, while the helper imports matplotlib). `side_by_side`: the helper runs the
        steps in processes of their own, at once (sooner done; each process costs its own memory)."""
        self.fed = True
        if self.proc is None:
            self.payload = payload
            return
        self.sender = threading.Thread(target=self._send, args=((payload, side_by_side),), name="analyze-feed",
                                       daemon=True)
        self.sender.start()

    def _send(self, payload: Any) -> None:
        try:
            self.conn.send(payload)
        except OSError:  # the helper is gone: collect reports it
            pass

    def cancel(self) -> None:
        """Let an unfed helper exit (the analysis stopped before it had anything to do)."""
        if self.proc is not None and not self.fed:
            self.fed = True
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.conn.close()
            self.proc.join()

    def collect(self, produced: list[Path], notes: list[str], failures: list[str]) -> None:
        if self.proc is None:
            for label, fn in self.steps:
                merge(run_step(label, functools.partial(fn, self.payload), self.progress), produced, notes,
                       failures)
            self.payload = None
            return
        if self.sender is not None:
            self.sender.join()
        for outcome in receive_outcomes(self.conn, self.proc, [label for label, _ in self.steps]):
            merge(outcome, produced, notes, failures)


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
    out_dir: Path = args.output_path
    formats: list[str] = list(dict.fromkeys(args.format))
    progress = _Progress(sys.stderr, args.quiet)
    created = not out_dir.exists()
    try:  # before any work: an output path that cannot be used is the user's to fix, not a traceback
        check_output_dir(out_dir)
    except OutputPathError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NO_DATA

    def plots_out(cols: tuple[dict[str, np.ndarray], dict[str, np.ndarray]], part: int) -> list[Path] | str:
        mod = _optional("service_profiler.analyze.plots")
        if mod is None:
            return "plots skipped: service_profiler.analyze.plots is not installed in this build"
        plot_dir = output_dir(out_dir / "plots")
        # two parts, drawn by two processes: the first five (three wide line charts) and the last four
        names = mod.PLOT_NAMES[:5] if part == 0 else mod.PLOT_NAMES[5:]
        if not (_long_run(cols[0]) and _Feeder.in_helper):
            return list(mod.write_plots(cols[0], cols[1], plot_dir, names))
        # The helper draws every figure (see feed): each is a web of reference cycles holding its pixel
        # buffers (~10 MB), freed only by the cyclic collector, which analyze turns off. Collecting is
        # cheap in the helper, forked while the heap was small (not in analyze itself, without fork).
        written: list[Path] = []
        for name in names:
            written += mod.write_plots(cols[0], cols[1], plot_dir, [name])
            gc.collect()
        return written

    def model_out(cols: tuple[dict[str, np.ndarray], dict[str, np.ndarray]]) -> list[Path] | str:
        mod = _optional("service_profiler.model.latency")
        if mod is None:
            return "latency model skipped: service_profiler.model.latency is not installed in this build"
        b = cols[0]
        for name in MODEL_COLUMNS:
            if name not in b:
                raise TypeError(f"batch column {name} is not numeric")
        size, tokens, ms = _finite(*(b[name] for name in MODEL_COLUMNS))
        if len(ms) == 0:
            return "latency model skipped: no batch has a model execution time (modelExec spans)"
        model_dir = output_dir(out_dir / "model")
        mod.fit_and_save(size, tokens, ms, model_dir)
        return sorted(p for p in model_dir.rglob("*") if p.is_file())

    # plots and the model need only the tables' numeric columns (a few MB): a helper forked now, while the
    # heap is small, draws and fits them on the other core(s) once it is sent the columns. It imports
    # matplotlib while the run is read, then draws the first part of the plots itself while the model
    # and the second part run in processes it forks (matplotlib, imported once, is shared).
    steps: list[tuple[str, Callable[[Any], Any]]] = [
        (label, fn) for fmt, label, fn in (("plots", "plots", functools.partial(plots_out, part=0)),
                                           ("model", "latency model", model_out),
                                           ("plots", "plots", functools.partial(plots_out, part=1)))
        if fmt in formats]
    warm = ("matplotlib.figure", "matplotlib.backends.backend_agg")
    helpers = [_Feeder(progress, steps, warm)] if steps else []
    try:
        status = _analyze(args, out_dir, formats, progress, helpers)
    finally:
        for helper in helpers:
            helper.cancel()
    if created and status == EXIT_NO_DATA and out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()  # nothing was analysed: leave no empty directory behind
    return status


def _analyze(args: argparse.Namespace, out_dir: Path, formats: list[str], progress: _Progress,
             helpers: list[_Feeder]) -> int:
    from service_profiler.rawdata.rawfile import discover_files

    from .db_process import DatabaseProcess

    # profiler.db is written by a process of its own (db_process): on large runs it starts now, while
    # the heap is small, and streams the raw files into the raw tables; on small runs it is forked at
    # hand_over. Either way it adds the analysis tables it is handed.
    database: DatabaseProcess | None = None
    raw_files = discover_files(args.input_path, []) if "db" in formats else []
    if raw_files:
        database = DatabaseProcess(progress, args.input_path, raw_files, out_dir)
    try:
        return _analyze_run(args, out_dir, formats, progress, helpers, database)
    except BaseException:  # no half-written database left behind, nor its process running on
        if database is not None:
            database.abandon()
        raise


def _analyze_run(args: argparse.Namespace, out_dir: Path, formats: list[str], progress: _Progress,
                 helpers: list[_Feeder], database: DatabaseProcess | None) -> int:
    from service_profiler.rawdata.rawfile import read_run

    from .csv_export import (
        BATCH_CSV,
        TABLE_CSVS,
        process_labels,
        write_batch_csv,
        write_csvs,
        write_per_iteration,
        write_table_csv,
    )
    from .summary import format_summary
    from .tables import build_tables

    data = read_run(args.input_path)
    progress(f"read {len(data.processes)} process file(s), {data.num_records:,} records")
    if not data.processes:
        if database is not None:
            database.cancel()
            database.collect([], [], [])
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

    # --jobs > 1: the trace needs the records alone (not the tables): a child forked now writes it while
    # this process builds the tables and writes the analysis tables and CSVs. Only the records this
    # process touches after the fork get a second copy (copy-on-write), not all of them.
    records_side: _Side | None = None
    if getattr(args, "jobs", 1) > 1 and "json" in formats and fork_context() is not None:
        records_side = _Side(progress, [("json", "chrome trace", chrome_out)])
    # The database process gets the analysis tables first. Streaming (large runs), it also writes the
    # CSVs made from what it is handed: batch.csv and per_iteration_requests.csv (from the batch table
    # and the entries it inserts into batch_req) and TABLE_CSVS; on small runs this process has the time
    # to write them itself, and the database is done sooner. It works beside the trace and the CSVs below.
    delegate = database is not None and database.streaming
    csv_dir = out_dir if "csv" in formats and delegate else None

    def batches_built(tables: AnalysisTables) -> None:
        """The batch and request tables are built (the rest are being): the helpers and, streaming, the
        database process get to work on them meanwhile."""
        if helpers:
            columns = _helper_columns(tables)
            # Long runs: the plots and the model are drawn and fitted one after another in the helper
            # (seconds, beside this process's tens); two more processes with their own copy of the figures
            # would add ~100 MB to the peak, which comes while the run's records are held here.
            for helper in helpers:
                helper.feed(columns, side_by_side=not _long_run(columns[0]))
        if database is not None and "db" in formats:
            database.start_hand_over(data, tables, process_labels(data), csv_dir)

    tables = build_tables(data, batches_built)
    progress(f"tables: {len(tables.requests):,} requests, {len(tables.batches):,} batches")

    produced: list[Path] = []
    failures: list[str] = []
    notes: list[str] = []

    def step(fmt: str, label: str, fn: Callable[[], Any]) -> None:
        if fmt in formats:
            merge(run_step(label, fn, progress), produced, notes, failures)

    if database is not None:
        step("db", "SQLite", lambda: database.hand_over(data, tables, process_labels(data), csv_dir))
    # The front doors' JSONL and CSVs (scheduler_profiling.jsonl, scheduler_logs/), replayed from the
    # records before they are released below; on request, as the replay is a Python loop over the
    # batches' entries.
    if getattr(args, "scheduler_logs", False):
        step("csv", "front-door files", functools.partial(_front_door_outputs, data, out_dir))
    if records_side is None:
        step("json", "chrome trace", chrome_out)
        # The records' last consumer was the trace (SQLite's raw tables come from the files, or from the
        # database process's own copy): their memory goes to the CSVs; the tables keep the batch spans.
        # (Not with --jobs: the child's copy-on-write pages would be written by the releases.)
        data.spans, data.events, data.counters = [], [], []
    step("csv", "CSV", lambda: write_csvs(data, tables, out_dir, delegated=delegate))
    if records_side is not None:
        records_side.collect(produced, notes, failures)
    for helper in helpers:
        helper.collect(produced, notes, failures)
    if database is not None:
        database.collect(produced, notes, failures)
        produced += database.csv_written
        if csv_dir is not None:
            # what the database process did not write (it failed, or died): written here instead
            written = {p.name for p in database.csv_written}
            per_iteration = csv_dir / "per_iteration_requests.csv"
            if per_iteration.name not in written:
                step("csv", "per-iteration CSV", lambda: write_per_iteration(data, tables, per_iteration))
            if BATCH_CSV not in written:
                step("csv", BATCH_CSV, lambda: write_batch_csv(data, tables, csv_dir / BATCH_CSV))
            for name in TABLE_CSVS:
                if name not in written:
                    step("csv", name, functools.partial(write_table_csv, data, tables, csv_dir, name))
    if data.problems:
        problems_path = out_dir / "problems.txt"
        merge(run_step("problems.txt", lambda: write_output_text(problems_path, "\n".join(data.problems) + "\n"),
                       progress), produced, notes, failures)

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


def _front_door_outputs(data: Any, out_dir: Path) -> list[Path]:
    from service_profiler.frontdoors.offline import write_front_door_outputs

    return write_front_door_outputs(data, out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="service-profiler analyze", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
