"""The batch latency model (service_profiler.model.latency): fitted on the batches' size, scheduled tokens
and model-run time, written under model/ (latency_model.json and its two plots). The fit and its figures
run in the figure process when `analyze` started one (`figure_process`)."""

from __future__ import annotations

import sys
from array import array
from pathlib import Path
from typing import TYPE_CHECKING

from service_profiler.outputs import output_dir

from .figure_process import FigureProcess, submit

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
        cursor = run.con.execute(
            "SELECT CAST(batch_size AS DOUBLE), CAST(total_scheduled_tokens AS DOUBLE), model_run_ms "
            "FROM batch WHERE isfinite(model_run_ms) AND batch_size IS NOT NULL "
            "AND total_scheduled_tokens IS NOT NULL ORDER BY batch_row")
        # arrays of doubles, filled a chunk at a time: this process holds no list of every step and need
        # not import numpy, and the arrays cross to the figure process as bytes
        b, s, t = array("d"), array("d"), array("d")
        while rows := cursor.fetchmany(65_536):
            for column, values in zip((b, s, t), zip(*rows, strict=True), strict=True):
                column.extend(values)
        if not t:
            print("latency model skipped: no batch has a model execution time (modelExec spans)", file=sys.stderr)
            return []
        model_dir = output_dir(out_dir / "model")
        submit(self.figures, fit_and_write, b, s, t, model_dir)()
        return sorted(p for p in model_dir.iterdir() if p.is_file())
