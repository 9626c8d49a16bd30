"""`service-profiler diagnose OUT`: what limits this run, with the numbers, and which knob to turn.

OUT is an `analyze` output directory (batch.csv, request.csv) or a raw run directory. Writes
performance_analysis.json and vllm_performance_analysis.png (into --output-path, default OUT) and
prints a report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .analysis import console_report, diagnose, write_analysis
from .recommend import Predictor
from .signals import DiagnoseError, load_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, metavar="OUT", help="analyze output directory or run directory")
    parser.add_argument("--output-path", type=Path, help="where to write the outputs (default: OUT)")
    parser.add_argument("--workload", type=Path, help="the workload's trace (JSONL with token_ids): its prefix "
                        "overlap is the ceiling for the prefix hit rate")
    parser.add_argument("--engine-args", nargs=argparse.REMAINDER, default=[],
                        help="the run's `vllm serve` arguments, when the run's records do not carry them")
    parser.add_argument("--no-twin", action="store_true", help="skip the twin's predictions")
    parser.add_argument("--no-figure", action="store_true")


def twin_predictor(analyze_dir: Path, engine: dict[str, Any]) -> Predictor | None:
    """Predict metrics for this run with some engine settings changed, or None when the twin is unavailable."""
    if not (analyze_dir / "batch.csv").is_file():
        return None
    try:
        from ..twin import Twin  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        return None
    from ..planner.plans import apply_engine_settings, quiet_vllm

    quiet_vllm()

    try:
        twin = Twin.from_run(analyze_dir)
    except Exception:  # a run the twin cannot load still gets its diagnosis
        return None
    apply_engine_settings(twin, engine)

    def predict(changes: dict[str, Any]) -> dict[str, Any]:
        return dict(twin.run(dict(changes)).metrics)

    return predict


def run(args: argparse.Namespace) -> int:
    try:
        view = load_run(args.out, args.engine_args, args.workload)
    except DiagnoseError as exc:
        print(f"service-profiler diagnose: {exc}", file=sys.stderr)
        return 2
    predictor = None if args.no_twin else twin_predictor(args.out, view.engine)
    doc = diagnose(view, predictor)
    out_dir = args.output_path or args.out
    path = write_analysis(doc, out_dir)
    print(console_report(doc))
    print(f"\nwrote {path}")
    if not args.no_figure:
        from .figure import write_figure

        print(f"wrote {write_figure(view.batches, doc, out_dir / 'vllm_performance_analysis.png')}")
    return 0
