"""Summary statistics shared by the summary CSVs and the console summary.

Percentiles: `numpy.percentile` with its default method, linear interpolation between the closest
ranks (Hyndman & Fan type 7; the same as Excel PERCENTILE.INC and pandas `quantile`). Missing values
(NaN) are left out; a metric with no values has empty statistics.

Which rows a batch metric covers:
  - prefill_batch_num: the number of prefill requests, over batches that contain any prefill;
  - decode_batch_num: the number of decode requests, over batches that contain any decode;
  - prefill_exec_time / decode_exec_time: model_run_ms over batches with any prefill / decode only.
Every batch counts, identical ones included.

Service throughput: tokens over the served window, first request arrival to last completion.

Latency statistics (request_summary, batch_summary, the percentiles of service_summary) cover complete
rows only (`completeness`: requests and batches only partly observed are left out); service_summary
counts those left out (incomplete_request_num, incomplete_batch_num). Token totals and counts cover
every row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service_profiler.rawdata.rawfile import RunData

from .completeness import complete_mask, reason_counts
from .tables import AnalysisTables, Table


@dataclass
class Stats:
    count: int
    mean: float
    max: float
    min: float
    p50: float
    p90: float
    p99: float


def describe(values: np.ndarray | Sequence[float]) -> Stats:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        nan = math.nan
        return Stats(0, nan, nan, nan, nan, nan, nan)
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return Stats(int(arr.size), float(arr.mean()), float(arr.max()), float(arr.min()), float(p50), float(p90),
                 float(p99))


def complete_rows(table: Table) -> Table:
    """The table's complete rows (see completeness.py)."""
    mask = complete_mask(table)
    if all(mask):
        return table
    return Table(table.name, table.columns, [r for r, ok in zip(table.rows, mask, strict=True) if ok])


def request_metrics(tables: AnalysisTables) -> list[tuple[str, np.ndarray]]:
    """(metric, values): msserviceprofiler's request_summary rows first (ms / tokens), then ours; complete
    requests only."""
    r = complete_rows(tables.requests)
    exec_ms = (r.column("completion_ns") - r.column("first_scheduled_ns")) / 1e6
    return [
        ("first_token_latency", r.column("ttft_ms")),
        ("subsequent_token_latency", r.column("tpot_ms")),
        ("total_time", r.column("e2e_ms")),
        ("exec_time", exec_ms),
        ("waiting_time", r.column("queue_ms")),
        ("input_token_num", r.column("input_tokens")),
        ("generated_token_num", r.column("output_tokens")),
        ("prefill_ms", r.column("prefill_ms")),
        ("decode_ms", r.column("decode_ms")),
        ("preemptions", r.column("preemptions")),
        ("prefix_hit_tokens", r.column("prefix_hit_tokens")),
        ("cache_hit_rate", r.column("cache_hit_rate")),
        ("kv_blocks", r.column("kv_blocks")),
        ("num_iterations", r.column("num_iterations")),
    ]


def batch_metrics(tables: AnalysisTables) -> list[tuple[str, np.ndarray]]:
    b = complete_rows(tables.batches)
    n_pf, n_dc = b.column("num_prefill_reqs"), b.column("num_decode_reqs")
    model = b.column("model_run_ms")
    has_pf = n_pf > 0
    decode_only = (n_pf == 0) & (n_dc > 0)
    return [
        ("prefill_batch_num", n_pf[has_pf]),
        ("decode_batch_num", n_dc[n_dc > 0]),
        ("prefill_exec_time", model[has_pf]),
        ("decode_exec_time", model[decode_only]),
        ("batch_size", b.column("batch_size")),
        ("total_scheduled_tokens", b.column("total_scheduled_tokens")),
        ("prefill_tokens", b.column("prefill_tokens")),
        ("decode_tokens", b.column("decode_tokens")),
        ("schedule_ms", b.column("schedule_ms")),
        ("model_run_ms", model),
        ("step_ms", b.column("step_ms")),
        ("update_ms", b.column("update_ms")),
        ("running", b.column("running")),
        ("waiting", b.column("waiting")),
        ("kv_usage", b.column("kv_usage")),
        ("num_preempted", b.column("num_preempted")),
    ]


