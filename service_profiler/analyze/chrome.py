"""Chrome / Perfetto trace export: `write_chrome_trace(run, tables, out_path)`.

Timestamps: `ts`/`dur` are microseconds (floats, 3 decimals = ns) *relative to one origin*,
`metadata.origin_epoch_ns` (the run's first timestamp floored to a whole second). Absolute epoch
microseconds (~1.7e15) do not fit ns precision in a double (the spacing there is 0.25 µs), so adjacent
slices could round into partial overlap; one origin shared by every process keeps multi-host runs
aligned, since `RunData` timestamps are already clock-aligned epoch ns. Perfetto reads a number `ts`
back as `llround(ts * 1000)` ns, which recovers every value written here exactly. `displayTimeUnit`
stays "ms": Perfetto takes "ns" to mean the timestamps themselves are ns, chrome://tracing does not.

Layout, read by Perfetto and chrome://tracing alike:
- one process per raw file, pid = file index + 1 (real pids can repeat across hosts), named
  "<role> <host>:<pid>", sorted APIServer, Requests, EngineCore, workers;
- tids are small integers unique in the whole trace (Perfetto keys threads by tid, so a tid reused in
  two processes would split tracks); the thread name keeps the real tid;
- spans are `X` slices; a span that partially overlaps another on its thread (possible when two probes
  time overlapping code) goes to an "overlap" lane of that thread instead of breaking the nesting;
- events are thread-scoped instants, except per-request-per-step `KVCache.allocate`, which the kvcache
  counter already shows (counted in metadata.folded_events), and at most MAX_INSTANTS_PER_NAME each;
- counters (`C`, one series per args key): every recorded counter, plus `tokens` per scheduler step and,
  where a process recorded none, `kvcache`/`queues` from the schedule span attributes;
- a synthetic "Requests" process with one thread per request: a `request` slice (arrival to
  completion) holding adjacent `queued`/`prefill`/`decode`/`preempted` slices; where the HTTP server
  was recorded, the slice runs from the HTTP arrival to the last byte written, with `http receive` and
  `preprocess` before the engine's phases, `respond` after them, a `first token sent` instant, and
  `ttft_ms`/`e2e_ms` in its args (the request table's client-facing values). Threads rather than
  async b/e tracks because Perfetto names and orders threads reliably and X nesting stays checkable;
- one flow per request (one `s` + one `f`): from its lifecycle track to the first batch that ran it.
  A flow step per batch would grow the trace with every step of every request.
"""

from __future__ import annotations

import gc
import json
import shutil
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TextIO

from service_profiler.analyze.request_tracks import (
    RequestLifecycle,
    first_seen,
    http_marks,
    read_request_events,
    request_phases,
)
from service_profiler.outputs import create_temp, open_output
from service_profiler.rawdata.fastjson import encode_events

if TYPE_CHECKING:
    from service_profiler.rawdata.rawfile import RunData, SpanRecord

TraceEvent = dict[str, Any]

MAX_INSTANTS_PER_NAME = 20_000
SCHEDULE_SPAN = "batchFrameworkProcessing"
# Where a step ends, best first (DESIGN.md vocabulary): the request table's engine-side first token.
STEP_END_SPANS = ("updateFromOutput", "step", "modelExec")
# Shown by the kvcache counter; one per request per step would dominate the file.
FOLDED_EVENTS = frozenset({("KVCache", "allocate")})
_ROLE_SORT = (("api", 0), ("engine", 2), ("worker", 3))
_REQUESTS_SORT, _OTHER_SORT = 1, 4
_CHUNK = 20_000
_PLAIN = frozenset({int, str, bool, type(None)})
_NONE: tuple[Any, ...] = ()
_NO_ARGS: dict[str, Any] = {}  # shared by every event without attributes: events are only encoded
_START, _END = itemgetter(3), itemgetter(4)  # SpanRecord.start_ns, .end_ns


