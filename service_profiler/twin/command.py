"""`service-profiler twin`: predict a captured workload under other engine settings.

    service-profiler twin --run OUT --engine-args '--max-num-seqs 64' --output-path what-if
    service-profiler twin --run OUT --sweep sweep.yaml --output-path sweep
    service-profiler twin --run OUT --step-times measured --output-path parity
    service-profiler twin --run OUT --trace other.jsonl [--trace-format azure|burstgpt|mooncake] ...
    service-profiler twin --run OUT --write-trace w.jsonl [--export-vllm-bench b.jsonl]

sweep.yaml: `configs:` a list of {name, engine_args} (engine_args: a string of `vllm serve` args or a
mapping of EngineArgs fields), and/or `grid:` a mapping of EngineArgs field -> list of values (every
combination is one config).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

from .capture import CaptureError
from .engine_config import EngineArgsError
from .formats import IMPORTERS, export_vllm_bench
from .prediction import Prediction
from .trace import TraceError, read_trace, write_trace
from .twin import Twin

COMPARED = ("ttft_ms_p50", "ttft_ms_p90", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p90", "tpot_ms_p99", "e2e_ms_p50",
            "e2e_ms_p90", "e2e_ms_p99", "output_throughput_tok_s", "preemptions")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, type=Path, help="output directory of `service-profiler analyze`")
    parser.add_argument("--engine-args", default="", help="vllm serve arguments to predict, e.g. '--max-num-seqs 64'")
    parser.add_argument("--output-path", type=Path, help="where request.csv, batch.csv, prediction.json go")
    parser.add_argument("--step-times", choices=("model", "measured"), default="model",
                        help="fitted step-time model (default) or the captured run's own step durations")
    parser.add_argument("--sweep", type=Path, help="YAML of configs and/or a grid to predict in one go")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes for --sweep (default: one per CPU)")
    parser.add_argument("--trace", type=Path, help="replay this workload instead of the captured one")
    parser.add_argument("--trace-format", choices=("twin", *IMPORTERS), default="twin",
                        help="format of --trace (default: the twin's JSONL)")
    parser.add_argument("--write-trace", type=Path, help="also write the workload as a twin trace (JSONL)")
    parser.add_argument("--export-vllm-bench", type=Path,
                        help="also write the workload as a `vllm bench serve` timed_trace dataset (JSONL)")


def comparison_table(prediction: Prediction) -> list[dict[str, Any]]:
    """Metric, captured, predicted, error % rows (captured empty for another workload)."""
    rows = []
    captured = prediction.captured_metrics or {}
    for key in COMPARED:
        real, pred = captured.get(key), prediction.metrics.get(key)
        err = (pred - real) / real * 100.0 if isinstance(real, (int, float)) and real and pred is not None else None
        rows.append({"metric": key, "captured": real, "predicted": pred,
                     "error_pct": round(err, 2) if err is not None else None})
    return rows


def _format(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def print_table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    widths = [max(len(c), *(len(_format(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in rows:
        print("  ".join(_format(r.get(c)).ljust(w) for c, w in zip(columns, widths, strict=True)))


def sweep_configs(path: Path) -> list[tuple[str, Any]]:
    """(name, engine_args) for each config of a sweep file; raises ValueError naming the key at fault."""
    import yaml

    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such sweep file") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(doc, dict) or not ({"configs", "grid"} & set(doc)):
        raise ValueError(f"{path}: expected a mapping with 'configs' (a list) and/or 'grid' (a mapping)")
    out: list[tuple[str, Any]] = []
    for i, item in enumerate(doc.get("configs") or []):
        if not isinstance(item, dict) or "engine_args" not in item:
            raise ValueError(f"{path}: configs[{i}] needs 'engine_args' (a string or a mapping)")
        out.append((str(item.get("name") or f"config-{i}"), item["engine_args"]))
    grid = doc.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ValueError(f"{path}: 'grid' must map EngineArgs fields to non-empty lists of values")
    keys = sorted(grid)
    for values in itertools.product(*(grid[k] for k in keys)) if keys else ():
        fields = dict(zip(keys, values, strict=True))
        out.append(("-".join(f"{k}={v}" for k, v in fields.items()), fields))
    return out


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (CaptureError, EngineArgsError, TraceError, ValueError) as exc:
        print(f"service-profiler twin: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    twin = Twin.from_run(args.run)
    if args.trace is not None:
        reader = read_trace if args.trace_format == "twin" else IMPORTERS[args.trace_format]
        twin = twin.with_requests(reader(args.trace))
    if args.write_trace:
        print(f"trace: {write_trace(twin.requests, args.write_trace)}")
    if args.export_vllm_bench:
        block = next((r.hash_block for r in twin.requests if r.hash_block), 16)
        print(f"vllm bench dataset: {export_vllm_bench(twin.requests, args.export_vllm_bench)} "
              f"(--dataset-name timed_trace --timed-trace-chunk-hash-size {block})")
    for note in twin.notes:
        print(f"note: {note}")
    if args.sweep is not None:
        return _sweep(twin, args)
    if args.output_path is None:
        if args.write_trace or args.export_vllm_bench:
            return 0
        raise ValueError("--output-path is required to write a prediction")
    prediction = twin.run(args.engine_args, step_times=args.step_times)
    prediction.write(args.output_path)
    rows = comparison_table(prediction)
    (args.output_path / "comparison.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    print(f"step times: {prediction.step_times}; settings: {json.dumps(prediction.settings, sort_keys=True)}")
    print_table(rows, ("metric", "captured", "predicted", "error_pct"))
    print(f"wrote {args.output_path}")
    return 0


def _sweep(twin: Twin, args: argparse.Namespace) -> int:
    if args.output_path is None:
        raise ValueError("--output-path is required with --sweep")
    configs = sweep_configs(args.sweep)
    table = []
    for name, prediction in twin.sweep(configs, step_times=args.step_times, workers=args.workers):
        prediction.write(args.output_path / _safe(name))
        table.append({"config": name, **{k: prediction.metrics.get(k) for k in COMPARED}})
    if twin.captured_metrics is not None:
        table.insert(0, {"config": "(captured run)", **{k: twin.captured_metrics.get(k) for k in COMPARED}})
    import csv

    with (args.output_path / "sweep.csv").open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["config", *COMPARED], lineterminator="\n")
        writer.writeheader()
        writer.writerows(table)
    print_table(table, ("config", "ttft_ms_p50", "tpot_ms_p50", "e2e_ms_p50", "output_throughput_tok_s",
                        "preemptions"))
    print(f"wrote {args.output_path / 'sweep.csv'}")
    return 0


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_=." else "_" for c in name)[:120] or "config"
