"""PNG plots of the batch and request tables (six scheduler-profiling plots, three request plots).

``write_plots`` takes columns as arrays (NaN = missing), writes what the data supports and
skips, with a note on stderr, any plot whose data is entirely missing. matplotlib is imported
inside the function so that importing the analyzer stays cheap; figures are drawn on the Agg
canvas directly, which needs no display and leaves pyplot's global state alone.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from .png import write_png

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Float = NDArray[np.float64]

# Agg needs ~0.75 s to draw one noisy 20k-vertex line. Longer series are drawn as a min–max band
# plus the bucket mean over LINE_BUCKETS buckets (~1.7 per pixel column of a 12-inch, 100-dpi
# figure): one polygon renders in ~0.1 s, keeps every spike visible, and all nine plots of 70k
# batches stay under ~3 s.
MAX_LINE_POINTS = 5_000
LINE_BUCKETS = 2_000
MAX_SCATTER_POINTS = 20_000
_DPI = 100
# Margins in inches (left, right, bottom, top) instead of tight_layout, which lays every figure out
# once more just to measure its labels (~40 % of the drawing time). Wide enough for 7-digit tick
# labels, an axis label and a title; subplots_adjust takes them as fractions of each figure.
_MARGINS_IN = (0.95, 0.25, 0.6, 0.45)
# Axis labels' distance from the axes, in inches: below the x tick labels, left of 7-digit y tick labels.
_XLABEL_BELOW_IN, _YLABEL_LEFT_IN = 0.36, 0.68


def save_figure(fig: Figure, path: Path, margins_in: tuple[float, float, float, float] = _MARGINS_IN) -> None:
    """Place the axes with fixed margins and write a PNG (shared with the latency model's plots)."""
    width, height = fig.get_size_inches()
    left, right, bottom, top = margins_in
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height)
    for ax in fig.axes:
        _fix_text_positions(ax, width, height)
    # Drawn on the Agg canvas and encoded by png.write_png: a third of the time of savefig's Pillow encoder.
    fig.set_dpi(_DPI)
    canvas = fig.canvas
    canvas.draw()
    write_png(path, np.asarray(canvas.buffer_rgba()))  # type: ignore[attr-defined]


def _fix_text_positions(ax: Axes, fig_width_in: float, fig_height_in: float) -> None:
    """Title and axis labels at fixed offsets from the axes. Left automatic, matplotlib places each by
    measuring every tick label's extent first (a third of the drawing time of these small charts);
    the fixed margins above already leave room for the tick labels."""
    if ax.get_label() == "<colorbar>":  # its label sits on the right: leave it to matplotlib
        return
    if ax.get_title():
        ax.set_title(ax.get_title(), y=1.0)  # an explicit y turns the automatic placement off
    box = ax.get_position()
    width_in, height_in = box.width * fig_width_in, box.height * fig_height_in
    if ax.get_xlabel():
        ax.xaxis.set_label_coords(0.5, -_XLABEL_BELOW_IN / height_in)
    if ax.get_ylabel():
        ax.yaxis.set_label_coords(-_YLABEL_LEFT_IN / width_in, 0.5)


def histogram(ax: Axes, values: Float, bins: int, color: str | None = None) -> None:
    """A filled step histogram: one polygon, where ax.hist draws one rectangle per bin (~3x slower)."""
    counts, edges = np.histogram(values, bins=bins)
    ax.stairs(counts, edges, fill=True, color=color, alpha=0.85)
    ax.stairs(counts, edges, color="black", linewidth=0.4)


