"""The twin's fidelity and speed, against real vLLM CPU runs of the tiny model.

    python benchmarks/bench_twin.py [--requests 40] [--repeats 3] [--out DIR] [--served] [--speed-only]

Fidelity: for each of four configurations that differ from a base in max_num_seqs, max_num_batched_tokens,
long_prefill_token_threshold and prefix caching, `--repeats` pairs of real runs back to back (capture the
base, run the target, predict the target from that capture) on the same workload; prints p50 TTFT, p50
TPOT, p99 TTFT and output throughput: the twin's median prediction, the real median, the real spread
(min..max), the error against the median and the median per-pair error.
Speed: simulated steps/s (model step times), a 1,000-request replay, a 100-config sweep over it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service_profiler.twin import Twin

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "examples"))

BASE: dict[str, Any] = {"max_num_seqs": 8, "max_num_batched_tokens": 256, "async_scheduling": False,
                        "enable_prefix_caching": True, "max_model_len": 1024, "block_size": 32}
TARGETS: dict[str, dict[str, Any]] = {
    "max_num_seqs=4": {"max_num_seqs": 4},
    "max_num_batched_tokens=512": {"max_num_batched_tokens": 512},
    "long_prefill_token_threshold=64": {"long_prefill_token_threshold": 64},
    "no_prefix_caching": {"enable_prefix_caching": False},
}
# targets whose change touches the decode steps themselves: their speed ratio would take the change for drift
NOT_SCALED = {"no_prefix_caching"}  # caching costs host time per request per step
KEYS = ("ttft_ms_p50", "tpot_ms_p50", "ttft_ms_p99", "output_throughput_tok_s")


def _real_metrics(run: Twin) -> dict[str, float]:
    metrics = run.captured_metrics
    assert metrics is not None
    return {k: float(metrics[k]) for k in KEYS}


def _scaled_error(key: str, predictions: list[dict[str, float]], ratios: list[float], reals: list[dict[str, float]]
                  ) -> float | None:
    """The median over pairs of each prediction's error against its pair's real run, after scaling it by
    the machine's speed in that run over its base capture (`twin_engine_run.paired_errors`): what is left
    when the machine's drift between runs is taken out, as `tests/test_twin_fidelity.py` bounds it."""
    from twin_engine_run import paired_errors

    if any(r != r for r in ratios) or not all(real[key] for real in reals):  # NaN: no comparable decode steps
        return None
    return statistics.median(paired_errors(key, predictions, ratios, reals)) * 100.0


def fidelity(out: Path, n: int, repeats: int, rate: float, targets: list[str], served: bool = False
             ) -> list[dict[str, object]]:
    """For each target config, `repeats` pairs run back to back: capture the base config, run the target,
    predict the target from that pair's base capture (a shared machine's load drifts within minutes: a
    base captured at another moment describes another machine). Reports the median prediction against
    the median real run, the real runs' spread, and the median of the per-pair errors."""
    from tiny_model import make_model
    from twin_engine_run import capture, speed_ratio, workload

    from service_profiler.twin import Twin

    model = make_model(out / "model")
    requests = workload(n, rate, shared_prefix=128)
    rows = []
    for name in targets:
        change = TARGETS[name]
        predictions, reals, bases, ratios = [], [], [], []
        for i in range(repeats):
            base_dir = capture(model, out / name / f"base-{i}", requests, BASE, served=served)
            real_dir = capture(model, out / name / f"real-{i}", requests, {**BASE, **change}, served=served)
            twin, real_run = Twin.from_run(base_dir), Twin.from_run(real_dir)
            predictions.append({k: float(twin.run(change).metrics[k]) for k in KEYS})
            try:  # the machine's speed in the target run over its speed in the base capture
                ratios.append(float("nan") if name in NOT_SCALED else speed_ratio(twin, real_run))
            except ValueError:
                ratios.append(float("nan"))
            bases.append(_real_metrics(twin))
            reals.append(_real_metrics(real_run))
            held_out = {regime: (r["n"], r["mape_pct"] and round(r["mape_pct"], 1))
                        for regime, r in twin.step_model.v2.metrics.get("test_scaled", {}).items()}
            print(f"{name} pair {i}: step model {twin.step_model.use}, held-out (n, MAPE %) by regime "
                  f"{json.dumps(held_out)}", flush=True)
        for key in KEYS:
            values = [r[key] for r in reals]
            median = statistics.median(values)
            pred = statistics.median(p[key] for p in predictions)
            pair_errors = [(p[key] - r[key]) / r[key] * 100.0
                           for p, r in zip(predictions, reals, strict=True) if r[key]]
            rows.append({"config": name, "metric": key, "predicted": pred, "real_median": median,
                         "real_min": min(values), "real_max": max(values),
                         "error_pct": (pred - median) / median * 100.0 if median else None,
                         "spread_pct": (max(values) - min(values)) / median * 100.0 if median else None,
                         "pair_error_median_pct": statistics.median(pair_errors) if pair_errors else None,
                         # each prediction scaled by its pair's speed ratio, against its pair's real run
                         "scaled_error_pct": _scaled_error(key, predictions, ratios, reals),
                         "speed_ratios": [round(r, 3) for r in ratios],
                         "base_captured_median": statistics.median(b[key] for b in bases)})
        print(json.dumps(rows[-len(KEYS):]), flush=True)
    return rows


