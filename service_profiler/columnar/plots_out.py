"""PNG plots of the batch and request tables: queried here, drawn by matplotlib (`plots_draw`).

Every plot reads an aggregate from DuckDB, never a whole column: a series longer than LINE_BUCKETS
points is drawn as the per-bucket mean with a min-max band (one polygon renders fast and keeps every
spike visible), a histogram is counted by the engine, a scatter is a fixed-size sample. So drawing
costs the same on a long run as on a short one. A plot whose data is missing is skipped with a note.
The drawing runs in the figure process when `analyze` started one (`figure_process`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from service_profiler.outputs import output_dir

from .figure_process import FigureProcess, submit
from .plots_draw import Histogram, Lines, Plot, Scatter, Series, draw_plots

if TYPE_CHECKING:
    from .run import AnalysisRun

LINE_BUCKETS = 2_000
HIST_BINS = 60
MAX_SCATTER_POINTS = 20_000


def _series(run: AnalysisRun, x: str, y: str, label: str | None = None, color: str | None = None
            ) -> Series | None:
    """y over x (batch table), bucketed; None when there are no values."""
    rows = run.con.execute(f"""
        WITH v AS (SELECT CAST({x} AS DOUBLE) AS x, CAST({y} AS DOUBLE) AS y FROM batch
                   WHERE {x} IS NOT NULL AND isfinite(CAST({y} AS DOUBLE))),
        b AS (SELECT x, y, ntile({LINE_BUCKETS}) OVER (ORDER BY x) AS k FROM v)
        SELECT avg(x), avg(y), min(y), max(y) FROM b GROUP BY k ORDER BY k""").fetchall()
    if not rows:
        return None
    xs, mean, lo, hi = (list(c) for c in zip(*rows, strict=True))
    return Series(xs, mean, lo, hi, label, color)


def _time(run: AnalysisRun) -> str:
    return "(start_ns - (SELECT min(start_ns) FROM batch)) / 1e9"


def _lines(pairs: list[tuple[str, str]], x: str, xlabel: str, ylabel: str, title: str
           ) -> Callable[[AnalysisRun], Plot | str]:
    def query(run: AnalysisRun) -> Plot | str:
        x_expr = _time(run) if x == "time" else x
        found = [_series(run, x_expr, column, label or None) for column, label in pairs]
        series = [s for s in found if s is not None]
        if not series:
            return f"no {' or '.join(c for c, _ in pairs)} values"
        return Lines(series, xlabel, ylabel, title)
    return query


def _hist(table: str, column: str, color: str, xlabel: str, title: str, quantiles: tuple[int, ...]
          ) -> Callable[[AnalysisRun], Plot | str]:
    def query(run: AnalysisRun) -> Plot | str:
        stats = run.con.execute(f"SELECT count({column}), min({column}), max({column}), "
                                f"quantile_cont({column}, {[q / 100 for q in quantiles]}) FROM {table} "
                                f"WHERE isfinite({column})").fetchone()
        if not stats or not stats[0]:
            return f"no {column} values"
        n, lo, hi, marks = stats
        width = (hi - lo) / HIST_BINS or 1.0
        counted = dict(run.con.execute(f"SELECT least(floor(({column} - {lo}) / {width}), {HIST_BINS - 1}) AS k, "
                                       f"count(*) FROM {table} WHERE isfinite({column}) GROUP BY k").fetchall())
        return Histogram(lo, width, [counted.get(k, 0) for k in range(HIST_BINS)], color,
                         list(zip(quantiles, marks, strict=False)), xlabel, f"{title} (n={n})")
    return query


def _scatter(run: AnalysisRun) -> Plot | str:
    where = "schedule_ms IS NOT NULL AND model_run_ms IS NOT NULL"
    stats = run.con.execute(f"SELECT count(*), corr(schedule_ms, model_run_ms) FROM batch WHERE {where}").fetchone()
    if not stats or not stats[0]:
        return "no batch has both schedule_ms and model_run_ms"
    points = run.con.execute(f"SELECT schedule_ms, model_run_ms FROM batch WHERE {where} "
                             f"USING SAMPLE reservoir({MAX_SCATTER_POINTS} ROWS) REPEATABLE (0)").fetchall()
    shown = f", {len(points)} of {stats[0]} shown" if len(points) < stats[0] else ""
    corr = stats[1] if stats[1] is not None else float("nan")
    return Scatter([p[0] for p in points], [p[1] for p in points], "schedule time (ms)", "model run time (ms)",
                   f"Schedule vs model-run time (r={corr:.2f}{shown})")


def _kv(run: AnalysisRun) -> Plot | str:
    series = _series(run, _time(run), "kv_usage * 100", color="tab:red")
    if series is None:
        return "no kv_usage values"
    return Lines([series], "time since first batch (s)", "KV cache utilisation (%)", "KV cache utilisation over time",
                 y_from_zero=True)


# (file name, query, figure size in inches), in drawing order
PLOTS: list[tuple[str, Callable[[AnalysisRun], Plot | str], tuple[float, float]]] = [
    ("schedule_model_trend.png", _lines([("schedule_ms", "schedule"), ("model_run_ms", "model run")], "batch_row",
                                        "batch index", "time (ms)", "Schedule vs model-run time per batch"), (12, 5)),
    ("prefill_decode_counts.png", _lines([("num_prefill_reqs", "prefill requests"),
                                          ("num_decode_reqs", "decode requests")], "batch_row", "batch index",
                                         "requests per batch", "Prefill vs decode requests per batch"), (12, 5)),
    ("tokens_per_batch.png", _lines([("total_scheduled_tokens", "")], "batch_row", "batch index",
                                    "scheduled tokens per batch (tokens)", "Total scheduled tokens per batch"),
     (12, 5)),
    ("schedule_time_hist.png", _hist("batch", "schedule_ms", "tab:blue", "schedule time (ms)",
                                     "Schedule time distribution", (50, 95)), (9, 5)),
    ("model_run_time_hist.png", _hist("batch", "model_run_ms", "tab:orange", "model run time (ms)",
                                      "Model-run time distribution", (50, 95)), (9, 5)),
    ("schedule_vs_model_scatter.png", _scatter, (8, 6)),
    ("ttft_distribution.png", _hist("request", "ttft_ms", "tab:purple", "TTFT (ms)",
                                    "Time to first token distribution", (50, 90, 99)), (10, 6)),
    ("batch_size_over_time.png", _lines([("batch_size", "")], "time", "time since first batch (s)",
                                        "batch size (requests)", "Batch size over time"), (12, 6)),
    ("kv_cache_utilization.png", _kv, (12, 6)),
]


class PlotsExporter:
    name = "plots"

    def __init__(self, figures: FigureProcess | None = None) -> None:
        self.figures = figures

    def export(self, run: AnalysisRun, out_dir: Path) -> list[Path]:
        plot_dir = output_dir(out_dir / "plots")
        # each plot is drawn as soon as it is queried: the figure process draws while the next is queried
        drawn: list[Callable[[], list[Path]]] = []
        for name, query, size in PLOTS:
            plot = query(run)
            if isinstance(plot, str):
                print(f"plots: skipped {name}: {plot}", file=sys.stderr)
            else:
                drawn.append(submit(self.figures, draw_plots, [(plot_dir / name, size, plot)]))
        return [path for result in drawn for path in result()]
