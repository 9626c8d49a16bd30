"""PNG plots of the batch and request tables, drawn by matplotlib (Agg) and written by `savefig`.

Every plot reads an aggregate from DuckDB, never a whole column: a series longer than LINE_BUCKETS
points is drawn as the per-bucket mean with a min-max band (one polygon renders fast and keeps every
spike visible), a histogram is counted by the engine, a scatter is a fixed-size sample. So drawing
costs the same on a long run as on a short one. A plot whose data is missing is skipped with a note.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from service_profiler.figures import TITLE_Y, new_figure, save_figure
from service_profiler.outputs import output_dir

from .run import AnalysisRun

if TYPE_CHECKING:
    from matplotlib.axes import Axes

LINE_BUCKETS = 2_000
HIST_BINS = 60
MAX_SCATTER_POINTS = 20_000


def _series(run: AnalysisRun, ax: Axes, x: str, y: str, label: str | None = None, color: str | None = None) -> bool:
    """y over x (batch table), bucketed; False when there are no values."""
    rows = run.con.execute(f"""
        WITH v AS (SELECT CAST({x} AS DOUBLE) AS x, CAST({y} AS DOUBLE) AS y FROM batch
                   WHERE {x} IS NOT NULL AND isfinite(CAST({y} AS DOUBLE))),
        b AS (SELECT x, y, ntile({LINE_BUCKETS}) OVER (ORDER BY x) AS k FROM v)
        SELECT avg(x), avg(y), min(y), max(y) FROM b GROUP BY k ORDER BY k""").fetchall()
    if not rows:
        return False
    xs, mean, lo, hi = (list(c) for c in zip(*rows, strict=True))
    (line,) = ax.plot(xs, mean, linewidth=0.8, color=color, label=label)
    if any(a != b for a, b in zip(lo, hi, strict=True)):
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.3, linewidth=0)
    return True


def _time(run: AnalysisRun) -> str:
    return "(start_ns - (SELECT min(start_ns) FROM batch)) / 1e9"


def _lines(pairs: list[tuple[str, str]], x: str, xlabel: str, ylabel: str, title: str
           ) -> Callable[[AnalysisRun, Axes], str | None]:
    def draw(run: AnalysisRun, ax: Axes) -> str | None:
        x_expr = _time(run) if x == "time" else x
        drawn = [_series(run, ax, x_expr, column, label or None) for column, label in pairs]
        if not any(drawn):
            return f"no {' or '.join(c for c, _ in pairs)} values"
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, y=TITLE_Y)
        if len(pairs) > 1:
            ax.legend(loc="upper right")  # "best" searches the data for a free spot: slow on long series
        return None
    return draw


def _hist(table: str, column: str, color: str, xlabel: str, title: str, quantiles: tuple[int, ...]
          ) -> Callable[[AnalysisRun, Axes], str | None]:
    def draw(run: AnalysisRun, ax: Axes) -> str | None:
        stats = run.con.execute(f"SELECT count({column}), min({column}), max({column}), "
                                f"quantile_cont({column}, {[q / 100 for q in quantiles]}) FROM {table} "
                                f"WHERE isfinite({column})").fetchone()
        if not stats or not stats[0]:
            return f"no {column} values"
        n, lo, hi, marks = stats
        width = (hi - lo) / HIST_BINS or 1.0
        counts = run.con.execute(f"SELECT least(floor(({column} - {lo}) / {width}), {HIST_BINS - 1}) AS k, count(*) "
                                 f"FROM {table} WHERE isfinite({column}) GROUP BY k ORDER BY k").fetchall()
        ax.bar([lo + (k + 0.5) * width for k, _ in counts], [c for _, c in counts], width=width, color=color)
        for q, v, style in zip(quantiles, marks, ("--", "-.", ":"), strict=False):
            ax.axvline(v, color="black", linestyle=style, linewidth=1.0, label=f"p{q} {v:.4g} ms")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("count")
        ax.set_title(f"{title} (n={n})", y=TITLE_Y)
        ax.legend(loc="upper right")
        return None
    return draw


def _scatter(run: AnalysisRun, ax: Axes) -> str | None:
    where = "schedule_ms IS NOT NULL AND model_run_ms IS NOT NULL"
    stats = run.con.execute(f"SELECT count(*), corr(schedule_ms, model_run_ms) FROM batch WHERE {where}").fetchone()
    if not stats or not stats[0]:
        return "no batch has both schedule_ms and model_run_ms"
    points = run.con.execute(f"SELECT schedule_ms, model_run_ms FROM batch WHERE {where} "
                             f"USING SAMPLE reservoir({MAX_SCATTER_POINTS} ROWS) REPEATABLE (0)").fetchall()
    ax.scatter([p[0] for p in points], [p[1] for p in points], s=4, alpha=0.3, rasterized=True)
    shown = f", {len(points)} of {stats[0]} shown" if len(points) < stats[0] else ""
    corr = stats[1] if stats[1] is not None else float("nan")
    ax.set_xlabel("schedule time (ms)")
    ax.set_ylabel("model run time (ms)")
    ax.set_title(f"Schedule vs model-run time (r={corr:.2f}{shown})", y=TITLE_Y)
    return None


def _kv(run: AnalysisRun, ax: Axes) -> str | None:
    if not _series(run, ax, _time(run), "kv_usage * 100", color="tab:red"):
        return "no kv_usage values"
    ax.set_ylim(bottom=0)
    ax.set_xlabel("time since first batch (s)")
    ax.set_ylabel("KV cache utilisation (%)")
    ax.set_title("KV cache utilisation over time", y=TITLE_Y)
    return None


# (file name, drawing function, figure size in inches), in drawing order
PLOTS: list[tuple[str, Callable[[AnalysisRun, Axes], str | None], tuple[float, float]]] = [
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

    def export(self, run: AnalysisRun, out_dir: Path) -> list[Path]:
        plot_dir = output_dir(out_dir / "plots")
        written: list[Path] = []
        for name, draw, size in PLOTS:
            fig = new_figure(size)
            ax = fig.subplots()
            skipped = draw(run, ax)
            if skipped is not None:
                print(f"plots: skipped {name}: {skipped}", file=sys.stderr)
                continue
            ax.grid(True, alpha=0.3)
            written.append(save_figure(fig, plot_dir / name))
        return written
