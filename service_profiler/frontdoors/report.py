"""`service-profiler scheduler-report PATH [-o DIR]`: the front doors' analysis in one command.

- PATH a scheduler-profiling JSONL: basic statistics (batches; schedule time average / max / min / P95;
  model run time; average prefill / decode requests; average chunk sizes) and six charts: schedule vs
  model run time per batch, prefill vs decode requests per batch, scheduled tokens per batch, histograms
  of schedule and model run time, schedule vs model run time scatter.
- PATH a scheduler-logging directory (per_request.csv, per_iteration.csv, ...): TTFT and TPOT
  percentiles, preemption rate, KV cache utilisation, and the TTFT histogram, batch size and KV cache
  utilisation over iterations.
Statistics go to stdout and `DIR/summary.txt`; charts are PNGs in DIR (default: `<PATH>_report`).
A malformed line or row costs only itself and is reported with its line number.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service_profiler.figures import save_figure
from service_profiler.outputs import output_dir, write_output_text

EXIT_BAD_INPUT = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="a scheduler-profiling JSONL, or a scheduler-logging directory")
    parser.add_argument("-o", "--output", type=Path, metavar="DIR", help="directory for summary.txt and the PNGs")


def read_jsonl(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{path}:{number}: not JSON ({exc.msg}); line skipped")
                continue
            if not isinstance(row, dict):
                problems.append(f"{path}:{number}: not a JSON object; line skipped")
                continue
            rows.append(row)
    return rows


def _number(value: Any) -> float:
    """A finite number, or NaN for anything else (null, text that is no number, NaN, an infinity, a
    number too large for a float)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return math.nan
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            return math.nan
        return number if math.isfinite(number) else math.nan
    return math.nan


def column(rows: Sequence[dict[str, Any]], name: str) -> np.ndarray:
    """Numbers of one field; missing, null, non-numeric or non-finite values are NaN."""
    return np.array([_number(row.get(name)) for row in rows], dtype=float)


def _chunks(rows: Sequence[dict[str, Any]], name: str) -> list[float]:
    """The finite numbers of a list field over every row (a field that is not a list holds none)."""
    found = (_number(c) for row in rows if isinstance(row.get(name), list) for c in row[name])
    return [c for c in found if not math.isnan(c)]


def _stat(values: np.ndarray, fn: Callable[[np.ndarray], Any]) -> float:
    finite = values[np.isfinite(values)]
    return float(fn(finite)) if finite.size else math.nan


def _fmt(value: float, unit: str = "") -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}{unit}"


def profiling_summary(rows: Sequence[dict[str, Any]]) -> list[str]:
    sched, model = column(rows, "schedule_duration_ms"), column(rows, "model_run_duration_ms")
    prefill_chunks, decode_chunks = _chunks(rows, "prefill_chunk_sizes"), _chunks(rows, "decode_chunk_sizes")
    return [
        f"batches: {len(rows)}",
        f"schedule time: avg {_fmt(_stat(sched, np.mean), ' ms')}, max {_fmt(_stat(sched, np.max), ' ms')}, "
        f"min {_fmt(_stat(sched, np.min), ' ms')}, P95 {_fmt(_stat(sched, lambda v: np.percentile(v, 95)), ' ms')}",
        f"model run time: avg {_fmt(_stat(model, np.mean), ' ms')}, "
        f"P95 {_fmt(_stat(model, lambda v: np.percentile(v, 95)), ' ms')}",
        f"prefill requests per batch: avg {_fmt(_stat(column(rows, 'num_prefill_reqs'), np.mean))}",
        f"decode requests per batch: avg {_fmt(_stat(column(rows, 'num_decode_reqs'), np.mean))}",
        f"prefill chunk size: avg {_fmt(float(np.mean(prefill_chunks)) if prefill_chunks else math.nan)} tokens",
        f"decode chunk size: avg {_fmt(float(np.mean(decode_chunks)) if decode_chunks else math.nan)} tokens",
    ]


def _figure(title: str, xlabel: str, ylabel: str) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 5), dpi=100)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _save(fig: Any, path: Path, written: list[Path]) -> None:
    fig.tight_layout()
    written.append(save_figure(fig, path, margins_in=None))  # a new file moved onto its name: no link followed


def _hist(values: np.ndarray, title: str, xlabel: str, path: Path, written: list[Path]) -> None:
    fig, ax = _figure(title, xlabel, "batches")
    finite = values[np.isfinite(values)]
    if finite.size:
        ax.hist(finite, bins=50, edgecolor="black")
    _save(fig, path, written)


