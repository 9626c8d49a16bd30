"""Analysis tables built from a `RunData` (docs/DESIGN.md "Analysis tables").

All timestamps are epoch ns (the reader has clock-aligned every process); durations are ms as float;
a missing value is `None` (NaN in `Table.column`).

Batch table: one row per `BatchSchedule/batchFrameworkProcessing` span (one scheduler step).
  - `start_ns`/`end_ns`/`schedule_ms`: that span (the time `Scheduler.schedule` took).
  - `model_run_ms`: the `ModelExecute/modelExec` span with the same batch_id, looked up in the same
    process first, then by (hostname, dp_rank) (the executor may record in a worker process); when
    several spans share the key the longest (outermost) one is kept.
  - `step_ms`: the `EngineCore/step` span with that batch_id (same lookup); `update_ms` likewise for
    `updateFromOutput`.
  - phase counts / tokens / chunk sizes from the span's `reqs` list (phase 0 = prefill, 1 = decode).
  - `num_finished`: requests the step's `updateFromOutput` reported finished (else the span's `finished`).
  - `blocks_allocated`/`blocks_freed`: `KVCache/allocate`/`free` blocks of the same process whose time
    falls in [this batch's start, the next batch's start).
  - `batch_type`: "Prefill", "Decode", "Prefill,Decode" (msserviceprofiler's spelling), or "" when empty.

Request table: one row per engine request id (`rid`). Timestamps and which process records them:
  - `arrival_ns`: `Request/httpReq` event (API server); falls back to `engine_arrival_ns`.
  - `engine_arrival_ns`: first `Request/enqueue` event (EngineCore, `Scheduler.add_request`).
  - `first_scheduled_ns`: start of the first batch span whose `reqs` contains the rid (EngineCore; the
    same instant vLLM stamps its SCHEDULED event).
  - `first_token_ns`: first `Request/tokens` event (API server) with new_tokens > 0 for the rid;
    without API-server data, the end of the `updateFromOutput` (else `step`) span of the batch in which
    the rid's prefill completed (EngineCore). `timing_source` says which ("api" / "engine").
  - `completion_ns`: the API `tokens` event that marks the rid finished, else its `httpRes` event, else
    the end of the `updateFromOutput` span that reported it finished.
  - `queue_ms` = first_scheduled − engine_arrival; `ttft_ms` = first_token − arrival;
    `prefill_ms` = first_token − first_scheduled; `decode_ms` = completion − first_token;
    `e2e_ms` = completion − arrival; `tpot_ms` = decode_ms / (output_tokens − 1) when output_tokens > 1.
  - except where the HTTP server was recorded (`Request/httpExchange`): there `arrival_ns` is when the
    request's first bytes were read, `ttft_ms` runs from it to the first token's bytes written and
    `e2e_ms` to the response's last byte written; the breakdown columns are appended
    (`request_breakdown`; definitions in docs/METRICS.md).
  - `input_tokens`: httpReq prompt_tokens, else enqueue prompt_tokens, else the batch entry's.
  - `output_tokens`: httpRes output_tokens, else the sum of new_tokens over the API tokens events.
  - `preemptions`: transitions to PREEMPTED (state events), or batch `preempted` lists when larger.
  - `prefix_hit_tokens`/`cache_hit_rate`: first `KVCache/cacheHit` event (hit / query tokens).
  - `kv_blocks`: peak blocks held (running sum of allocate minus free events).
  - `finish_reason`: httpRes, else API tokens, else updateFromOutput, else the FINISHED_* state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

import numpy as np

from service_profiler.rawdata.rawfile import CounterRecord, EventRecord, RunData, SpanRecord

MS = 1e6




@dataclass
class Table:
    """A named table: column names and row tuples. `column()` gives numpy arrays for numeric work."""

    name: str
    columns: list[str]
    rows: list[tuple[Any, ...]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def index(self, column: str) -> int:
        return self.columns.index(column)

    def values(self, column: str) -> list[Any]:
        i = self.columns.index(column)
        return [r[i] for r in self.rows]

    def column(self, column: str) -> np.ndarray:
        """float64 (None -> NaN) for numeric columns; an object array for text and lists."""
        values = list(map(itemgetter(self.columns.index(column)), self.rows))
        sample = next((v for v in values if v is not None), None)
        if sample is None or isinstance(sample, bool | int | float):
            if None in values:
                nan = math.nan
                values = [nan if v is None else v for v in values]
            return np.array(values, dtype=np.float64)  # from the list in C: no generator frame per value
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out

    def numeric_columns(self, names: Collection[str] | None = None) -> dict[str, np.ndarray]:
        """Every column (of `names`, when given) whose values are numbers (or all missing), as float64
        arrays."""
        cols: dict[str, np.ndarray] = {}
        for name in self.columns:
            if names is not None and name not in names:
                continue
            arr = self.column(name)
            if arr.dtype == np.float64:
                cols[name] = arr
        return cols

    def dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, r, strict=True)) for r in self.rows]


BATCH_COLUMNS = [
    "batch_id", "dp_rank", "proc", "start_ns", "end_ns", "schedule_ms", "model_run_ms", "step_ms",
    "batch_size", "num_prefill_reqs", "num_decode_reqs", "prefill_tokens", "decode_tokens",
    "total_scheduled_tokens", "prefill_chunk_sizes", "decode_chunk_sizes", "avg_prefill_chunk",
    "min_prefill_chunk", "max_prefill_chunk", "avg_decode_chunk", "running", "waiting", "kv_total_blocks",
    "kv_used_blocks", "kv_free_blocks", "kv_usage", "num_preempted", "num_finished", "batch_type",
    # extras beyond DESIGN.md
    "model_start_ns", "model_end_ns", "update_ms", "update_end_ns", "blocks_allocated", "blocks_freed",
    "num_resumed",
]

REQUEST_COLUMNS = [
    "rid", "api_rid", "arrival_ns", "engine_arrival_ns", "first_scheduled_ns", "first_token_ns",
    "completion_ns", "queue_ms", "prefill_ms", "decode_ms", "ttft_ms", "tpot_ms", "e2e_ms", "input_tokens",
    "output_tokens", "preemptions", "prefix_hit_tokens", "kv_blocks", "finish_reason",
    # extras beyond DESIGN.md
    "cache_hit_rate", "num_iterations", "first_batch_id", "dp_rank", "proc", "timing_source",
]

KVCACHE_COLUMNS = [
    "ts_ns", "proc", "dp_rank", "domain", "name", "rid", "total_blocks", "used_blocks", "free_blocks",
    "blocks_allocated", "blocks_freed", "usage",
]


@dataclass
class AnalysisTables:
    batches: Table
    requests: Table
    kvcache: Table
    events: Table
    state_transitions: Table
    # the batch spans behind `batches.rows`, row for row: per-request rows are streamed from them
    batch_spans: list[SpanRecord] = field(default_factory=list)
    batch_finished: list[list[Any]] = field(default_factory=list)


# The analysis tables stored under their own names (profiler.db, the per-table CSVs): table name ->
# AnalysisTables attribute.
STORED_TABLES = {"kvcache": "kvcache", "state_transition": "state_transitions", "lifecycle_event": "events"}


class RecordIndex:
    """The run's records grouped by (domain, name) in one pass, each group still time ordered."""

    def __init__(self, run: RunData) -> None:
        self.run = run
        self._spans: dict[tuple[str, str], list[SpanRecord]] = {}
        self._events: dict[tuple[str, str], list[EventRecord]] = {}
        self._counters: dict[tuple[str, str], list[CounterRecord]] = {}
        for groups, records in ((self._spans, run.spans), (self._events, run.events),
                                (self._counters, run.counters)):
            get = groups.get
            for r in records:
                key = (r[1], r[2])
                group = get(key)
                if group is None:
                    group = groups[key] = []
                group.append(r)  # type: ignore[arg-type]

    def spans(self, domain: str, name: str) -> list[SpanRecord]:
        return self._spans.get((domain, name), [])

    def events(self, domain: str, name: str) -> list[EventRecord]:
        return self._events.get((domain, name), [])

    def counters(self, domain: str, name: str) -> list[CounterRecord]:
        return self._counters.get((domain, name), [])


