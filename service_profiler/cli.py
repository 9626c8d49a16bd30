"""`service-profiler` command line: analyze, inspect, check, model, twin.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`;
this file only wires them, importing a subcommand's module when that subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from . import __version__

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "analyze": ("service_profiler.columnar.command",
                "turn a run directory into chrome_tracing.json, profiler.db, CSV tables, plots and a model"),
    "convert": ("service_profiler.columnar.convert_command",
                "write a run's raw files as Parquet beside them (per host), for analyze to read and merge"),
    "inspect": ("service_profiler.rawdata.inspect_run", "first look at a run: processes, record counts, patch reports"),
    "check": ("service_profiler.checker", "check a symbols YAML against an engine's source without importing it"),
    "model": ("service_profiler.model.command", "fit the batch latency model or predict with it"),
    "scheduler-report": ("service_profiler.frontdoors.report",
                         "statistics and charts of a scheduler-profiling JSONL or a scheduler-logging directory"),
    "workload": ("service_profiler.workload.command",
                 "run profiling cells (C, M, B, block_size) or a request workload on a real engine under the profiler"),
    "diagnose": ("service_profiler.diagnose.command",
                 "classify what limits a run: compute, memory, scheduling, cache or front end"),
    "plan": ("service_profiler.planner.command", "search engine settings for an objective with the digital twin"),
    "workflow": ("service_profiler.planner.workflow",
                 "generate -> profile -> analyze -> diagnose -> plan -> confirm, in one command"),
    "twin": ("service_profiler.twin.command",
             "predict a captured workload under other engine settings with vLLM's real scheduler"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="service-profiler", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"service-profiler {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    chosen = _chosen_command(sys.argv[1:])
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        subparser = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen subcommand's module is imported: `analyze` pulls numpy, `check` does not.
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(subparser)
            subparser.set_defaults(_run=module.run)
    return parser


def _chosen_command(argv: Sequence[str]) -> str | None:
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in SUBCOMMANDS else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:])
    run = getattr(args, "_run", None)
    if run is None:
        parser.error(f"unknown command {args.command!r}")
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