def write_plots(batch_cols: Mapping[str, Any], request_cols: Mapping[str, Any], out_dir: Path,
                names: Collection[str] | None = None) -> list[Path]:
    """Write the nine analysis plots (or those of PLOT_NAMES in ``names``: analyze draws them in two
    processes) into ``out_dir``; return the paths actually written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    batches = _Columns(batch_cols)
    requests = _Columns(request_cols)
    written: list[Path] = []
    for name, draw, size in _PLOTS:
        if names is not None and name not in names:
            continue
        fig = Figure(figsize=size)
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        skipped = draw(ax, batches, requests)
        if skipped is not None:
            print(f"plots: skipped {name}: {skipped}", file=sys.stderr)
            continue
        ax.grid(True, alpha=0.3)
        path = out_dir / name
        save_figure(fig, path)
        written.append(path)
    return written


class _Columns:
    """Float views of a column dict; an absent or non-numeric column reads as all-missing."""

    def __init__(self, cols: Mapping[str, Any]) -> None:
        self._cols = cols
        self._n = max((np.size(v) for v in cols.values()), default=0)

    def get(self, name: str) -> Float:
        raw = self._cols.get(name)
        if raw is None:
            return np.full(self._n, np.nan)
        try:
            return np.asarray(raw, dtype=float).ravel()
        except (TypeError, ValueError):
            return np.full(np.size(raw), np.nan)


def _draw_series(ax: Axes, x: Float, y: Float, label: str | None = None, color: str | None = None) -> bool:
    """Plot the finite (x, y) pairs in x order; False when there are none."""
    ok = np.isfinite(x) & np.isfinite(y)
    if not ok.any():
        return False
    # Batch ids of several engine processes interleave; sort so the line runs left to right.
    order = np.argsort(x[ok], kind="stable")
    xs, ys = x[ok][order], y[ok][order]
    if xs.size <= MAX_LINE_POINTS:
        ax.plot(xs, ys, linewidth=0.7, label=label, color=color)
        return True
    starts = np.linspace(0, xs.size, LINE_BUCKETS + 1).astype(int)[:-1]
    counts = np.diff(np.append(starts, xs.size))
    xm = np.add.reduceat(xs, starts) / counts
    (line,) = ax.plot(xm, np.add.reduceat(ys, starts) / counts, linewidth=0.8, color=color,
                      label=None if label is None else f"{label} (mean; band = min–max)")  # fmt: skip
    ax.fill_between(xm, np.minimum.reduceat(ys, starts), np.maximum.reduceat(ys, starts),
                    color=line.get_color(), alpha=0.3, linewidth=0)  # fmt: skip
    return True


def _batch_axis(b: _Columns) -> tuple[Float, str]:
    ids = b.get("batch_id")
    if np.isfinite(ids).any():
        return ids, "batch id"
    return np.arange(ids.size, dtype=float), "batch index"


def _time_axis(b: _Columns) -> tuple[Float, str]:
    start = b.get("start_ns")
    finite = start[np.isfinite(start)]
    if finite.size:
        return (start - finite.min()) / 1e9, "time since first batch (s)"
    return _batch_axis(b)


def _finite(v: Float) -> Float:
    return v[np.isfinite(v)]


def _two_series(ax: Axes, b: _Columns, pairs: tuple[tuple[str, str], tuple[str, str]], ylabel: str,
                title: str) -> str | None:
    """Two batch columns over the batch axis, with a legend; the skip reason when neither has values."""
    x, xlabel = _batch_axis(b)
    drawn = [_draw_series(ax, x, b.get(column), label) for column, label in pairs]
    if not any(drawn):
        return f"no {pairs[0][0]} or {pairs[1][0]} values"
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    return None


def _schedule_model_trend(ax: Axes, b: _Columns, _r: _Columns) -> str | None:
    return _two_series(ax, b, (("schedule_ms", "schedule"), ("model_run_ms", "model run")),
                       "time (ms)", "Schedule vs model-run time per batch")


def _prefill_decode_counts(ax: Axes, b: _Columns, _r: _Columns) -> str | None:
    return _two_series(ax, b, (("num_prefill_reqs", "prefill requests"), ("num_decode_reqs", "decode requests")),
                       "requests per batch", "Prefill vs decode requests per batch")


def _tokens_per_batch(ax: Axes, b: _Columns, _r: _Columns) -> str | None:
    x, xlabel = _batch_axis(b)
    if not _draw_series(ax, x, b.get("total_scheduled_tokens"), color="tab:green"):
        return "no total_scheduled_tokens values"
    ax.set_xlabel(xlabel)
    ax.set_ylabel("scheduled tokens per batch (tokens)")
    ax.set_title("Total scheduled tokens per batch")
    return None


def _hist(ax: Axes, values: Float, color: str, xlabel: str, title: str) -> None:
    histogram(ax, values, 60, color)
    for q, style in ((50, "--"), (95, ":")):
        v = float(np.percentile(values, q))
        ax.axvline(v, color="black", linestyle=style, linewidth=1.0, label=f"p{q} {v:.3g} ms")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(f"{title} (n={values.size})")
    ax.legend()


def _schedule_time_hist(ax: Axes, b: _Columns, _r: _Columns) -> str | None:
    v = _finite(b.get("schedule_ms"))
    if not v.size:
        return "no schedule_ms values"
    _hist(ax, v, "tab:blue", "schedule time (ms)", "Schedule time distribution")
    return None


def _model_run_time_hist(ax: Axes, b: _Columns, _r: _Columns) -> str | None:
    v = _finite(b.get("model_run_ms"))
    if not v.size:
        return "no model_run_ms values"
    _hist(ax, v, "tab:orange", "model run time (ms)", "Model-run time distribution")
    return None


def _schedule_vs_model_scatter(ax: Axes, b: _Columns, _r: _Columns) -> str | None:
    sched, run = b.get("schedule_ms"), b.get("model_run_ms")
    ok = np.isfinite(sched) & np.isfinite(run)
    if not ok.any():
        return "no batch has both schedule_ms and model_run_ms"
    sched, run = sched[ok], run[ok]
    n = sched.size
    if n > MAX_SCATTER_POINTS:
        pick = np.random.default_rng(0).choice(n, size=MAX_SCATTER_POINTS, replace=False)
        sched, run = sched[pick], run[pick]
    ax.scatter(sched, run, s=4, alpha=0.3, rasterized=True)
    corr = np.corrcoef(sched, run)[0, 1] if n > 1 and sched.std() > 0 and run.std() > 0 else float("nan")
    shown = f", {sched.size} of {n} shown" if sched.size < n else ""
    ax.set_xlabel("schedule time (ms)")
    ax.set_ylabel("model run time (ms)")
    ax.set_title(f"Schedule vs model-run time (r={corr:.2f}{shown})")
    return None


def _ttft_distribution(ax: Axes, _b: _Columns, r: _Columns) -> str | None:
    v = _finite(r.get("ttft_ms"))
    if not v.size:
        return "no ttft_ms values"
    histogram(ax, v, 50, "tab:purple")
    for q, style in ((50, "--"), (90, "-."), (99, ":")):
        p = float(np.percentile(v, q))
        ax.axvline(p, color="black", linestyle=style, linewidth=1.0, label=f"p{q} {p:.4g} ms")
    ax.set_xlabel("TTFT (ms)")
    ax.set_ylabel("requests")
    ax.set_title(f"Time to first token distribution (n={v.size})")
    ax.legend()
    return None


def _batch_size_over_time(ax: Axes, b: _Columns, _r: _Columns) -> str | None:
    x, xlabel = _time_axis(b)
    if not _draw_series(ax, x, b.get("batch_size")):
        return "no batch_size values"
    ax.set_xlabel(xlabel)
    ax.set_ylabel("batch size (requests)")
    ax.set_title("Batch size over time")
    return None


def _kv_cache_utilization(ax: Axes, b: _Columns, _r: _Columns) -> str | None:
    x, xlabel = _time_axis(b)
    pct = b.get("kv_usage") * 100.0
    if not _draw_series(ax, x, pct, color="tab:red"):
        return "no kv_usage values"
    ax.set_ylim(0, max(100.0, float(np.nanmax(pct)) * 1.02))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("KV cache utilisation (%)")
    ax.set_title("KV cache utilisation over time")
    return None


# (file name, drawing function, figure size in inches), in drawing order
_PLOTS: list[tuple[str, Callable[[Axes, _Columns, _Columns], str | None], tuple[float, float]]] = [
    ("schedule_model_trend.png", _schedule_model_trend, (12, 5)),
    ("prefill_decode_counts.png", _prefill_decode_counts, (12, 5)),
    ("tokens_per_batch.png", _tokens_per_batch, (12, 5)),
    ("schedule_time_hist.png", _schedule_time_hist, (9, 5)),
    ("model_run_time_hist.png", _model_run_time_hist, (9, 5)),
    ("schedule_vs_model_scatter.png", _schedule_vs_model_scatter, (8, 6)),
    ("ttft_distribution.png", _ttft_distribution, (10, 6)),
    ("batch_size_over_time.png", _batch_size_over_time, (12, 6)),
    ("kv_cache_utilization.png", _kv_cache_utilization, (12, 6)),
]
PLOT_NAMES = tuple(name for name, _, _ in _PLOTS)
# The table columns the plots read: analyze sends the plotting process these alone.
BATCH_COLUMNS = ("batch_id", "start_ns", "schedule_ms", "model_run_ms", "num_prefill_reqs", "num_decode_reqs",
                 "total_scheduled_tokens", "batch_size", "kv_usage")
REQUEST_COLUMNS = ("ttft_ms",)