def _dp_rank(run: RunData, proc: int, attrs: dict[str, Any]) -> int:
    """dp_rank from the record, else from the process's `meta`, else 0."""
    dp = attrs.get("dp_rank")
    if dp is None and 0 <= proc < len(run.processes):
        dp = run.processes[proc].meta.get("dp_rank", 0)
    try:
        return int(dp)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0


class _BatchLookup:
    """batch_id -> span of one kind (modelExec, step, updateFromOutput). Looked up in the batch's own
    process first; the (hostname, dp_rank) index, for spans recorded by another process (an executor
    worker), is built only when that misses. Several spans for one key: the longest (outermost) wins."""

    def __init__(self, run: RunData, spans: list[SpanRecord]) -> None:
        self.run, self.spans = run, spans
        self.by_proc = self._index(lambda s, bid: (s.proc, bid))
        self.by_dp: dict[tuple[Any, ...], SpanRecord] | None = None

    def _index(self, key_of: Callable[[SpanRecord, Any], tuple[Any, ...]]) -> dict[tuple[Any, ...], SpanRecord]:
        index: dict[tuple[Any, ...], SpanRecord] = {}
        for s in self.spans:
            bid = s.attrs.get("batch_id") if s.attrs else None
            if bid is None:
                continue
            key = key_of(s, bid)
            old = index.get(key)
            if old is None or s.end_ns - s.start_ns > old.end_ns - old.start_ns:
                index[key] = s
        return index

    def get(self, proc: int, host: str, dp: int, bid: Any) -> SpanRecord | None:
        found = self.by_proc.get((proc, bid))
        if found is None and self.spans:
            if self.by_dp is None:
                run = self.run
                hosts = [p.hostname for p in run.processes]
                self.by_dp = self._index(lambda s, b: (hosts[s.proc], _dp_rank(run, s.proc, s.attrs or {}), b))
            found = self.by_dp.get((host, dp, bid))
        return found


