"""Summaries: request_summary.csv, batch_summary.csv (Metric,Average,Max,Min,P50,P90,P99; times in ms),
service_summary.csv (Metric,Value; speeds in token/s), and the console summary.

Percentiles: linear interpolation between the closest ranks (DuckDB's quantile_cont; Hyndman & Fan type 7,
as numpy's default, Excel PERCENTILE.INC and pandas `quantile`). Missing values are left out; a metric
with no values has empty statistics. Batch metrics: prefill_batch_num / prefill_exec_time over batches
with any prefill, decode_batch_num over batches with any decode, decode_exec_time over decode-only ones.
Service throughput: tokens over the served window, first request arrival to last completion.

Latency statistics (request_summary, batch_summary, the percentiles of service_summary) cover complete
rows only (completeness.py: requests and batches only partly observed are left out); service_summary
counts those left out. Token totals and counts cover every row.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from service_profiler.outputs import open_output

from .run import AnalysisRun

REQUEST_METRICS = [
    ("first_token_latency", "ttft_ms"), ("subsequent_token_latency", "tpot_ms"), ("total_time", "e2e_ms"),
    ("exec_time", "(completion_ns - first_scheduled_ns) / 1e6"), ("waiting_time", "queue_ms"),
    ("input_token_num", "input_tokens"), ("generated_token_num", "output_tokens"), ("prefill_ms", "prefill_ms"),
    ("decode_ms", "decode_ms"), ("preemptions", "preemptions"), ("prefix_hit_tokens", "prefix_hit_tokens"),
    ("cache_hit_rate", "cache_hit_rate"), ("kv_blocks", "kv_blocks"), ("num_iterations", "num_iterations"),
]
BATCH_METRICS = [
    ("prefill_batch_num", "num_prefill_reqs", "num_prefill_reqs > 0"),
    ("decode_batch_num", "num_decode_reqs", "num_decode_reqs > 0"),
    ("prefill_exec_time", "model_run_ms", "num_prefill_reqs > 0"),
    ("decode_exec_time", "model_run_ms", "num_prefill_reqs = 0 AND num_decode_reqs > 0"),
    *[(c, c, "true") for c in ("batch_size", "total_scheduled_tokens", "prefill_tokens", "decode_tokens",
                               "schedule_ms", "model_run_ms", "step_ms", "update_ms", "running", "waiting",
                               "kv_usage", "num_preempted")],
]
SUMMARY_COLUMNS = ["Metric", "Average", "Max", "Min", "P50", "P90", "P99"]
_STATS = ("avg(v)", "max(v)", "min(v)", "quantile_cont(v, 0.5)", "quantile_cont(v, 0.9)", "quantile_cont(v, 0.99)")


def _stats(run: AnalysisRun, table: str, metrics: list[tuple[str, str, str]]) -> list[list[Any]]:
    """One query per table: each metric's statistics over its finite values."""
    parts = [f"SELECT {i} AS k, CAST({expr} AS DOUBLE) AS v FROM {table} WHERE {where}"
             for i, (_, expr, where) in enumerate(metrics)]
    stats = ", ".join(f"CAST({s} AS DOUBLE)" for s in _STATS)
    found = {k: rest for k, *rest in run.con.execute(
        f"SELECT k, {stats} FROM ({' UNION ALL '.join(parts)}) WHERE isfinite(v) GROUP BY k").fetchall()}
    return [[name, *found.get(i, [None] * 6)] for i, (name, _, _) in enumerate(metrics)]


def request_stats(run: AnalysisRun) -> list[list[Any]]:
    return _stats(run, "request", [(n, e, "complete = 1") for n, e in REQUEST_METRICS])


def batch_stats(run: AnalysisRun) -> list[list[Any]]:
    return _stats(run, "batch", [(n, e, f"complete = 1 AND {where}") for n, e, where in BATCH_METRICS])


