"""The batch and request tables as rows, for the offline tools that read a raw run directly (the diagnosis,
the workload runner's cells): one dict per row, with the tables' own column names (batch.csv and
request.csv call them the same, after msserviceprofiler's columns)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .csv_out import BATCH_REF
from .run import analyze_run

# batch.csv's msserviceprofiler columns that are exactly one of the batch table's, under another name
BATCH_ALIASES = {csv_name: expr[2:] for csv_name, expr in BATCH_REF.items()
                 if expr.startswith("b.") and expr[2:] != csv_name}


@dataclass
class RunRows:
    batches: list[dict[str, Any]]  # in time order
    requests: list[dict[str, Any]]  # in arrival order
    batch_rids: list[list[str]]  # per batch (same order), the engine request ids it scheduled, in its order


def load_rows(run_dir: Path | str) -> RunRows:
    """The batch and request tables of the raw run under `run_dir`."""
    run = analyze_run([run_dir])
    try:
        batches = run.dicts("SELECT * FROM batch ORDER BY batch_row")
        requests = run.dicts("SELECT * EXCLUDE (row_no) FROM request ORDER BY row_no")
        rids = dict(run.con.execute("SELECT batch_row, list(rid ORDER BY pos) FROM batch_entry "
                                    "GROUP BY batch_row").fetchall())
    finally:
        run.close()
    return RunRows(batches, requests, [list(rids.get(b["batch_row"]) or []) for b in batches])