def _ms(a: int | None, b: int | None) -> float | None:
    return None if a is None or b is None else (b - a) / MS


def _kv_per_batch(idx: RecordIndex, spans: list[SpanRecord]) -> tuple[np.ndarray, np.ndarray]:
    """Blocks allocated / freed by KVCache events between each batch's start and the next's (same proc)."""
    out = {"allocate": np.zeros(len(spans), dtype=np.int64), "free": np.zeros(len(spans), dtype=np.int64)}
    by_proc: dict[int, list[int]] = {}
    for i, s in enumerate(spans):
        by_proc.setdefault(s.proc, []).append(i)
    starts = {proc: np.fromiter((spans[i].start_ns for i in rows), dtype=np.int64, count=len(rows))
              for proc, rows in by_proc.items()}
    for name, acc in out.items():
        found: dict[int, tuple[list[int], list[int]]] = {}
        for e in idx.events("KVCache", name):
            b = e.attrs.get("blocks") if e.attrs else None
            if isinstance(b, int):
                ts_list, blocks = found.setdefault(e.proc, ([], []))
                ts_list.append(e.ts_ns)
                blocks.append(b)
        for proc, (ts_list, blocks) in found.items():
            if proc not in by_proc:
                continue
            pos = np.searchsorted(starts[proc], np.asarray(ts_list, dtype=np.int64), side="right") - 1
            ok = pos >= 0
            rows = np.asarray(by_proc[proc], dtype=np.int64)
            np.add.at(acc, rows[pos[ok]], np.asarray(blocks, dtype=np.int64)[ok])
    return out["allocate"], out["free"]


def _count_resumed(reqs: Any) -> int:
    try:
        return sum(map(_RESUMED, reqs))
    except (IndexError, TypeError):  # entries written without the resumed flag
        return sum(1 for e in reqs if len(e) > 5 and e[5])


_RESUMED = itemgetter(5)


def build_batch_table(idx: RecordIndex) -> tuple[Table, list[SpanRecord], list[list[Any]]]:
    run = idx.run
    spans = idx.spans("BatchSchedule", "batchFrameworkProcessing")
    model_idx = _BatchLookup(run, idx.spans("ModelExecute", "modelExec"))
    step_idx = _BatchLookup(run, idx.spans("EngineCore", "step"))
    upd_idx = _BatchLookup(run, idx.spans("BatchSchedule", "updateFromOutput"))
    alloc, freed = _kv_per_batch(idx, spans)
    hosts = [p.hostname for p in run.processes]
    rows: list[tuple[Any, ...]] = []
    finished_lists: list[list[Any]] = []
    for i, s in enumerate(spans):
        a = s.attrs or {}
        bid = a.get("batch_id")
        dp = _dp_rank(run, s.proc, a)
        host = hosts[s.proc]
        reqs = a.get("reqs") or ()
        pf = [e[2] for e in reqs if e[1] == 0]
        dc = [e[2] for e in reqs if e[1] != 0]
        m = st = up = None
        if bid is not None:
            m = model_idx.get(s.proc, host, dp, bid)
            st = step_idx.get(s.proc, host, dp, bid)
            up = upd_idx.get(s.proc, host, dp, bid)
        finished = (up.attrs or {}).get("finished") if up is not None else None
        if finished is None:
            finished = a.get("finished") or []
        finished_lists.append(finished)
        pf_tok, dc_tok = sum(pf), sum(dc)
        total = a.get("total_tokens")
        kv_total, kv_used = a.get("kv_total_blocks"), a.get("kv_used_blocks")
        kv_free = kv_total - kv_used if isinstance(kv_total, int) and isinstance(kv_used, int) else None
        btype = "Prefill,Decode" if pf and dc else "Prefill" if pf else "Decode" if dc else ""
        rows.append((
            bid, dp, s.proc, s.start_ns, s.end_ns, (s.end_ns - s.start_ns) / MS,
            _ms(m.start_ns, m.end_ns) if m else None, _ms(st.start_ns, st.end_ns) if st else None,
            len(reqs), len(pf), len(dc), pf_tok, dc_tok, total if total is not None else pf_tok + dc_tok,
            tuple(pf), tuple(dc), pf_tok / len(pf) if pf else None, min(pf) if pf else None,
            max(pf) if pf else None, dc_tok / len(dc) if dc else None, a.get("running"), a.get("waiting"),
            kv_total, kv_used, kv_free, a.get("kv_usage"), len(a.get("preempted") or ()), len(finished),
            btype, m.start_ns if m else None, m.end_ns if m else None,
            _ms(up.start_ns, up.end_ns) if up else None, up.end_ns if up else None, int(alloc[i]),
            int(freed[i]), _count_resumed(reqs),
        ))
    return Table("batch", list(BATCH_COLUMNS), rows), spans, finished_lists


