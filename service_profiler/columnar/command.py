"""`service-profiler analyze2 --input-path P [P ...] --output-path OUT [--format ...]`: analyze on DuckDB.

The tables are built once by DuckDB queries in a private work directory (memory bounded by
`--memory-limit`; what does not fit is spilled there), then each requested output is written by its
exporter. Problems found in the raw data are listed at the end and in problems.txt. Exit status: 0,
1 when an exporter failed, 2 when there was nothing to analyze.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import TextIO

from .parquet_format import ParquetInputError
from .pipeline import EXPORTERS, export_all
from .run import DEFAULT_MEMORY_LIMIT, analyze_run
from .trace_out import DEFAULT_MAX_PER_SECOND

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
                             "the rest is spilled to the work directory")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help="DuckDB threads (default: all cores)")
    parser.add_argument("--temp-dir", type=Path, default=None, metavar="DIR",
                        help="where the work directory is made (default: the system's temporary directory)")
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS, metavar="N",
                        help=f"outputs written N at a time, by threads of this process (default {DEFAULT_JOBS}; "
                             "1: one after another)")
    parser.add_argument("--processes", action="store_true",
                        help="with --jobs N > 1: by a pool of N processes instead, which open the analysis "
                             "database as a file (building that file costs more CPU)")
    parser.add_argument("--window", type=_window, default=None, metavar="START:END",
                        help="the trace holds only this window, seconds since the run's first record (e.g. 60:90)")
    parser.add_argument("--trace-max-per-second", type=int, default=DEFAULT_MAX_PER_SECOND, metavar="N",
                        help="the trace keeps at most N events of one name per process per second "
                             f"(default {DEFAULT_MAX_PER_SECOND}); the counts are in its metadata")
    parser.add_argument("--quiet", action="store_true", help="no console summary, only errors")


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
            print(f"[analyze2 {time.perf_counter() - self.t0:6.2f}s cpu {cpu:6.2f}s {usage.ru_maxrss / 1024:5.0f} MB] "
                  f"{message}", file=self.stream, flush=True)


def _safe_out_dir(out: Path) -> Path:
    """The output directory, created; refused when it is a symlink (never followed)."""
    if out.is_symlink():
        raise SystemExit(f"--output-path {out} is a symbolic link; give a real directory")
    out.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(out):  # files this run writes are made fresh, never through a link left there
        if (out / name).is_symlink():
            (out / name).unlink()
    return out


def run(args: argparse.Namespace) -> int:
    # SIGTERM ends the command through SystemExit, so the work directory (the run's database) is removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    progress = _Progress(sys.stderr, args.quiet)
    out = _safe_out_dir(args.output_path)
    formats = [f for f in EXPORTERS if f in args.format or (f == "summary" and "csv" in args.format)]
    pool = args.processes and args.jobs > 1 and len(formats) > 1
    try:
        analysis = analyze_run(args.input_path, memory_limit=args.memory_limit, threads=args.threads,
                               temp_root=args.temp_dir, progress=progress, shared=pool)
    except ParquetInputError as exc:
        print(f"analyze2: {exc}", file=sys.stderr)
        return EXIT_NO_DATA
    try:
        if not analysis.processes:
            print("analyze2: no readable raw files under " + " ".join(map(str, args.input_path)), file=sys.stderr)
            for problem in analysis.problems:
                print(f"  {problem}", file=sys.stderr)
            return EXIT_NO_DATA
        if not args.quiet:
            from .summary import format_summary
            print(format_summary(analysis))
        options = {"json": {"window": args.window, "max_per_second": args.trace_max_per_second}}
        outcomes = export_all(analysis, formats, out, jobs=args.jobs, progress=progress, options=options)
    finally:
        analysis.close()
    status = EXIT_OK
    for outcome in outcomes:
        if outcome.error:
            status = EXIT_EXPORT_FAILED
            print(f"analyze2: {outcome.fmt} failed: {outcome.error}", file=sys.stderr)
    if analysis.problems:
        (out / "problems.txt").write_text("\n".join(analysis.problems) + "\n", encoding="utf-8")
        if not args.quiet:
            print(f"{len(analysis.problems)} problem(s) in the raw data, see {out / 'problems.txt'}")
    if not args.quiet:
        written = [p for o in outcomes for p in o.paths]
        print(f"wrote {len(written)} file(s) to {out}")
    return status