def write_chrome_trace(run: RunData, tables: object | None, out_path: Path) -> None:
    """Write `run` as a Chrome trace-event JSON object to `out_path`.

    `tables` is accepted for symmetry with the other exporters and not read: the trace shows what
    was recorded, derived from `run` alone, so it stays usable when table building fails.

    The file holds exactly `build_chrome_trace(run)`, but events are encoded as they are made, a chunk
    at a time, into a side file (their process/thread metadata, which must come first, is only known
    at the end): a long run's million event dicts never exist at once.
    """
    out_path = Path(out_path)
    # the spill is read back: a file of our own (O_EXCL, mode 0600), never one found at a known name
    spill_fd, spill_path = create_temp(out_path.parent, out_path.name + ".events", 0o600)
    try:
        with _no_cyclic_gc(), open(spill_fd, "w", encoding="utf-8") as spill:
            trace, builder = _build(run, spill)
        # bytes: the spilled events are copied as they are, not decoded and encoded again
        with open_output(out_path, "wb") as out, spill_path.open("rb") as spilled:
            out.write(b'{"traceEvents":[')
            out.write(encode_events(trace.pop("traceEvents")).encode())
            if builder.spilled:
                out.write(b",")
                shutil.copyfileobj(spilled, out, 1 << 20)
            if builder.events:
                out.write(("," + encode_events(builder.events)).encode())
            out.write(b"],")
            out.write(json.dumps(trace, separators=(",", ":"))[1:].encode())
    finally:
        spill_path.unlink(missing_ok=True)


@contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """The export allocates one dict per trace event and no cycles; with the collector on, each
    allocation threshold walks every record object of the run, which doubled the export time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def build_chrome_trace(run: RunData) -> dict[str, Any]:
    """The trace as a JSON-ready object (see the module docstring for the layout)."""
    trace, builder = _build(run, None)
    trace["traceEvents"] += builder.events
    return trace


def _build(run: RunData, spill: TextIO | None) -> tuple[dict[str, Any], _TraceBuilder]:
    """The trace with only the metadata events in traceEvents; the others are `builder.events` (those
    not yet written to `spill`, when given, after the ones that were)."""
    origin = _origin_ns(run)
    builder = _TraceBuilder(run, origin, spill)
    builder.add_spans()
    builder.add_counters()
    lifecycles = builder.add_batches()
    builder.add_instants()
    builder.add_requests(lifecycles)
    return {
        "traceEvents": builder.metadata_events(),
        "displayTimeUnit": "ms",
        "metadata": {
            "generator": "service-profiler",
            "origin_epoch_ns": origin,
            "origin_utc": datetime.fromtimestamp(origin / 1e9, tz=timezone.utc).isoformat(),
            "time_convention": "ts/dur: microseconds since origin_epoch_ns",
            "processes": [p.key for p in run.processes],
            "dropped_records": sum(p.dropped for p in run.processes),
            "reader_problems": len(run.problems),
            "overlap_lanes": builder.overlap_lanes,
            "malformed_batches": builder.bad_batches,
            "folded_events": builder.folded,
            "omitted_instants": builder.omitted,
        },
    }, builder


def _origin_ns(run: RunData) -> int:
    # Every list is sorted by time, so its first element is its earliest.
    heads = [run.spans[0].start_ns if run.spans else None, run.events[0].ts_ns if run.events else None,
             run.counters[0].ts_ns if run.counters else None, min((s[1] for s in run.states), default=None)]
    first = min((t for t in heads if t is not None), default=0)
    return first - first % 1_000_000_000


def _compact(attrs: dict[str, Any] | None) -> dict[str, Any]:
    """Scalar attributes as they are, containers as `n_<key>` lengths: a batch's request list would
    otherwise be most of the file. Runs once per span and event, hence the C-speed scan first."""
    if not attrs:
        return _NO_ARGS
    if _PLAIN.issuperset(map(type, attrs.values())):
        return attrs  # shared, not copied: the trace only encodes it
    odd = [k for k, v in attrs.items() if type(v) not in _PLAIN]
    out = dict(attrs)
    for key in odd:
        value = out.pop(key)
        if type(value) is float:
            out[key] = round(value, 6) if value - value == 0 else str(value)  # nan/inf are not JSON
        elif isinstance(value, (list, tuple, dict)):
            out["n_" + key] = len(value)
    return out


def _numbers(values: dict[str, Any]) -> dict[str, Any]:
    """The finite numeric series of a counter; anything else would make the C event invalid."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        kind = type(value)
        if kind is int:
            out[key] = value
        elif kind is float and value - value == 0:
            out[key] = round(value, 6)
    return out


class _Placed(NamedTuple):
    pid: int
    tid: int