def service_metrics(run: RunData, tables: AnalysisTables) -> list[tuple[str, Any]]:
    """(metric, value): msserviceprofiler's service_summary rows first, then ours."""
    r, b = tables.requests, tables.batches
    inp, out = r.column("input_tokens"), r.column("output_tokens")
    arrival, completion = r.column("arrival_ns"), r.column("completion_ns")
    total_in = float(np.nansum(inp)) if len(r) else 0.0
    total_out = float(np.nansum(out)) if len(r) else 0.0
    window_s = math.nan
    if len(r) and not np.all(np.isnan(arrival)) and not np.all(np.isnan(completion)):
        window_s = (np.nanmax(completion) - np.nanmin(arrival)) / 1e9
    ok = window_s > 0
    btype = b.values("batch_type")
    finished = int(np.count_nonzero(~np.isnan(completion))) if len(r) else 0
    whole = complete_rows(r)
    ttft, tpot, e2e = (describe(whole.column(c)) if len(whole) else describe([])
                       for c in ("ttft_ms", "tpot_ms", "e2e_ms"))
    return [
        ("total_input_token_num", int(total_in)),
        ("total_generated_token_num", int(total_out)),
        ("generate_token_speed", total_out / window_s if ok else None),
        ("generate_all_token_speed", (total_in + total_out) / window_s if ok else None),
        ("request_num", len(r)),
        ("finished_request_num", finished),
        ("duration_s", window_s if ok else None),
        ("request_throughput_per_s", finished / window_s if ok else None),
        ("batch_num", len(b)),
        ("prefill_batch_count", btype.count("Prefill")),
        ("decode_batch_count", btype.count("Decode")),
        ("mixed_batch_count", btype.count("Prefill,Decode")),
        ("empty_batch_count", btype.count("")),  # steps that scheduled nothing (still recorded)
        ("mean_batch_size", describe(b.column("batch_size")).mean if len(b) else None),
        ("ttft_p50_ms", ttft.p50), ("ttft_p99_ms", ttft.p99),
        ("tpot_p50_ms", tpot.p50), ("tpot_p99_ms", tpot.p99),
        ("e2e_p50_ms", e2e.p50), ("e2e_p99_ms", e2e.p99),
        ("max_kv_usage", describe(b.column("kv_usage")).max if len(b) else None),
        ("total_preemptions", int(np.nansum(r.column("preemptions"))) if len(r) else 0),
        ("process_num", len(run.processes)),
        ("dropped_records", sum(p.dropped for p in run.processes)),
        ("problem_num", len(run.problems)),
        ("complete_request_num", len(whole)),
        ("incomplete_request_num", len(r) - len(whole)),
        ("incomplete_batch_num", len(b) - sum(complete_mask(b))),
        ("processes_not_closed", sum(p.loss.status == "not closed" for p in run.processes)),
    ]


def _fmt(v: Any, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:,.2f}{unit}"
    return f"{v:,}{unit}"


def format_summary(run: RunData, tables: AnalysisTables) -> str:
    """A short human summary for the console."""
    svc = dict(service_metrics(run, tables))
    lines = [
        f"requests   {svc['request_num']:,} ({svc['finished_request_num']:,} finished) over "
        f"{_fmt(svc['duration_s'], ' s')}; {_fmt(svc['request_throughput_per_s'], ' req/s')}",
        f"tokens     in {svc['total_input_token_num']:,}  out {svc['total_generated_token_num']:,}  "
        f"output {_fmt(svc['generate_token_speed'], ' tok/s')}  all {_fmt(svc['generate_all_token_speed'], ' tok/s')}",
    ]
    r = complete_rows(tables.requests)
    lines.append(f"{'latency ms':<14}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}{'max':>10}")
    for label, col in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("e2e", "e2e_ms"), ("queue", "queue_ms")):
        s = describe(r.column(col)) if len(r) else describe([])
        lines.append(f"  {label:<12}" + "".join(f"{_fmt(v):>10}" for v in (s.mean, s.p50, s.p90, s.p99, s.max)))
    b = tables.batches
    bs = describe(b.column("batch_size")) if len(b) else describe([])
    mr = describe(b.column("model_run_ms")) if len(b) else describe([])
    lines.append(
        f"batches    {len(b):,}: prefill {svc['prefill_batch_count']:,}, decode {svc['decode_batch_count']:,}, "
        f"mixed {svc['mixed_batch_count']:,}, empty {svc['empty_batch_count']:,}; size mean {_fmt(bs.mean)} "
        f"max {_fmt(bs.max)}; "
        f"model run p50 {_fmt(mr.p50, ' ms')} p99 {_fmt(mr.p99, ' ms')}")
    kv = describe(b.column("kv_usage")) if len(b) else describe([])
    lines.append(f"KV cache   usage mean {_fmt(kv.mean * 100, '%')} max {_fmt(kv.max * 100, '%')}; "
                 f"preemptions {svc['total_preemptions']:,}")
    if svc["dropped_records"]:
        lines.append(f"WARNING    {svc['dropped_records']:,} records were dropped by the bounded buffer")
    lines += completeness_lines(run, tables)
    return "\n".join(lines)


def completeness_lines(run: RunData, tables: AnalysisTables) -> list[str]:
    """Partly observed requests and batches, and each process that did not close cleanly or lost records."""
    lines = []
    for label, table in (("requests", tables.requests), ("batches", tables.batches)):
        left = len(table) - sum(complete_mask(table))
        if left:
            why = ", ".join(f"{k} {v:,}" for k, v in sorted(reason_counts(table).items(), key=lambda kv: -kv[1]))
            lines.append(f"PARTIAL    {left:,} of {len(table):,} {label} only partly observed, left out of the "
                         f"latency statistics ({why}; column incomplete_reason)")
    unknown = 0
    for p in run.processes:
        loss = p.loss
        unknown += loss.status == "unknown"
        gaps = loss.all_gaps()
        if loss.status == "not closed" or gaps:
            state = {"closed": "closed cleanly", "not closed": "NOT CLOSED (no final flush)",
                     "unknown": "closing unknown"}[loss.status]
            lost = sum(g.count or 0 for g in gaps)
            lines.append(f"LOSS       {p.key}: {state}; {len(gaps)} time range(s) missing or uncertain"
                         + (f", {lost:,} records known lost" if lost else "") + " (see `service-profiler inspect`)")
    if unknown:
        lines.append(f"note       {unknown} raw file(s) have no completeness markers (older profiler): whether "
                     "their processes closed cleanly is unknown")
    return lines