def service_metrics(run: AnalysisRun) -> list[tuple[str, Any]]:
    r = run.con.execute(f"""
        SELECT count(*), coalesce(sum(input_tokens), 0), coalesce(sum(output_tokens), 0),
               (max(completion_ns) - min(arrival_ns)) / 1e9, count(completion_ns), coalesce(sum(preemptions), 0),
               count(*) FILTER (WHERE complete = 1),
               {", ".join(f"quantile_cont({c}, {q}) FILTER (WHERE complete = 1)"
                          for c in ("ttft_ms", "tpot_ms", "e2e_ms") for q in (0.5, 0.99))}
        FROM request""").fetchone()
    b = run.con.execute("""
        SELECT count(*), count(*) FILTER (WHERE batch_type = 'Prefill'), count(*) FILTER (WHERE batch_type = 'Decode'),
               count(*) FILTER (WHERE batch_type = 'Prefill,Decode'), count(*) FILTER (WHERE batch_type = ''),
               avg(batch_size), max(kv_usage), count(*) FILTER (WHERE complete = 0) FROM batch""").fetchone()
    assert r is not None and b is not None
    n, total_in, total_out, window_s, finished, preemptions, whole, *lat = r
    ok = window_s is not None and window_s > 0
    return [
        ("total_input_token_num", int(total_in)), ("total_generated_token_num", int(total_out)),
        ("generate_token_speed", total_out / window_s if ok else None),
        ("generate_all_token_speed", (total_in + total_out) / window_s if ok else None),
        ("request_num", n), ("finished_request_num", finished), ("duration_s", window_s if ok else None),
        ("request_throughput_per_s", finished / window_s if ok else None),
        ("batch_num", b[0]), ("prefill_batch_count", b[1]), ("decode_batch_count", b[2]),
        ("mixed_batch_count", b[3]), ("empty_batch_count", b[4]),
        ("mean_batch_size", b[5]),
        ("ttft_p50_ms", lat[0]), ("ttft_p99_ms", lat[1]), ("tpot_p50_ms", lat[2]), ("tpot_p99_ms", lat[3]),
        ("e2e_p50_ms", lat[4]), ("e2e_p99_ms", lat[5]), ("max_kv_usage", b[6]),
        ("total_preemptions", int(preemptions)), ("process_num", len(run.processes)),
        ("dropped_records", sum(p.dropped for p in run.processes)), ("problem_num", len(run.problems)),
        ("complete_request_num", whole), ("incomplete_request_num", n - whole), ("incomplete_batch_num", b[7]),
        ("processes_not_closed", sum(p.loss.status == "not closed" for p in run.processes)),
    ]


def _write(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    with open_output(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


class SummaryExporter:
    name = "summary"

    def export(self, run: AnalysisRun, out_dir: Path) -> list[Path]:
        return [
            _write(out_dir / "request_summary.csv", SUMMARY_COLUMNS, request_stats(run)),
            _write(out_dir / "batch_summary.csv", SUMMARY_COLUMNS, batch_stats(run)),
            _write(out_dir / "service_summary.csv", ["Metric", "Value"], [list(m) for m in service_metrics(run)]),
        ]


def _fmt(v: Any, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:,.2f}{unit}"
    return f"{v:,}{unit}"


def format_summary(run: AnalysisRun) -> str:
    """A short human summary for the console."""
    svc = dict(service_metrics(run))
    lines = [
        f"requests   {svc['request_num']:,} ({svc['finished_request_num']:,} finished) over "
        f"{_fmt(svc['duration_s'], ' s')}; {_fmt(svc['request_throughput_per_s'], ' req/s')}",
        f"tokens     in {svc['total_input_token_num']:,}  out {svc['total_generated_token_num']:,}  "
        f"output {_fmt(svc['generate_token_speed'], ' tok/s')}  all {_fmt(svc['generate_all_token_speed'], ' tok/s')}",
        f"{'latency ms':<14}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}{'max':>10}",
    ]
    stats = {row[0]: row for row in request_stats(run)}
    for label, metric in (("TTFT", "first_token_latency"), ("TPOT", "subsequent_token_latency"),
                          ("e2e", "total_time"), ("queue", "waiting_time")):
        _, mean, mx, _, p50, p90, p99 = stats[metric]
        lines.append(f"  {label:<12}" + "".join(f"{_fmt(v):>10}" for v in (mean, p50, p90, p99, mx)))
    lines.append(f"batches    {svc['batch_num']:,}: prefill {svc['prefill_batch_count']:,}, decode "
                 f"{svc['decode_batch_count']:,}, mixed {svc['mixed_batch_count']:,}, "
                 f"empty {svc['empty_batch_count']:,}")
    if svc["dropped_records"]:
        lines.append(f"WARNING    {svc['dropped_records']:,} records were dropped by the bounded buffer")
    return "\n".join(lines + completeness_lines(run))


def completeness_lines(run: AnalysisRun) -> list[str]:
    """Partly observed requests and batches, and each process that did not close cleanly or lost records."""
    lines = []
    for label, table in (("requests", "request"), ("batches", "batch")):
        row = run.con.execute(f"SELECT count(*), count(*) FILTER (WHERE complete = 0) FROM {table}").fetchone()
        total, left = row if row else (0, 0)
        if left:
            counts = run.con.execute(f"""
                SELECT why, count(*) AS n FROM (SELECT unnest(string_split(incomplete_reason, ';')) AS why
                                               FROM {table} WHERE complete = 0)
                GROUP BY why ORDER BY n DESC, why""").fetchall()
            why = ", ".join(f"{k} {v:,}" for k, v in counts)
            lines.append(f"PARTIAL    {left:,} of {total:,} {label} only partly observed, left out of the "
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