class _TraceBuilder:
    def __init__(self, run: RunData, origin: int, spill: TextIO | None = None) -> None:
        self.run = run
        self.origin = origin
        self.events: list[TraceEvent] = []
        self.spill = spill
        self.spilled = False
        self.threads: dict[tuple[int, int, int], int] = {}  # (proc, raw tid, lane) -> tid
        self.thread_names: list[tuple[int, int, str, int]] = []  # pid, tid, name, sort
        self.placed: dict[int, _Placed] = {}  # id(span) -> where it was drawn
        self.overlap_lanes = 0
        self.bad_batches = 0
        self.last_sample: dict[tuple[int, str], dict[str, Any]] = {}
        self.folded: dict[str, int] = {}
        self.omitted: dict[str, int] = {}
        self.requests_pid = len(run.processes) + 1

    def _flush(self) -> None:
        """Encode the pending events into the spill file (when there is one and they are many)."""
        if self.spill is not None and len(self.events) >= _CHUNK:
            self.spill.write(("," if self.spilled else "") + encode_events(self.events))
            self.spilled = True
            self.events.clear()  # the same list: loops hold its bound append

    def _us(self, ns: int) -> float:
        return (ns - self.origin) / 1000

    def _tid(self, proc: int, raw_tid: int, lane: int = 0) -> int:
        key = (proc, raw_tid, lane)
        tid = self.threads.get(key)
        if tid is None:
            tid = self.threads[key] = len(self.threads) + 1
            pinfo = self.run.processes[proc]
            label = "main" if raw_tid == pinfo.pid else "thread"
            suffix = f" overlap {lane}" if lane else ""
            # Real tid order, each thread's overlap lanes right below it.
            sort = raw_tid * 8 + lane if type(raw_tid) is int else lane
            self.thread_names.append((proc + 1, tid, f"{label} {raw_tid}{suffix}", sort))
        return tid

    def metadata_events(self) -> list[TraceEvent]:
        meta: list[TraceEvent] = []

        def proc(pid: int, name: str, sort: int, labels: str = "") -> None:
            meta.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": name}})
            meta.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0,
                         "args": {"sort_index": sort}})
            if labels:
                meta.append({"ph": "M", "name": "process_labels", "pid": pid, "tid": 0,
                             "args": {"labels": labels}})

        for p in self.run.processes:
            role = str(p.role or "process")
            rank = next((r for needle, r in _ROLE_SORT if needle in role.lower()), _OTHER_SORT)
            # Drops are recorded in the trace, never hidden (Perfetto shows process labels).
            proc(p.index + 1, f"{role} {p.key}", rank * 10_000 + p.index,
                 f"dropped {p.dropped} records" if p.dropped else "")
        if any(pid == self.requests_pid for pid, *_ in self.thread_names):
            proc(self.requests_pid, "Requests", _REQUESTS_SORT * 10_000)
        for pid, tid, name, sort in self.thread_names:
            meta.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}})
            meta.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid,
                         "args": {"sort_index": sort}})
        return meta

    def add_spans(self) -> None:
        by_thread: dict[tuple[int, int], list[SpanRecord]] = defaultdict(list)
        for span in self.run.spans:
            by_thread[(span.proc, span.tid)].append(span)
        origin, events, placed, compact = self.origin, self.events, self.placed, _compact
        append = events.append
        for (proc, raw_tid), spans in by_thread.items():
            # (start, -end) order from two C-keyed stable sorts: outer slices before the ones they hold
            spans.sort(key=_END, reverse=True)
            spans.sort(key=_START)
            pid, main_tid = proc + 1, self._tid(proc, raw_tid)
            stack: list[int] = []  # ends of the slices still open on the thread's own track
            overlaps: list[list[int]] = []  # the same, per overlap lane
            for span in spans:
                _, domain, name, start, end, _, attrs = span
                if end < start:
                    end = start
                while stack and stack[-1] <= start:
                    stack.pop()
                if not stack or end <= stack[-1]:
                    stack.append(end)
                    tid = main_tid
                else:
                    tid = self._tid(proc, raw_tid, 1 + _place(overlaps, start, end))
                if name == SCHEDULE_SPAN:
                    placed[id(span)] = _Placed(pid, tid)
                append({"ph": "X", "name": name, "cat": domain, "pid": pid, "tid": tid,
                        "ts": (start - origin) / 1000, "dur": (end - start) / 1000,
                        "args": compact(attrs)})
                if len(events) >= _CHUNK:
                    self._flush()
            self.overlap_lanes += len(overlaps)

    def _counter(self, proc: int, name: str, cat: str, ts_ns: int, values: dict[str, Any]) -> None:
        args = _numbers(values)
        # A counter track holds its value until the next sample, so a repeat draws nothing new; in a
        # steady decode phase most steps repeat the queues, kvcache and tokens of the step before.
        if args and self.last_sample.get((proc, name)) != args:
            self.last_sample[(proc, name)] = args
            self.events.append({"ph": "C", "name": name, "cat": cat, "pid": proc + 1,
                                "ts": (ts_ns - self.origin) / 1000, "args": args})

    def add_counters(self) -> None:
        events = self.events
        for c in self.run.counters:
            self._counter(c.proc, c.name, c.domain, c.ts_ns, c.values)
            if len(events) >= _CHUNK:
                self._flush()

    def add_batches(self) -> dict[Any, RequestLifecycle]:
        """One pass over the scheduler steps: the `tokens` counter, `kvcache`/`queues` where the process
        recorded none, and each request's batch membership."""
        recorded = {(c.proc, c.name) for c in self.run.counters}
        # Keyed by the rid as recorded: str() per batch entry would cost more than the rest of the loop.
        life: dict[Any, RequestLifecycle] = defaultdict(RequestLifecycle)
        step_end = self._step_ends()
        for span in self.run.spans:
            a = span.attrs
            if span.name != SCHEDULE_SPAN or not a:
                continue
            tokens = [0, 0]
            try:
                _, done = step_end.get((span.proc, a.get("batch_id", -1)), (0, span.end_ns))
                done = max(done, span.start_ns)
                for entry in a.get("reqs") or _NONE:
                    phase = 1 if entry[1] else 0
                    tokens[phase] += entry[2]
                    lc = life[entry[0]]
                    if not lc.batches:
                        placed = self.placed.get(id(span))
                        lc.first_batch = (*placed, span.start_ns, span.end_ns) if placed else None
                    if phase != lc.phase or (not phase and len(entry) > 5 and entry[5]):
                        lc.changed(span.start_ns, phase)
                    lc.last_done = done
                    lc.batches += 1
                for rid in a.get("preempted") or _NONE:
                    life[rid].preempted(span.end_ns)
            except (TypeError, IndexError):  # a malformed step costs itself, not the export
                self.bad_batches += 1
                continue
            self._counter(span.proc, "tokens", span.domain, span.start_ns,
                          {"total": a.get("total_tokens", sum(tokens)), "prefill": tokens[0],
                           "decode": tokens[1]})
            if (span.proc, "kvcache") not in recorded and "kv_total_blocks" in a:
                self._counter(span.proc, "kvcache", "KVCache", span.start_ns,
                              {"total_blocks": a.get("kv_total_blocks"),
                               "used_blocks": a.get("kv_used_blocks"), "usage": a.get("kv_usage")})
            if (span.proc, "queues") not in recorded and "running" in a:
                self._counter(span.proc, "queues", span.domain, span.start_ns,
                              {"running": a.get("running"), "waiting": a.get("waiting")})
            if len(self.events) >= _CHUNK:
                self._flush()
        return life

    def _step_ends(self) -> dict[tuple[int, Any], tuple[int, int]]:
        """(proc, batch_id) -> (rank in STEP_END_SPANS, end) of the best span that ends that step."""
        rank_of = {name: rank for rank, name in enumerate(STEP_END_SPANS)}
        ends: dict[tuple[int, Any], tuple[int, int]] = {}
        for s in self.run.spans:
            rank = rank_of.get(s.name)
            if rank is not None and s.attrs and type(bid := s.attrs.get("batch_id")) is int:
                key = (s.proc, bid)
                if key not in ends or rank < ends[key][0]:
                    ends[key] = (rank, s.end_ns)
        return ends

    def add_instants(self) -> None:
        counts: dict[str, int] = defaultdict(int)
        for e in self.run.events:
            key = f"{e.domain}/{e.name}"
            if (e.domain, e.name) in FOLDED_EVENTS:
                self.folded[key] = self.folded.get(key, 0) + 1
                continue
            counts[key] += 1
            if counts[key] > MAX_INSTANTS_PER_NAME:
                self.omitted[key] = counts[key] - MAX_INSTANTS_PER_NAME
                continue
            self.events.append({"ph": "i", "s": "t", "name": e.name, "cat": e.domain, "pid": e.proc + 1,
                                "tid": self._tid(e.proc, e.tid), "ts": self._us(e.ts_ns),
                                "args": _compact(e.attrs)})
            if len(self.events) >= _CHUNK:
                self._flush()
        for proc, ts_ns, enabled, reason in self.run.states:
            pinfo = self.run.processes[proc]
            self.events.append({"ph": "i", "s": "p", "name": "collection " + ("on" if enabled else "off"),
                                "cat": "profiler", "pid": proc + 1, "tid": self._tid(proc, pinfo.pid),
                                "ts": self._us(ts_ns), "args": {"reason": reason}})

    def add_requests(self, life: dict[Any, RequestLifecycle]) -> None:
        read_request_events(life, self.run.events)
        order = sorted(life.items(), key=lambda kv: (first_seen(kv[1]), str(kv[0])))
        for n, (rid, lc) in enumerate(order):
            phases = request_phases(lc)
            if not phases:
                continue
            tid = len(self.threads) + 1
            self.threads[(-1, n, 0)] = tid
            self.thread_names.append((self.requests_pid, tid, f"req {rid}", n))
            start, end = phases[0][1], phases[-1][2]
            args = {"rid": rid, **{k: v for k, v in lc.args.items() if v is not None},
                    "preemptions": sum(1 for p in phases if p[0] == "preempted"), "batches": lc.batches}
            marks = http_marks(lc)
            if marks is not None:
                args.update(_client_view(*marks))
            self._slice("request", tid, start, end, args)
            for name, p_start, p_end in phases:
                self._slice(name, tid, p_start, p_end, None)
            if marks is not None and marks[1] is not None:
                self.events.append({"ph": "i", "s": "t", "name": "first token sent", "cat": "request",
                                    "pid": self.requests_pid, "tid": tid, "ts": self._us(marks[1])})
            if lc.first_batch is not None and phases[0][0] == "queued":
                self._flow(n + 1, tid, phases[0], lc.first_batch)
            if len(self.events) >= _CHUNK:
                self._flush()

    def _flow(self, flow_id: int, tid: int, queued: tuple[str, int, int],
              batch: tuple[int, int, int, int]) -> None:
        """Arrival -> first batch. Mid-slice timestamps bind each end to its own slice rather than to a
        neighbour starting at the same instant."""
        pid, batch_tid, b_start, b_end = batch
        s_ts, f_ts = (queued[1] + queued[2]) // 2, b_start + (b_end - b_start) // 2
        if s_ts > f_ts:  # skew between hosts: a backwards arrow would mislead more than none
            return
        common = {"name": "first batch", "cat": "request", "id": flow_id}
        self.events.append({"ph": "s", **common, "pid": self.requests_pid, "tid": tid, "ts": self._us(s_ts)})
        self.events.append({"ph": "f", "bp": "e", **common, "pid": pid, "tid": batch_tid,
                            "ts": self._us(f_ts)})

    def _slice(self, name: str, tid: int, start: int, end: int, args: dict[str, Any] | None) -> None:
        event: TraceEvent = {"ph": "X", "name": name, "cat": "request", "pid": self.requests_pid,
                             "tid": tid, "ts": self._us(start), "dur": (end - start) / 1000}
        if args:
            event["args"] = args
        self.events.append(event)


def _client_view(arrival: int, first_sent: int | None, last_sent: int | None) -> dict[str, Any]:
    """TTFT and e2e as the request table defines them where the HTTP server was recorded."""
    view: dict[str, Any] = {"arrival": "http"}
    if first_sent is not None:
        view["ttft_ms"] = (first_sent - arrival) / 1e6
    if last_sent is not None:
        view["e2e_ms"] = (last_sent - arrival) / 1e6
    return view


def _place(ends: list[list[int]], start: int, end: int) -> int:
    """The first lane where [start, end] nests; `ends` holds each lane's open slice ends."""
    for lane, stack in enumerate(ends):
        while stack and stack[-1] <= start:
            stack.pop()
        if not stack or end <= stack[-1]:
            stack.append(end)
            return lane
    ends.append([end])
    return len(ends) - 1
