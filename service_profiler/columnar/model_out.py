"""The batch latency model (service_profiler.model.latency): fitted on the batches' size, scheduled tokens
and model-run time, written under model/ (latency_model.json and its two plots)."""

from __future__ import annotations

import sys
from pathlib import Path

from service_profiler.outputs import output_dir

from .run import AnalysisRun


class ModelExporter:
    name = "model"

    def export(self, run: AnalysisRun, out_dir: Path) -> list[Path]:
        from service_profiler.model.latency import fit_and_save

        columns = run.con.execute(
            "SELECT CAST(batch_size AS DOUBLE) AS b, CAST(total_scheduled_tokens AS DOUBLE) AS s, model_run_ms AS t "
            "FROM batch WHERE isfinite(model_run_ms) AND batch_size IS NOT NULL "
            "AND total_scheduled_tokens IS NOT NULL ORDER BY batch_row").fetchnumpy()
        if len(columns["t"]) == 0:
            print("latency model skipped: no batch has a model execution time (modelExec spans)", file=sys.stderr)
            return []
        model_dir = output_dir(out_dir / "model")
        fit_and_save(columns["b"], columns["s"], columns["t"], model_dir)
        return sorted(p for p in model_dir.iterdir() if p.is_file())
