"""Which requests and batches were only partly observed: marked, not presented as whole.

Each request and batch row gets two columns at the end of its table: `complete` (1/0) and
`incomplete_reason` (empty when complete; else `;`-separated reasons):
- `collection_switched`: collection was switched on or off (a `state` line of any process) while the
  request was in flight (arrival .. completion) or the batch ran: some of its records are missing;
- `records_missing:<why>`: a process that records it lost records in that time (`lost`, `dropped`
  lines) or ended without a final flush (the time after its last `flushed.until`), see losses.py;
- `no_api_server_record`: the run has API-server records but none of this request (the API server was
  killed, or collection was off when it arrived): its timing would come from the engine alone;
- `no_arrival_record`: no API server and no engine `enqueue` record although the run has them;
- `not_finished`: no completion was recorded;
- `negative_<column>`: timestamps out of order (records of different windows); that duration is
  left empty. No duration in the tables is ever negative.
Latency statistics (summaries) use complete rows only and say how many they left out.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from typing import Any

from service_profiler.rawdata.losses import Gap
from service_profiler.rawdata.rawfile import RunData

from .tables import AnalysisTables, RecordIndex, Table

COMPLETE_COLUMNS = ["complete", "incomplete_reason"]
REQUEST_DURATIONS = ("queue_ms", "prefill_ms", "decode_ms", "ttft_ms", "tpot_ms", "e2e_ms")
BATCH_DURATIONS = ("schedule_ms", "model_run_ms", "step_ms", "update_ms")
_FAR = 2**63 - 1


class _Windows:
    """The switch times of collection (any process) and each process's loss gaps, for overlap tests."""

    def __init__(self, run: RunData) -> None:
        self.switches = sorted(ts for _, ts, _, why in run.states if why != "startup")
        self.gaps: dict[int, list[Gap]] = {p.index: p.loss.all_gaps() for p in run.processes}

    def switched(self, start: int, end: int) -> bool:
        """A switch strictly after start and at or before end."""
        i = bisect_right(self.switches, start)
        return i < len(self.switches) and self.switches[i] <= end

    def lost(self, procs: Sequence[int], start: int, end: int) -> list[str]:
        return sorted({g.reason for p in procs for g in self.gaps.get(p, ())
                       if g.start_ns <= end and g.end_ns >= start})


def _reasons_text(reasons: list[str]) -> str:
    return ";".join(dict.fromkeys(reasons))


def _clear_negative(row: list[Any], columns: dict[str, int], names: Sequence[str], reasons: list[str]) -> None:
    for name in names:
        i = columns.get(name)
        if i is not None and isinstance(row[i], int | float) and row[i] < 0:
            row[i] = None
            reasons.append(f"negative_{name}")


def mark_requests(run: RunData, idx: RecordIndex, table: Table, windows: _Windows) -> Table:
    c = {name: i for i, name in enumerate(table.columns)}
    api_procs = sorted({e.proc for e in idx.events("Request", "httpReq")})
    has_api = bool(api_procs)
    has_enqueue = bool(idx.events("Request", "enqueue"))
    ts_cols = [c[n] for n in ("arrival_ns", "engine_arrival_ns", "first_scheduled_ns", "first_token_ns",
                              "completion_ns")]
    done_i, proc_i, src_i = c["completion_ns"], c["proc"], c["timing_source"]
    rows = []
    for r in table.rows:
        row = list(r)
        reasons: list[str] = []
        seen = [row[i] for i in ts_cols if row[i] is not None]
        start = min(seen) if seen else None
        end = row[done_i] if row[done_i] is not None else _FAR
        if start is not None:
            if windows.switched(start, end):
                reasons.append("collection_switched")
            procs = [*api_procs, row[proc_i]] if row[proc_i] is not None else api_procs
            reasons += [f"records_missing:{why}" for why in windows.lost(procs, start, end)]
        if has_api and row[src_i] != "api":
            reasons.append("no_api_server_record")
        elif not has_api and has_enqueue and row[c["engine_arrival_ns"]] is None:
            reasons.append("no_arrival_record")
        if row[done_i] is None:
            reasons.append("not_finished")
        _clear_negative(row, c, REQUEST_DURATIONS, reasons)
        rows.append((*row, 0 if reasons else 1, _reasons_text(reasons)))
    return Table(table.name, [*table.columns, *COMPLETE_COLUMNS], rows)


def mark_batches(table: Table, windows: _Windows) -> Table:
    c = {name: i for i, name in enumerate(table.columns)}
    start_i, proc_i = c["start_ns"], c["proc"]
    end_cols = [c[n] for n in ("end_ns", "model_end_ns", "update_end_ns")]
    rows = []
    for r in table.rows:
        row = list(r)
        reasons: list[str] = []
        start = row[start_i]
        end = max(row[i] for i in end_cols if row[i] is not None)
        if windows.switched(start, end):
            reasons.append("collection_switched")
        reasons += [f"records_missing:{why}" for why in windows.lost([row[proc_i]], start, end)]
        _clear_negative(row, c, BATCH_DURATIONS, reasons)
        rows.append((*row, 0 if reasons else 1, _reasons_text(reasons)))
    return Table(table.name, [*table.columns, *COMPLETE_COLUMNS], rows)


def mark_tables(run: RunData, idx: RecordIndex, tables: AnalysisTables) -> None:
    """Add `complete` / `incomplete_reason` to the request and batch tables (see the module docstring)."""
    windows = _Windows(run)
    tables.requests = mark_requests(run, idx, tables.requests, windows)
    tables.batches = mark_batches(tables.batches, windows)


def complete_mask(table: Table) -> list[bool]:
    """Row by row: complete (tables without the column count as complete)."""
    if "complete" not in table.columns:
        return [True] * len(table)
    i = table.columns.index("complete")
    return [r[i] == 1 for r in table.rows]


def reason_counts(table: Table) -> dict[str, int]:
    """How many rows each reason left out (a row may have several)."""
    if "incomplete_reason" not in table.columns:
        return {}
    i = table.columns.index("incomplete_reason")
    out: dict[str, int] = {}
    for r in table.rows:
        for why in (r[i] or "").split(";"):
            if why:
                out[why] = out.get(why, 0) + 1
    return out
