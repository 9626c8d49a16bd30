"""The batch latency model (service_profiler.model.latency): fitted on the batches' size, scheduled tokens
and model-run time, written under model/ (latency_model.json and its two plots). The fit and its figures
run in the figure process when `analyze` started one (`figure_process`)."""

from __future__ import annotations

import sys
from array import array
from pathlib import Path
from typing import TYPE_CHECKING

from service_profiler.outputs import output_dir

from .figure_process import FigureProcess, call

if TYPE_CHECKING:
    from .run import AnalysisRun


def fit_and_write(batch_size: array[float], total_tokens: array[float], model_run_ms: array[float],
                  model_dir: Path) -> None:
    from service_profiler.model.latency import fit_and_save

    fit_and_save(batch_size, total_tokens, model_run_ms, model_dir)


class ModelExporter:
    name = "model"

    def __init__(self, figures: FigureProcess | None = None) -> None:
        self.figures = figures

    def export(self, run: AnalysisRun, out_dir: Path) -> list[Path]:
        row = run.con.execute(
            "SELECT list(CAST(batch_size AS DOUBLE) ORDER BY batch_row), "
            "list(CAST(total_scheduled_tokens AS DOUBLE) ORDER BY batch_row), list(model_run_ms ORDER BY batch_row) "
            "FROM batch WHERE isfinite(model_run_ms) AND batch_size IS NOT NULL "
            "AND total_scheduled_tokens IS NOT NULL").fetchone()
        if row is None or not row[0]:
            print("latency model skipped: no batch has a model execution time (modelExec spans)", file=sys.stderr)
            return []
        # arrays of doubles, not numpy's: this process need not import numpy, and they pickle as bytes
        b, s, t = (array("d", column) for column in row)
        model_dir = output_dir(out_dir / "model")
        call(self.figures, fit_and_write, b, s, t, model_dir)
        return sorted(p for p in model_dir.iterdir() if p.is_file())
