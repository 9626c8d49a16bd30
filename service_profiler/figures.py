"""Figures (plots, the step-time model's, the diagnosis's): made on matplotlib's Agg canvas and written
by its own `savefig`, through `outputs.open_output` (a new file moved onto its name: a link there is
replaced, never written through). matplotlib is imported only when a figure is made.

Layout is given rather than measured: `tight_layout`, and matplotlib's automatic title placement, lay
each figure out once more just to measure its labels, which was the larger part of drawing the plots.
The margins and the title height below fit the plots and the model's figures; the diagnosis's one
figure of four stacked panels keeps `tight_layout` (`margins_in=None`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from service_profiler.outputs import open_output

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# margins in inches: left, right, bottom, top
MARGINS_IN = (0.95, 0.25, 0.6, 0.45)
# where titles sit (axes coordinates): none of the tick labels here reaches above the axes
TITLE_Y = 1.0


def new_figure(size_in: tuple[float, float]) -> Figure:
    """An empty figure of `size_in` inches on an Agg canvas (no pyplot, no global figure registry)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size_in)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: Path, margins_in: tuple[float, float, float, float] | None = MARGINS_IN,
                dpi: int = 100) -> Path:
    """Set fixed margins (`None`: keep the figure's own layout), then write it as PNG at `path`."""
    if margins_in is not None:
        width, height = fig.get_size_inches()
        left, right, bottom, top = margins_in
        fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height,
                            top=1 - top / height)
    with open_output(path, "wb") as fh:
        # the fastest zlib level: the same pixels in a somewhat larger file; at the default level most
        # of savefig's time went to compressing
        fig.savefig(fh, format="png", dpi=dpi, pil_kwargs={"compress_level": 1})
    return path
