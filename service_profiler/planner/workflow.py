"""`service-profiler workflow`: generate -> profile -> analyze -> diagnose -> plan -> confirm, in one command.

    service-profiler workflow --target-optimization balanced [--quick-test] [--model DIR] --output-dir OUT

Profiles C/M/B cells and a request workload on the real engine under the profiler, analyzes and diagnoses
the workload run, plans engine settings with the twin for the target, runs the top plan on the same
workload for real, and reports predicted against measured. Without --model it runs on the embedded
default, a tiny local Llama built on the spot in OUT/model_cache (no model hub), on vLLM's CPU build.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..workload import ArrivalSpec, EngineSettings, ProfilingConfig, ProfilingRunner, RequestMix
from ..workload.runner import model_vocab_size
from .search import OBJECTIVES

STAGES = ("generate", "profile", "analyze", "diagnose", "plan", "confirm")
COMPARED = ("output_throughput_tok_s", "ttft_ms_p50", "ttft_ms_p90", "tpot_ms_p50", "e2e_ms_p50", "preemptions")


class Progress:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.done = 0

    def stage(self, name: str, detail: str = "") -> None:
        width = 24
        filled = width * self.done // len(STAGES)
        bar = "#" * filled + "-" * (width - filled)
        print(f"[{bar}] {self.done + 1}/{len(STAGES)} {name:<9} {time.monotonic() - self.started:6.0f}s  {detail}",
              file=sys.stderr, flush=True)
        self.done += 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path,
                        help="model directory; default: a tiny local Llama built in OUTPUT_DIR/model_cache")
    parser.add_argument("--target-optimization", choices=OBJECTIVES, default="balanced")
    parser.add_argument("--quick-test", action="store_true", help="fewer cells and requests: a few minutes")
    parser.add_argument("--output-dir", type=Path, default=Path("profiling_results"))
    parser.add_argument("--rate", type=float, default=20.0, help="request rate of the profiled workload (req/s)")


def resolve_model(model: Path | None, out: Path) -> Path:
    """The model to run: the one given, else the embedded default built (or reused) under `out`."""
    from ..workload.tiny_model import describe, make_model

    if model is not None:
        return model.resolve()
    cache = (out / "model_cache" / "tiny-llama").resolve()
    reused = (cache / "config.json").exists() and (cache / "tokenizer.json").exists()
    print(f"no --model: {'reusing' if reused else 'building'} the embedded default, {describe()}, in {cache}",
          file=sys.stderr, flush=True)
    return make_model(cache)


def _row(name: str, metrics: dict[str, Any]) -> str:
    return f"{name:<22}" + "".join(f"{(metrics.get(k) or 0):>14.2f}" for k in COMPARED)


def run(args: argparse.Namespace) -> int:
    from ..diagnose import console_report, diagnose, load_run, write_analysis
    from .plans import plan_run

    out: Path = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    model = resolve_model(args.model, out)
    progress = Progress()
    quick = args.quick_test
    progress.stage("generate", "C/M/B cells and a Poisson request workload")
    cells = [ProfilingConfig(C=c, M=2, B=b, block_size=32, num_warmup=1, num_measurements=2, decode_tokens=8)
             for c in ((128,) if quick else (128, 512)) for b in ((4,) if quick else (4, 16))]
    mix = RequestMix(32 if quick else 96, (64, 512), (8, 48), prefix_tokens=64, prefix_share=0.5, seed=7)
    arrival = ArrivalSpec("poisson", rate=args.rate)
    requests = mix.build(arrival, model_vocab_size(str(model)))
    engine: dict[str, Any] = {"block_size": 32, "max_num_seqs": 8, "max_num_batched_tokens": 2048,
                              "enable_prefix_caching": True}

    progress.stage("profile", f"{len(cells)} cell(s), then {len(requests)} requests at {args.rate:g} req/s")
    cell_doc = ProfilingRunner(model, out / "cells", name="cells").run(cells)
    settings = EngineSettings(model=str(model), max_model_len=2048, **engine)
    captured = ProfilingRunner(model, out / "workload", name="workload").run_requests(requests, arrival, settings)
    run_dir = Path(captured["run_dirs"][0])

    progress.stage("analyze", str(run_dir))
    analysis = out / "analysis"
    subprocess.run([sys.executable, "-m", "service_profiler.cli", "analyze", "--input-path", str(run_dir),
                    "--output-path", str(analysis), "--quiet"], check=True)

    progress.stage("diagnose")
    from ..diagnose.command import twin_predictor

    view = load_run(run_dir, workload=Path(captured["workload"]))
    diag = diagnose(view, twin_predictor(analysis, view.engine))
    write_analysis(diag, out)
    from ..diagnose.figure import write_figure

    write_figure(view.batches, diag, out / "vllm_performance_analysis.png")

    progress.stage("plan", f"objective {args.target_optimization}")
    plans = plan_run(analysis, args.target_optimization, out, budget_s=60 if quick else 240, engine=engine)
    top = plans["plans"][0]

    progress.stage("confirm", "the top plan on the real engine, same requests")
    confirm_settings = EngineSettings(model=str(model), max_model_len=2048, **top["settings"])
    confirmed = ProfilingRunner(model, out / "confirm", name="confirm").run_requests(requests, arrival,
                                                                                     confirm_settings)
    report = {"objective": args.target_optimization, "cells": out / "cells" / "cells_results.json",
              "cells_checks_passed": cell_doc["all_checks_passed"], "diagnosis": [v["kind"] for v in diag["verdicts"]],
              "top_plan": top, "captured_measured": captured["metrics"],
              "captured_predicted": plans["captured"]["predicted"], "plan_predicted": top["predicted"],
              "plan_measured": confirmed["metrics"], "wall_s": time.monotonic() - progress.started}
    (out / "workflow_report.json").write_text(json.dumps(report, indent=2, default=str))
    print(console_report(diag))
    print(f"\ntop plan ({args.target_optimization}): vllm serve <model> {' '.join(top['vllm_serve_args'])}")
    if not top["changed_from_captured"]:
        print("(the captured settings are already the best the twin predicts for this workload)")
    print(f"{'':<22}" + "".join(f"{k:>14}" for k in ("tok/s", "TTFT p50", "TTFT p90", "TPOT p50", "E2E p50",
                                                       "preempt")))
    print(_row("captured, measured", captured["metrics"]))
    print(_row("captured, predicted", plans["captured"]["predicted"]))
    print(_row("top plan, predicted", top["predicted"]))
    print(_row("top plan, measured", confirmed["metrics"]))
    print(f"\ncells: {'all checks passed' if cell_doc['all_checks_passed'] else 'CHECKS FAILED'} "
          f"({out / 'cells' / 'cells_results.json'}); outputs in {out} ({report['wall_s']:.0f} s)")
    return 0
