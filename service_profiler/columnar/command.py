"""`service-profiler analyze --input-path P [P ...] --output-path OUT [--format ...]`.

The tables are built once by DuckDB queries in a private work directory (memory bounded by
`--memory-limit`; what does not fit is spilled there), then each requested output is written by its
exporter:
  csv    request/batch/kvcache CSVs (msserviceprofiler's columns first), per-iteration states, lifecycle
         events and state transitions, summaries
  db     profiler.db (SQLite)
  json   chrome_tracing.json (Perfetto / chrome://tracing)
  plots  PNG charts under plots/
  model  the batch latency model under model/
One exporter failing does not stop the others; it is reported and the exit status is 1. Problems found
in the raw data are listed at the end and in problems.txt. Exit status 2: nothing to analyze, an output
path that cannot be used, or tables that do not fit in --memory-limit (the message says what to change).
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import duckdb

from service_profiler.outputs import OutputPathError, check_output_dir, describe_os_error, write_output_text
from service_profiler.rawdata.rawfile import discover_files

from .figure_process import FigureProcess
from .parquet_format import ParquetInputError
from .pipeline import EXPORTERS, EarlyOutputs, Outcome, export_all
from .run import DEFAULT_MEMORY_LIMIT, SMALL_RUN_RECORDS, analyze_run
from .trace_out import DEFAULT_MAX_EVENTS, DEFAULT_MAX_PER_SECOND
from .workdir import WorkDirError

EXIT_OK, EXIT_EXPORT_FAILED, EXIT_NO_DATA = 0, 1, 2
DEFAULT_JOBS = 2
FORMATS = ("csv", "json", "db", "plots", "model")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-path", nargs="+", required=True, type=Path, metavar="PATH",
                        help="run directory, directory of runs, or raw files (*.sprof.jsonl); several allowed. "
                             "Where `service-profiler convert` wrote Parquet (sprof-parquet/), that is read instead")
    parser.add_argument("--output-path", required=True, type=Path, metavar="OUT", help="directory for the outputs")
    parser.add_argument("--format", nargs="+", choices=FORMATS, default=list(FORMATS), metavar="FMT",
                        help=f"outputs to write, any of: {' '.join(FORMATS)} (default: all)")
    parser.add_argument("--memory-limit", default=DEFAULT_MEMORY_LIMIT, metavar="SIZE",
                        help=f"DuckDB's memory limit, e.g. 512MB, 2GB (default {DEFAULT_MEMORY_LIMIT}); "
                             "the rest is spilled to the work directory; outputs written side by side get three "
                             "quarters of it")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="DuckDB threads (default: all cores, shared out among the outputs written side by "
                             f"side; one for the tables of a run of under {SMALL_RUN_RECORDS:,} records)")
    parser.add_argument("--temp-dir", type=Path, default=None, metavar="DIR",
                        help="where the work directory is made (default: the system's temporary directory)")
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS, metavar="N",
                        help=f"outputs written N at a time, by threads of this process, the plots and the model "
                             f"drawn by processes of their own (default {DEFAULT_JOBS}; 1: one after another, all "
                             "in this process)")
    parser.add_argument("--processes", action="store_true",
                        help="with --jobs N > 1: by a pool of N processes instead, which open the analysis "
                             "database as a file (building that file costs more CPU)")
    parser.add_argument("--window", type=_window, default=None, metavar="START:END",
                        help="the trace holds only this window, seconds since the run's first record (e.g. 60:90)")
    parser.add_argument("--trace-max-per-second", type=_count(1), default=DEFAULT_MAX_PER_SECOND, metavar="N",
                        help="the trace keeps at most N events of one name per process per second "
                             f"(default {DEFAULT_MAX_PER_SECOND}); the counts are in its metadata")
    parser.add_argument("--trace-max-events", type=_count(0), default=DEFAULT_MAX_EVENTS, metavar="N",
                        help=f"a trace that would hold more than about N events (default {DEFAULT_MAX_EVENTS:,}: "
                             "what a browser loads) keeps fewer per second, over the whole run; 0: no bound")
    parser.add_argument("--quiet", action="store_true", help="no console summary, only errors")
    parser.add_argument("--scheduler-logs", action="store_true",
                        help="also write the front doors' files from the run: scheduler_profiling.jsonl and "
                             "scheduler_logs/*.csv (docs/FRONT_DOORS.md); with csv in --format")


def _count(least: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.replace("_", "").replace(",", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{text!r}: give {least} or more")
        return value
    return parse


def _window(text: str) -> tuple[float, float]:
    try:
        start, end = (float(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not START:END in seconds, e.g. 60:90") from None
    if end <= start:
        raise argparse.ArgumentTypeError(f"{text!r}: END must be after START")
    return start, end


class _Progress:
    def __init__(self, stream: TextIO, quiet: bool) -> None:
        self.stream, self.quiet, self.t0 = stream, quiet, time.perf_counter()

    def __call__(self, message: str) -> None:
        if not self.quiet:
            usage = resource.getrusage(resource.RUSAGE_SELF)
            cpu = usage.ru_utime + usage.ru_stime
            print(f"[analyze {time.perf_counter() - self.t0:6.2f}s cpu {cpu:6.2f}s {usage.ru_maxrss / 1024:5.0f} MB] "
                  f"{message}", file=self.stream, flush=True)


def _clear_links(out: Path) -> None:
    """Files this run writes are made fresh, never through a link left in the output directory."""
    for name in os.listdir(out):
        if (out / name).is_symlink():
            (out / name).unlink()


def run(args: argparse.Namespace) -> int:
    # SIGTERM ends the command through SystemExit, so the work directory (the run's database) is removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return _run(args)
    except Exception as exc:
        # SIGTERM while DuckDB runs a query: DuckDB stops it and raises "Query interrupted", caused by the
        # handler's SystemExit; the command ends as SIGTERM says, without a traceback
        stop = exc.__cause__ or exc.__context__
        if isinstance(stop, SystemExit):
            raise SystemExit(stop.code) from None
        raise


def _run(args: argparse.Namespace) -> int:
    progress = _Progress(sys.stderr, args.quiet)
    out: Path = args.output_path
    try:  # before any work: an output path that cannot be used is the user's to fix, not a traceback
        if out.is_symlink():
            raise OutputPathError(f"output directory {out}: is a symbolic link, which is never followed; "
                                  "give the directory it points to, or another path")
        check_output_dir(out)
        _clear_links(out)
    except OutputPathError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NO_DATA
    except OSError as exc:
        print(f"error: {describe_os_error(out, exc)}", file=sys.stderr)
        return EXIT_NO_DATA
    formats = [f for f in EXPORTERS if f in args.format or (f == "summary" and "csv" in args.format)]
    pool = args.processes and args.jobs > 1 and len(formats) > 1
    figures = None
    if args.jobs > 1 and not pool and {"plots", "model"} & set(formats):
        # started now: it imports matplotlib while the tables are built
        figures = FigureProcess(workers=2 if 0 < _raw_bytes(args.input_path) < SMALL_RUN_RAW_BYTES else 1)
    try:
        return _analyze(args, formats, out, pool, figures, progress)
    finally:
        if figures is not None:
            figures.close()


SMALL_RUN_RAW_BYTES = 32 << 20
"""Raw files smaller than this together make a small run (about 100,000 records, `SMALL_RUN_RECORDS`):
there the figures, drawn two at a time, are the last thing to end; a larger run, or one read from its
Parquet conversions alone, draws them one at a time, in less memory (`FigureProcess`)."""


def _raw_bytes(paths: Sequence[Path]) -> int:
    """The size of the raw files under `paths` (a stat each), as `analyze` finds them."""
    total = 0
    for path in discover_files(paths, []):
        try:
            total += path.stat().st_size
        except OSError:
            continue
    return total


def _analyze(args: argparse.Namespace, formats: list[str], out: Path, pool: bool, figures: FigureProcess | None,
             progress: _Progress) -> int:
    options: dict[str, dict[str, Any]] = {
        "json": {"window": args.window, "max_per_second": args.trace_max_per_second,
                 "max_events": args.trace_max_events, "quiet": args.quiet},
        "plots": {"figures": figures}, "model": {"figures": figures}}
    # the figures are drawn while the last tables are built, where the figure process would wait for them
    early = EarlyOutputs(formats, out, figures) if figures is not None else None
    try:
        analysis = analyze_run(args.input_path, memory_limit=args.memory_limit, threads=args.threads,
                               temp_root=args.temp_dir, progress=progress, shared=pool,
                               batches_built=early.start if early else None)
    except (ParquetInputError, WorkDirError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NO_DATA
    except duckdb.OutOfMemoryException as exc:
        print(f"error: the analysis tables did not fit in --memory-limit {args.memory_limit} "
              f"({str(exc).splitlines()[0]}); run again with a larger --memory-limit, or with --threads 1, which "
              "needs less",
              file=sys.stderr)
        return EXIT_NO_DATA
    try:
        if not analysis.processes:
            print("error: no readable raw files (*.sprof.jsonl) in " + " ".join(map(str, args.input_path)),
                  file=sys.stderr)
            for problem in analysis.problems:
                print(f"  {problem}", file=sys.stderr)
            return EXIT_NO_DATA
        summary = ""
        if not args.quiet:
            from .summary import format_summary
            summary = format_summary(analysis)
        outcomes = export_all(analysis, formats, out, jobs=args.jobs, progress=progress, options=options,
                              started=early.futures if early else None)
    finally:
        if early is not None:
            early.wait()
        analysis.close()
    if args.scheduler_logs and "csv" in args.format:
        outcomes.append(_front_door_outputs(args.input_path, out))
    if analysis.problems:
        problems = out / "problems.txt"
        write_output_text(problems, "\n".join(analysis.problems) + "\n")
        outcomes.append(Outcome("problems", [problems]))
    if not args.quiet:
        written = [p for o in outcomes for p in o.paths]
        print(summary)
        print(f"\nwrote {len(written)} file(s) to {out}:")
        for path in written:
            size = path.stat().st_size if path.exists() else 0
            print(f"  {path.relative_to(out) if path.is_relative_to(out) else path}  ({size:,} bytes)")
    if analysis.problems:
        print(f"\n{len(analysis.problems)} problem(s) in the raw data (analysis used everything readable):",
              file=sys.stderr)
        for problem in analysis.problems[:20]:
            print(f"  {problem}", file=sys.stderr)
        if len(analysis.problems) > 20:
            print(f"  ... {len(analysis.problems) - 20} more in {out / 'problems.txt'}", file=sys.stderr)
    failed = [o for o in outcomes if o.error]
    for outcome in failed:
        print(failure_message(outcome, args.memory_limit), file=sys.stderr)
    return EXIT_EXPORT_FAILED if failed else EXIT_OK


def failure_message(outcome: Outcome, memory_limit: str) -> str:
    """What to tell of an output that failed: for one that ran out of memory, what to change."""
    if outcome.out_of_memory and outcome.error:
        why = outcome.error.splitlines()[0].removeprefix(f"{duckdb.OutOfMemoryException.__name__}: ")
        return (f"error: {outcome.fmt} did not fit in --memory-limit {memory_limit} ({why}); "
                f"run again with a larger --memory-limit, or without {outcome.fmt} in --format (the other outputs "
                "were written)")
    return f"error: {outcome.fmt} failed: {outcome.error}"


def _front_door_outputs(paths: list[Path], out: Path) -> Outcome:
    """scheduler_profiling.jsonl and scheduler_logs/*.csv, replayed from the records (a Python loop over
    the batches' entries: on request only)."""
    from service_profiler.frontdoors.offline import write_front_door_outputs
    from service_profiler.rawdata.rawfile import read_run

    try:
        return Outcome("front-door files", write_front_door_outputs(read_run(paths), out))
    except Exception as exc:  # reported like an exporter's failure; the other outputs stand
        return Outcome("front-door files", error=f"{type(exc).__name__}: {exc}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="service-profiler analyze", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