def profiling_charts(rows: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    written: list[Path] = []
    batch = column(rows, "batch_id")
    sched, model = column(rows, "schedule_duration_ms"), column(rows, "model_run_duration_ms")
    fig, ax = _figure("Schedule time vs model run time", "batch", "ms")
    ax.plot(batch, sched, label="schedule", linewidth=0.8)
    ax.plot(batch, model, label="model run", linewidth=0.8)
    ax.legend()
    _save(fig, out / "schedule_vs_model_run_trend.png", written)
    fig, ax = _figure("Prefill vs decode requests per batch", "batch", "requests")
    prefill, decode = np.nan_to_num(column(rows, "num_prefill_reqs")), np.nan_to_num(column(rows, "num_decode_reqs"))
    ax.bar(batch, prefill, width=1.0, label="prefill")
    ax.bar(batch, decode, width=1.0, bottom=prefill, label="decode")
    ax.legend()
    _save(fig, out / "prefill_vs_decode_requests.png", written)
    fig, ax = _figure("Scheduled tokens per batch", "batch", "tokens")
    ax.plot(batch, column(rows, "total_scheduled_tokens"), linewidth=0.8)
    _save(fig, out / "total_tokens_trend.png", written)
    _hist(sched, "Schedule time distribution", "schedule time (ms)", out / "schedule_time_hist.png", written)
    _hist(model, "Model run time distribution", "model run time (ms)", out / "model_run_time_hist.png", written)
    fig, ax = _figure("Schedule time vs model run time", "schedule time (ms)", "model run time (ms)")
    ax.scatter(sched, model, s=6, alpha=0.6)
    _save(fig, out / "schedule_vs_model_run_scatter.png", written)
    return written


def read_csv_rows(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    if not path.is_file():
        problems.append(f"{path}: missing")
        return []
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8", errors="replace", newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            rows.extend(reader)
        except csv.Error as exc:  # e.g. a field past the csv module's size limit: the rows before it stand
            problems.append(f"{path}:{reader.line_num}: {exc}; the rest of the file skipped")
    return rows


def _kv_utilization(iterations: Sequence[dict[str, Any]]) -> np.ndarray:
    """Used over total KV cache blocks per iteration; NaN where the total is not a positive number."""
    used, total = column(iterations, "kv_cache_used"), column(iterations, "kv_cache_total")
    return np.divide(used, total, out=np.full(len(iterations), np.nan), where=total > 0)


def logging_summary(requests: Sequence[dict[str, Any]], iterations: Sequence[dict[str, Any]]) -> list[str]:
    ttft, tpot = column(requests, "ttft") / 1e9, column(requests, "tpot") / 1e9
    preempted = column(requests, "preemption_count")
    util = _kv_utilization(iterations)
    lines = [f"requests: {len(requests)}, iterations: {len(iterations)}"]
    for q in (50, 90, 99):
        lines.append(f"P{q} TTFT: {_fmt(_stat(ttft, functools.partial(np.percentile, q=q)), ' s')}")
    lines += [f"average TTFT: {_fmt(_stat(ttft, np.mean), ' s')}",
              f"average TPOT: {_fmt(_stat(tpot, np.mean), ' s')}",
              f"preemption rate: {_fmt(_stat(preempted, lambda v: np.mean(v > 0) * 100), ' %')}",
              f"average KV cache utilization: {_fmt(_stat(util, np.mean) * 100, ' %')}"]
    return lines


def logging_charts(requests: Sequence[dict[str, Any]], iterations: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    written: list[Path] = []
    _hist(column(requests, "ttft") / 1e9, "Time To First Token Distribution", "TTFT (seconds)",
          out / "ttft_distribution.png", written)
    iteration = column(iterations, "iteration_id")
    fig, ax = _figure("Batch Size Over Time", "Iteration", "Batch Size")
    ax.plot(iteration, column(iterations, "batch_size"), linewidth=0.8)
    _save(fig, out / "batch_size_over_time.png", written)
    fig, ax = _figure("KV Cache Utilization Over Time", "Iteration", "KV Cache Utilization (%)")
    ax.plot(iteration, _kv_utilization(iterations) * 100, linewidth=0.8)
    _save(fig, out / "kv_cache_utilization.png", written)
    return written


def run(args: argparse.Namespace) -> int:
    path: Path = args.path
    problems: list[str] = []
    if path.is_dir():
        requests = read_csv_rows(path / "per_request.csv", problems)
        iterations = read_csv_rows(path / "per_iteration.csv", problems)
        if not (path / "per_iteration.csv").is_file():
            print(f"error: {path} has no per_iteration.csv: give a scheduler-logging directory "
                  "(VLLM_SCHEDULER_LOG_DIR) or a scheduler-profiling JSONL", file=sys.stderr)
            return EXIT_BAD_INPUT
        summary = logging_summary(requests, iterations)
        def draw(out: Path) -> list[Path]:
            return logging_charts(requests, iterations, out)
    elif path.is_file():
        rows = read_jsonl(path, problems)
        if not rows:
            print(f"error: {path} has no scheduler-profiling lines", file=sys.stderr)
            for problem in problems[:20]:
                print(f"  {problem}", file=sys.stderr)
            return EXIT_BAD_INPUT
        summary = profiling_summary(rows)
        def draw(out: Path) -> list[Path]:
            return profiling_charts(rows, out)
    else:
        print(f"error: {path} does not exist", file=sys.stderr)
        return EXIT_BAD_INPUT
    out = output_dir(args.output or path.with_name(path.name.replace(".", "_") + "_report"))
    write_output_text(out / "summary.txt", "\n".join(summary) + "\n")
    print("\n".join(summary))
    written = draw(out)
    print(f"wrote summary.txt and {len(written)} chart(s) to {out}")
    for problem in problems[:20]:
        print(f"warning: {problem}", file=sys.stderr)
    return 0
