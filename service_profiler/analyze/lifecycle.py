"""Request lifecycle tables (the scheduler-logging tables): events, state transitions, per-iteration request states.

- events: one row per lifecycle moment, time ordered: request_arrived (`httpReq`, API server),
  request_enqueued (`enqueue`, EngineCore), request_scheduled (first batch), request_preempted,
  request_resumed, first_token (API `tokens`), request_finished (engine FINISHED_* state),
  request_completed (`httpRes`, API server).
- state transitions: per request, NEW→WAITING at engine arrival, then the engine's `Request/state`
  events; for runs recorded without state events they are derived from the batches (first scheduled,
  `preempted` lists, resumed entries, `updateFromOutput` finished lists). `time_in_from_state_ms` is the
  time since the request's previous transition.
- per-iteration request states: for every batch, each scheduled request (state "running", or
  "completed" when that step finished it) and each request preempted by it ("preempted"). Streamed,
  because it has one row per (batch, request): millions on long runs. Waiting requests are not listed
  per iteration (that would be O(batches × queue)); their waiting intervals are in the state
  transitions and the batch table's `waiting` count.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from operator import itemgetter
from typing import Any

from .tables import MS, AnalysisTables, RecordIndex, Table

EVENT_COLUMNS = ["ts_ns", "event_type", "rid", "proc", "batch_id", "detail"]
STATE_COLUMNS = ["rid", "seq", "ts_ns", "from_state", "to_state", "batch_id", "proc", "time_in_from_state_ms",
                 "source"]
ITERATION_COLUMNS = ["batch_id", "dp_rank", "proc", "batch_start_ns", "rid", "state", "phase",
                     "scheduled_tokens", "computed_tokens_before", "prompt_tokens", "resumed", "iteration",
                     "generated_tokens_before", "time_in_state_ms"]


def _rid_of(item: Any) -> Any:
    return item[0] if isinstance(item, list | tuple) and item else item


def build_events(idx: RecordIndex, tables: AnalysisTables) -> Table:
    rows: list[tuple[Any, ...]] = []
    for e in idx.events("Request", "httpReq"):
        a = e.attrs or {}
        rows.append((e.ts_ns, "request_arrived", a.get("rid"), e.proc, None,
                     f"api_rid={a.get('api_rid')};prompt_tokens={a.get('prompt_tokens')};"
                     f"max_tokens={a.get('max_tokens')}"))
    for e in idx.events("Request", "enqueue"):
        a = e.attrs or {}
        rows.append((e.ts_ns, "request_enqueued", a.get("rid"), e.proc, None,
                     f"prompt_tokens={a.get('prompt_tokens')}"))
    for e in idx.events("Request", "httpRes"):
        a = e.attrs or {}
        rows.append((e.ts_ns, "request_completed", a.get("rid"), e.proc, None,
                     f"output_tokens={a.get('output_tokens')};finish_reason={a.get('finish_reason')}"))
    states = idx.events("Request", "state")
    for e in states:
        a = e.attrs or {}
        to, frm = a.get("to"), a.get("from")
        kind = _transition_event(frm, to)
        if kind:
            rows.append((e.ts_ns, kind, a.get("rid"), e.proc, a.get("batch_id"), f"state={to}"))
    req = tables.requests
    ci = {c: i for i, c in enumerate(req.columns)}
    rid_i, proc_i, fb_i, q_i = ci["rid"], ci["proc"], ci["first_batch_id"], ci["queue_ms"]
    fs_i, ft_i, ttft_i, src_i = ci["first_scheduled_ns"], ci["first_token_ns"], ci["ttft_ms"], ci["timing_source"]
    for r in req.rows:
        if r[fs_i] is not None:
            rows.append((r[fs_i], "request_scheduled", r[rid_i], r[proc_i], r[fb_i], f"queue_ms={r[q_i]}"))
        if r[ft_i] is not None:
            rows.append((r[ft_i], "first_token", r[rid_i], None, None, f"ttft_ms={r[ttft_i]};source={r[src_i]}"))
    if not states:
        for t in _derived_transitions(tables):
            kind = _transition_event(t[3], t[4])
            if kind:
                rows.append((t[2], kind, t[0], t[6], t[5], f"state={t[4]}"))
    rows.sort(key=_TS)
    return Table("events", list(EVENT_COLUMNS), rows)


def _transition_event(frm: Any, to: Any) -> str | None:
    if to == "PREEMPTED":
        return "request_preempted"
    if to == "RUNNING" and frm == "PREEMPTED":
        return "request_resumed"
    if isinstance(to, str) and to.startswith("FINISHED"):
        return "request_finished"
    return None


_TS = itemgetter(0)


def _derived_transitions(tables: AnalysisTables) -> list[tuple[Any, ...]]:
    """(rid, 0, ts, from, to, batch_id, proc, None, "derived") from batches, when no state events exist."""
    out: list[tuple[Any, ...]] = []
    brows = tables.batches.rows
    bc = {c: i for i, c in enumerate(tables.batches.columns)}
    seen: set[Any] = set()
    for i, span in enumerate(tables.batch_spans):
        a = span.attrs or {}
        row = brows[i]
        bid, proc, start = row[bc["batch_id"]], row[bc["proc"]], row[bc["start_ns"]]
        for rid in a.get("preempted") or ():
            out.append((rid, 0, start, "RUNNING", "PREEMPTED", bid, proc, None, "derived"))
        for e in a.get("reqs") or ():
            if e[0] not in seen:
                seen.add(e[0])
                out.append((e[0], 0, start, "WAITING", "RUNNING", bid, proc, None, "derived"))
            elif len(e) > 5 and e[5]:
                out.append((e[0], 0, start, "PREEMPTED", "RUNNING", bid, proc, None, "derived"))
        end = row[bc["update_end_ns"]] or row[bc["end_ns"]]
        for item in tables.batch_finished[i]:
            reason = item[1] if isinstance(item, list | tuple) and len(item) > 1 else None
            to = f"FINISHED_{str(reason).upper()}" if reason else "FINISHED"
            out.append((_rid_of(item), 0, end, "RUNNING", to, bid, proc, None, "derived"))
    return out


def build_state_transitions(idx: RecordIndex, tables: AnalysisTables) -> Table:
    per_rid: dict[Any, list[tuple[Any, ...]]] = {}
    req = tables.requests
    ci = {c: i for i, c in enumerate(req.columns)}
    for r in req.rows:
        if r[ci["engine_arrival_ns"]] is not None:
            per_rid[r[ci["rid"]]] = [(r[ci["rid"]], 0, r[ci["engine_arrival_ns"]], "NEW", "WAITING", None,
                                      r[ci["proc"]], None, "enqueue")]
    states = idx.events("Request", "state")
    for e in states:
        a = e.attrs or {}
        per_rid.setdefault(a.get("rid"), []).append(
            (a.get("rid"), 0, e.ts_ns, a.get("from"), a.get("to"), a.get("batch_id"), e.proc, None, "event"))
    if not states:
        for t in _derived_transitions(tables):
            per_rid.setdefault(t[0], []).append(t)
    rows: list[tuple[Any, ...]] = []
    for rid_rows in per_rid.values():
        rid_rows.sort(key=lambda t: t[2])
        prev: int | None = None
        for seq, t in enumerate(rid_rows):
            dt = (t[2] - prev) / MS if prev is not None else None
            rows.append((t[0], seq, t[2], t[3], t[4], t[5], t[6], dt, t[8]))
            prev = t[2]
    return Table("state_transitions", list(STATE_COLUMNS), rows)


def iter_request_states(tables: AnalysisTables,
                        proc_labels: Sequence[Any] | None = None) -> Iterator[tuple[Any, ...]]:
    """Per-iteration request states (ITERATION_COLUMNS), batch by batch, streamed. With `proc_labels`
    the proc column holds `proc_labels[proc]` instead of the process index."""
    from .entries import iter_chunk_rows, iter_entry_chunks

    for chunk in iter_entry_chunks(tables):
        if proc_labels is not None:
            chunk.proc = list(map(proc_labels.__getitem__, chunk.proc))
            chunk.preempted = [(b, (*r[:2], proc_labels[r[2]], *r[3:])) for b, r in chunk.preempted]
        yield from iter_chunk_rows(chunk)
