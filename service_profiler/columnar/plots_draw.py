"""What the analysis plots show, as plain data, and how each is drawn on a matplotlib (Agg) axes.

`plots_out` queries the tables into these descriptions; `draw_plots` turns them into PNGs. The split lets
the drawing (matplotlib: Python holding the GIL) run in the figure process (`figure_process`) while
this one writes the other outputs. This module imports no DuckDB and matplotlib only when drawing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from service_profiler.figures import TITLE_Y, new_figure, save_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes


@dataclass(frozen=True)
class Series:
    """A line over `x`: per bucket, the mean of y and its min-max band."""
    x: list[float]
    mean: list[float]
    low: list[float]
    high: list[float]
    label: str | None = None
    color: str | None = None

    def draw(self, ax: Axes) -> None:
        (line,) = ax.plot(self.x, self.mean, linewidth=0.8, color=self.color, label=self.label)
        if self.low != self.high:
            ax.fill_between(self.x, self.low, self.high, color=line.get_color(), alpha=0.3, linewidth=0)


@dataclass(frozen=True)
class Lines:
    series: list[Series]
    xlabel: str
    ylabel: str
    title: str
    y_from_zero: bool = False

    def draw(self, ax: Axes) -> None:
        for series in self.series:
            series.draw(ax)
        if self.y_from_zero:
            ax.set_ylim(bottom=0)
        ax.set_xlabel(self.xlabel)
        ax.set_ylabel(self.ylabel)
        ax.set_title(self.title, y=TITLE_Y)
        if any(s.label for s in self.series):
            ax.legend(loc="upper right")  # "best" searches the data for a free spot: slow on long series


@dataclass(frozen=True)
class Histogram:
    start: float  # the first bin's lower edge
    width: float
    counts: list[int]  # per bin, from `start` on
    color: str
    marks: list[tuple[int, float]]  # (percentile, value)
    xlabel: str
    title: str

    def draw(self, ax: Axes) -> None:
        # one filled outline, the bars' look: `ax.bar` makes a patch per bin, a sixth of the figure's time
        edges = [self.start + k * self.width for k in range(len(self.counts) + 1)]
        ax.stairs(self.counts, edges, fill=True, color=self.color)
        for (q, v), style in zip(self.marks, ("--", "-.", ":"), strict=False):
            ax.axvline(v, color="black", linestyle=style, linewidth=1.0, label=f"p{q} {v:.4g} ms")
        ax.set_xlabel(self.xlabel)
        ax.set_ylabel("count")
        ax.set_title(self.title, y=TITLE_Y)
        ax.legend(loc="upper right")


@dataclass(frozen=True)
class Scatter:
    x: list[float]
    y: list[float]
    xlabel: str
    ylabel: str
    title: str

    def draw(self, ax: Axes) -> None:
        ax.scatter(self.x, self.y, s=4, alpha=0.3, rasterized=True)
        ax.set_xlabel(self.xlabel)
        ax.set_ylabel(self.ylabel)
        ax.set_title(self.title, y=TITLE_Y)


Plot = Lines | Histogram | Scatter


def draw_plots(plots: list[tuple[Path, tuple[float, float], Plot]]) -> list[Path]:
    """Draw each (path, figure size in inches, plot) and write it as PNG; the paths written."""
    written = []
    for path, size, plot in plots:
        fig = new_figure(size)
        ax = fig.subplots()
        plot.draw(ax)
        ax.grid(True, alpha=0.3)
        written.append(save_figure(fig, path))
    return written
