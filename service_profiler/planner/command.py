"""`service-profiler plan`: engine settings for an objective, searched with the digital twin on the
workload of a profiled run.

    service-profiler plan --run ANALYZE_OUT --objective throughput|latency|memory|cache|balanced --output-path P
    service-profiler plan --run ANALYZE_OUT --slo-ttft-ms 200 --slo-tpot-ms 50 --output-path P
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..diagnose.signals import parse_serve_args
from .plans import PARETO_FILE, PLANS_FILE, SWEEP_FILE, pareto_table, plan_run
from .search import MIN_GAIN, OBJECTIVES, Slo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, type=Path, help="output directory of `service-profiler analyze`")
    parser.add_argument("--objective", choices=OBJECTIVES, default="balanced")
    parser.add_argument("--slo-ttft-ms", type=float, help="SLO mode: P90 TTFT limit (ms)")
    parser.add_argument("--slo-tpot-ms", type=float, help="SLO mode: P90 TPOT limit (ms)")
    parser.add_argument("--output-path", type=Path, default=Path("plans"))
    parser.add_argument("--top", type=int, default=10, help="plans to keep")
    parser.add_argument("--budget-s", type=float, default=300.0, help="stop the search after this many seconds")
    parser.add_argument("--load-multiplier", type=float, default=1.0,
                        help="plan for the captured workload's arrivals compressed by this factor")
    parser.add_argument("--min-gain", type=float, default=MIN_GAIN,
                        help="a plan ranks above the captured settings only if predicted to gain at least this "
                             "fraction on the objective (default %(default)s; 0 ranks by prediction alone)")
    parser.add_argument("--engine-args", nargs=argparse.REMAINDER, default=[],
                        help="the captured run's `vllm serve` arguments, where its records lack them")


def run(args: argparse.Namespace) -> int:
    from ..twin.capture import CaptureError

    slo = Slo(args.slo_ttft_ms, args.slo_tpot_ms)
    try:
        doc = plan_run(args.run, args.objective, args.output_path, slo, args.top, args.budget_s,
                       engine=parse_serve_args(args.engine_args), load_multiplier=args.load_multiplier,
                       min_gain=args.min_gain)
    except (CaptureError, FileNotFoundError) as exc:
        print(f"service-profiler plan: {exc}", file=sys.stderr)
        return 2
    s = doc["search"]
    print(f"objective {doc['objective']}: {s['evaluated']} configurations ({s['rejected']} rejected by vLLM's rules), "
          f"{s['twin_runs']} twin runs in {s['seconds']:.1f} s")
    cap = doc["captured"]["predicted"]
    print(f"captured settings: {cap['output_throughput_tok_s'] or 0:.1f} tok/s, "
          f"TTFT p50 {cap['ttft_ms_p50'] or 0:.1f} ms")
    if doc["plans"]:
        top = doc["plans"][0]
        m = top["predicted"]
        print(f"best plan: {m['output_throughput_tok_s'] or 0:.1f} tok/s, TTFT p50 {m['ttft_ms_p50'] or 0:.1f} ms"
              + (f", SLO rate x{top['slo_rate_multiplier']:.2f} of the captured load" if top["slo_rate_multiplier"]
                 is not None else ""))
        print("  vllm serve <model> " + " ".join(top["vllm_serve_args"]))
    for note in doc["notes"]:
        print(f"note: {note}")
    print("\nPareto (throughput, p50 TTFT, KV size):\n" + pareto_table(doc))
    out = args.output_path
    print(f"wrote {out / PLANS_FILE}, {out / PARETO_FILE}, {out / SWEEP_FILE} "
          f"(vllm bench sweep serve --serve-params {out / SWEEP_FILE} ...)")
    return 0
