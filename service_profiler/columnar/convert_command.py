"""`service-profiler convert --input-path RUN_DIR [RUN_DIR ...]`: raw files -> Parquet beside them.

Run it on each host over that host's run directory (in parallel, hosts independent); then gather the
`sprof-parquet/` directories (rsync, a shared file system) and run `analyze --input-path` on them: it
reads all hosts' Parquet together (docs/DISTRIBUTED.md). Exit status: 0, 2 when a directory could not
be converted (the others still are).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from .parquet_out import ConvertError, convert
from .run import DEFAULT_MEMORY_LIMIT
from .workdir import WorkDirError

EXIT_OK, EXIT_FAILED = 0, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-path", nargs="+", required=True, type=Path, metavar="RUN_DIR",
                        help="run directory (or directory of runs) holding raw files (*.sprof.jsonl); each is "
                             "converted into RUN_DIR/sprof-parquet/")
    parser.add_argument("--memory-limit", default=DEFAULT_MEMORY_LIMIT, metavar="SIZE",
                        help=f"DuckDB's memory limit (default {DEFAULT_MEMORY_LIMIT}); the rest is spilled")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help="DuckDB threads (default: all cores)")
    parser.add_argument("--temp-dir", type=Path, default=None, metavar="DIR",
                        help="where the work directory is made (default: the system's temporary directory)")
    parser.add_argument("--quiet", action="store_true", help="only errors")


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the staging directory is removed on the way out
    status = EXIT_OK
    for run_dir in args.input_path:
        try:
            done = convert(run_dir, memory_limit=args.memory_limit, threads=args.threads, temp_root=args.temp_dir,
                           report=None if args.quiet else _to_stderr)
        except (ConvertError, WorkDirError) as exc:
            print(f"convert: {exc}", file=sys.stderr)
            status = EXIT_FAILED
            continue
        except OSError as exc:
            print(f"convert: {run_dir}: {exc.strerror or exc} ({exc.filename or run_dir}); nothing written",
                  file=sys.stderr)
            status = EXIT_FAILED
            continue
        if not args.quiet:
            print(f"wrote {done.parquet_dir}: {done.processes} process(es), {done.records:,} records, "
                  f"{done.bytes / 1e6:.1f} MB in {done.seconds:.1f} s"
                  + (f"; {len(done.problems)} problem(s) in the raw data (kept in problem.parquet)"
                     if done.problems else ""))
    return status