def speed(sweep_configs: int = 100, workers: int = 2) -> dict[str, object]:
    from service_profiler.model.step_model import StepModelV2
    from service_profiler.twin import TraceRequest, Twin
    from service_profiler.twin.twin import StepTimeModel

    model = StepTimeModel(StepModelV2({"c_0": 2.0, "c_req": 0.05, "c_p": 0.02, "c_d": 0.01, "c_pc": 1e-6,
                                       "c_dc": 1e-5}))
    requests = [TraceRequest(rid=f"r{i}", arrival_s=i * 0.05, prompt_tokens=64 + (i * 37) % 400,
                             output_tokens=8 + (i * 13) % 120) for i in range(1000)]
    settings = {"max_num_seqs": 32, "max_num_batched_tokens": 1024, "max_model_len": 2048, "block_size": 32,
                "pool_blocks": 4000, "enable_prefix_caching": True}
    twin = Twin.from_trace(requests, base_settings=settings, step_model=model)
    twin.run({})  # imports and first-call costs
    wall, cpu = time.perf_counter(), time.process_time()
    pred = twin.run({})
    replay_wall, replay_cpu = time.perf_counter() - wall, time.process_time() - cpu
    steps = len(pred.batches)
    configs = [(f"c{i}", {"max_num_seqs": 8 + (i % 10) * 8, "max_num_batched_tokens": 512 + (i // 10) * 256})
               for i in range(sweep_configs)]
    import resource

    wall, parent = time.perf_counter(), time.process_time()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    twin.sweep(configs, workers=workers)
    sweep_wall, sweep_parent_cpu = time.perf_counter() - wall, time.process_time() - parent
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    sweep_cpu = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    # CPU seconds are what one core spends; wall seconds depend on what else runs on the machine.
    return {"replay_1000_wall_s": round(replay_wall, 3), "replay_1000_cpu_s": round(replay_cpu, 3), "steps": steps,
            "steps_per_cpu_s": round(steps / replay_cpu), "steps_per_wall_s": round(steps / replay_wall),
            f"sweep_{sweep_configs}_wall_s": round(sweep_wall, 1), f"sweep_{sweep_configs}_cpu_s": round(sweep_cpu, 1),
            # this process's share: setting up the workers and unpickling their results
            f"sweep_{sweep_configs}_parent_cpu_s": round(sweep_parent_cpu, 1), "sweep_workers": workers,
            "load_avg_1m": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--rate", type=float, default=6.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--speed-only", action="store_true", help="only the speed figures")
    parser.add_argument("--served", action="store_true",
                        help="run the engine as `vllm serve` does (AsyncLLM, EngineCore in its own process): a request "
                             "arriving during a step waits for it, as a client's does")
    parser.add_argument("--sweep-configs", type=int, default=100)
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of {', '.join(TARGETS)}")
    args = parser.parse_args()
    if args.speed_only:
        print(json.dumps(speed(args.sweep_configs)), flush=True)
        return
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-twin-"))
    rows = fidelity(out, args.requests, args.repeats, args.rate, args.targets.split(","), args.served)
    print(f"{'config':34} {'metric':24} {'twin':>10} {'real med':>10} {'real min..max':>22} {'err %':>7} "
          f"{'spread %':>8} {'pair err %':>10} {'scaled err %':>12}")
    for r in rows:
        print(f"{r['config']:34} {r['metric']:24} {r['predicted']:10.2f} {r['real_median']:10.2f} "
              f"{r['real_min']:10.2f}..{r['real_max']:<10.2f} {r['error_pct']:7.1f} {r['spread_pct']:8.1f} "
              f"{r['pair_error_median_pct']:10.1f} "
              f"{r['scaled_error_pct'] if r['scaled_error_pct'] is None else round(r['scaled_error_pct'], 1):>12}")


if __name__ == "__main__":
    main()