def build_kvcache_table(idx: RecordIndex) -> Table:
    """KV rows: allocate/free events and `kvcache` counters, time ordered. Every row carries the
    process's latest known status (total/used/free/usage, forward-filled from the counter or, when a
    process has no counter, from its batch spans' kv_* attributes) next to its own allocated/freed
    blocks, so a mix of event kinds never zeroes the status."""
    run = idx.run
    items: list[tuple[int, int, int, str, Any, Any]] = []  # (ts, order, proc, name, rid, payload)
    procs_with_counter: set[int] = set()
    for c in idx.counters("KVCache", "kvcache"):
        items.append((c.ts_ns, 0, c.proc, "kvcache", None, c.values))
        procs_with_counter.add(c.proc)
    for s in idx.spans("BatchSchedule", "batchFrameworkProcessing"):
        a = s.attrs
        if s.proc not in procs_with_counter and a and a.get("kv_total_blocks") is not None:
            items.append((s.end_ns, 0, s.proc, "kvcache", None, {
                "total_blocks": a.get("kv_total_blocks"), "used_blocks": a.get("kv_used_blocks"),
                "usage": a.get("kv_usage")}))
    for name in ("allocate", "free"):
        for e in idx.events("KVCache", name):
            a = e.attrs or {}
            items.append((e.ts_ns, 1, e.proc, name, a.get("rid"), a.get("blocks")))
    items.sort(key=_TS_ORDER)
    status: dict[int, tuple[Any, Any, Any, Any]] = {}
    dp_of = [_dp_rank(run, p.index, {}) for p in run.processes]
    unknown = (None, None, None, None)
    rows: list[tuple[Any, ...]] = []
    for ts, _, proc, name, rid, payload in items:
        if name == "kvcache":
            total, used, usage = payload.get("total_blocks"), payload.get("used_blocks"), payload.get("usage")
            free = total - used if isinstance(total, int | float) and isinstance(used, int | float) else None
            if usage is None and free is not None and total:
                usage = used / total
            status[proc] = (total, used, free, usage)
            rows.append((ts, proc, dp_of[proc], "KVCache", name, None, total, used, free, 0, 0, usage))
        else:
            total, used, free, usage = status.get(proc, unknown)
            blocks = payload if isinstance(payload, int) else 0
            rows.append((ts, proc, dp_of[proc], "KVCache", name, rid, total, used, free,
                         blocks if name == "allocate" else 0, blocks if name == "free" else 0, usage))
    return Table("kvcache", list(KVCACHE_COLUMNS), rows)


_TS_ORDER = itemgetter(0, 1)


def build_tables(run: RunData, on_batches: Callable[[AnalysisTables], None] | None = None) -> AnalysisTables:
    """Build every analysis table of a run. `on_batches` is called once the batch and request tables are
    built (the others still empty), before the rest: analyze starts handing those over meanwhile."""
    from service_profiler.analyze import lifecycle
    from service_profiler.analyze.completeness import mark_tables
    from service_profiler.analyze.request_breakdown import add_breakdown
    from service_profiler.analyze.request_table import build_request_table

    idx = RecordIndex(run)
    batches, spans, finished = build_batch_table(idx)
    requests = add_breakdown(idx, build_request_table(idx, batches, spans, finished), batches, spans)
    tables = AnalysisTables(
        batches=batches, requests=requests, kvcache=Table("kvcache", list(KVCACHE_COLUMNS)),
        events=Table("events", list(lifecycle.EVENT_COLUMNS)),
        state_transitions=Table("state_transitions", list(lifecycle.STATE_COLUMNS)),
        batch_spans=spans, batch_finished=finished,
    )
    mark_tables(run, idx, tables)  # partly observed requests and batches: `complete`, `incomplete_reason`
    if on_batches is not None:
        on_batches(tables)
    tables.kvcache = build_kvcache_table(idx)
    tables.events = lifecycle.build_events(idx, tables)
    tables.state_transitions = lifecycle.build_state_transitions(idx, tables)
    return tables
