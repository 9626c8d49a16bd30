"""The scheduler-logging tables, built from the handlers' records of one engine process.

Times are integer nanoseconds since `t0` (collection starting in the engine process), durations in ns.

- per_request.csv: one row per request when the scheduler finishes it (at shutdown also the unfinished
  ones, `finish_reason` "unfinished"). arrival = `Scheduler.add_request`; first_scheduled = start of the
  first schedule step that included it; first_token = end of the model run that produced its first token;
  completion = the scheduler finishing it. waiting_time = first_scheduled - arrival, execution_time =
  completion - first_scheduled, e2e_latency = completion - arrival, ttft = first_token - arrival,
  tpot = (completion - first_token) / (output_tokens - 1), throughput = output tokens per second of
  e2e_latency. eviction_count: times its KV blocks were freed before its end (preemption by recompute);
  kv_cache_blocks: the most blocks it held; kv_cache_memory_bytes: those blocks' bytes.
- per_iteration.csv: one row per scheduler step: iteration_duration = the engine step, scheduling_overhead
  = `schedule()`, forward_pass_duration = the model run (`analyze`'s step_ms, schedule_ms, model_run_ms).
- per_iteration_requests.csv: per step, each scheduled request ("running", or "completed" when that step
  finished it), each request the step preempted ("preempted"), and, when the waiting-queue snapshot is on,
  each waiting request with its queue position and waiting reason.
- events.csv: request_arrived, request_scheduled, request_preempted, request_resumed, first_token,
  request_completed, in time order per flush.
- state_transitions.csv: NEW->WAITING at arrival, then vLLM's request states; time_in_from_state is the
  time since the request's previous transition.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .batch_join import BatchJoiner, JoinedBatch

PER_REQUEST = "per_request.csv"
PER_ITERATION = "per_iteration.csv"
PER_ITERATION_REQUESTS = "per_iteration_requests.csv"
EVENTS = "events.csv"
STATE_TRANSITIONS = "state_transitions.csv"

COLUMNS: dict[str, tuple[str, ...]] = {
    PER_REQUEST: ("request_id", "arrival_time", "first_scheduled_time", "first_token_time", "completion_time",
                  "waiting_time", "execution_time", "e2e_latency", "input_tokens", "output_tokens", "ttft", "tpot",
                  "throughput", "preemption_count", "eviction_count", "kv_cache_blocks", "kv_cache_memory_bytes",
                  "priority_score", "finish_reason"),
    PER_ITERATION: ("iteration_id", "start_time", "end_time", "iteration_duration", "scheduling_overhead",
                    "forward_pass_duration", "batch_size", "total_tokens", "prefill_tokens", "decode_tokens",
                    "num_prefill_reqs", "num_decode_reqs", "num_running_reqs", "num_waiting_reqs",
                    "num_preempted_reqs", "num_finished_reqs", "kv_cache_used", "kv_cache_total", "kv_cache_usage",
                    "dp_rank"),
    PER_ITERATION_REQUESTS: ("iteration_id", "request_id", "state", "queue_position", "waiting_reason", "phase",
                             "scheduled_tokens", "num_computed_tokens", "generated_tokens", "time_in_state"),
    # ts_ns: the same moment in Unix ns, the clock of `analyze`'s tables, to join the two.
    EVENTS: ("timestamp", "event_type", "request_id", "iteration_id", "details", "ts_ns"),
    STATE_TRANSITIONS: ("request_id", "from_state", "to_state", "timestamp", "iteration_id", "time_in_from_state",
                        "ts_ns"),
}
FILES = tuple(COLUMNS)

_PREFILL = 0
_GEN_HISTORY = 4  # generated-token counts kept per request: the batch queue finishes up to 2 steps late


class _Request:
    __slots__ = ("arrival", "blocks", "first_scheduled", "first_token", "frees", "gen_by_batch", "generated",
                 "input_tokens", "peak_blocks", "preemptions", "priority", "rid", "running", "running_since",
                 "state_since", "waiting_since")

    def __init__(self, rid: str) -> None:
        self.rid = rid
        self.arrival: int | None = None
        self.input_tokens: int | None = None
        self.priority: Any = None
        self.first_scheduled: int | None = None
        self.first_token: int | None = None
        self.generated = 0
        self.gen_by_batch: list[tuple[int, int]] = []
        self.preemptions = 0
        self.frees = 0
        self.blocks = 0
        self.peak_blocks = 0
        self.running = False
        self.running_since = 0
        self.waiting_since: int | None = None
        self.state_since: int | None = None

    def generated_at(self, batch_id: Any) -> int:
        """Tokens generated up to and including `batch_id` (the step whose output finished it)."""
        if isinstance(batch_id, int):
            for bid, count in reversed(self.gen_by_batch):
                if bid <= batch_id:
                    return count
        return self.generated


def _diff(end: int | None, start: int | None) -> int | None:
    return None if end is None or start is None else end - start


class SchedulerTables:
    """Feed records with `feed`; take finished rows with `take` (per file)."""

    def __init__(self, t0: int, wall_offset_ns: int) -> None:
        self.t0 = t0
        self.wall_offset_ns = wall_offset_ns
        self.block_bytes: int | None = None
        self.dp_rank: int | None = None
        self.joiner = BatchJoiner()
        self.requests: dict[str, _Request] = {}
        self.awaiting_first_token: dict[int, list[str]] = {}
        self.rows: dict[str, list[tuple[Any, ...]]] = {name: [] for name in FILES}
        self.iterations_released = 0
        self._dispatch: dict[tuple[str, str], Callable[[int, int, dict[str, Any]], None]] = {
            ("BatchSchedule", "batchFrameworkProcessing"): self._schedule,
            ("ModelExecute", "modelExec"): self._model,
            ("BatchSchedule", "updateFromOutput"): self._update,
            ("EngineCore", "step"): self.joiner.step,
            ("Request", "enqueue"): self._enqueue,
            ("Request", "state"): self._state,
            ("Request", "waiting"): self._waiting,
            ("KVCache", "allocate"): self._allocate,
            ("KVCache", "free"): self._free,
        }

    WANTED: frozenset[tuple[str, str]] = frozenset({
        ("BatchSchedule", "batchFrameworkProcessing"), ("ModelExecute", "modelExec"),
        ("BatchSchedule", "updateFromOutput"), ("EngineCore", "step"), ("Request", "enqueue"),
        ("Request", "state"), ("Request", "waiting"), ("KVCache", "allocate"), ("KVCache", "free")})

    def feed(self, domain: str, name: str, start: int, end: int, attrs: Any) -> None:
        handler = self._dispatch.get((domain, name))
        if handler is not None and isinstance(attrs, dict):
            handler(start, end, attrs)

    def _rel(self, t: int | None) -> int | None:
        return None if t is None else t - self.t0

    def _request(self, rid: Any) -> _Request:
        request = self.requests.get(rid)
        if request is None:  # arrived before collection started
            request = self.requests[rid] = _Request(rid)
        return request

    def _event(self, ts: int, kind: str, rid: Any, batch_id: Any, details: str) -> None:
        self.rows[EVENTS].append((ts - self.t0, kind, rid, batch_id, details, ts + self.wall_offset_ns))

    # -- records ------------------------------------------------------------------------------------

    def _enqueue(self, ts: int, _end: int, a: dict[str, Any]) -> None:
        rid = a.get("rid")
        request = self.requests[rid] = _Request(rid)  # type: ignore[index,arg-type]
        request.arrival = request.state_since = request.waiting_since = ts
        request.input_tokens = a.get("prompt_tokens")
        request.priority = a.get("priority")
        self.rows[STATE_TRANSITIONS].append((rid, "NEW", "WAITING", ts - self.t0, None, None,
                                             ts + self.wall_offset_ns))
        self._event(ts, "request_arrived", rid, None, f"prompt_tokens={request.input_tokens}")

    def _schedule(self, start: int, end: int, a: dict[str, Any]) -> None:
        batch = self.joiner.schedule(start, end, a)
        if batch is None:
            return
        if self.dp_rank is None:
            self.dp_rank = batch.dp_rank
        bid = batch.batch_id
        rows = batch.rows
        for entry in a.get("reqs") or ():
            rid, phase, scheduled = entry[0], entry[1], entry[2]
            computed = entry[3] if len(entry) > 3 else None
            prompt = entry[4] if len(entry) > 4 else None
            request = self._request(rid)
            if request.first_scheduled is None:
                request.first_scheduled = start
            if not request.running:
                request.running, request.running_since = True, end
            rows.append([bid, rid, "running", None, None, "prefill" if phase == _PREFILL else "decode", scheduled,
                         computed, request.generated, end - request.running_since])
            # The step samples a token once every known token is computed (a prefill's last chunk, each
            # decode step, the end of a recompute after preemption).
            if computed is not None and prompt is not None and computed + scheduled >= prompt + request.generated:
                request.generated += 1
                history = request.gen_by_batch
                history.append((bid, request.generated))
                if len(history) > _GEN_HISTORY:
                    del history[0]
                if request.generated == 1:
                    self.awaiting_first_token.setdefault(bid, []).append(rid)
        for rid in a.get("preempted") or ():
            request = self._request(rid)
            request.running, request.waiting_since = False, end
            rows.append([bid, rid, "preempted", None, "preempted", None, 0, None, request.generated, 0])

    def _waiting(self, ts: int, _end: int, a: dict[str, Any]) -> None:
        batch = self.joiner.pending.get(a.get("batch_id"))  # type: ignore[arg-type]
        if batch is None:
            return
        preempted_now = set(batch.attrs.get("preempted") or ())
        rids, reasons = a.get("rids") or (), a.get("reasons") or ()
        for position, (rid, reason) in enumerate(zip(rids, reasons, strict=False)):
            if rid in preempted_now:
                continue  # listed by the schedule span already
            request = self.requests.get(rid)
            since = request.waiting_since if request is not None else None
            state = "preempted" if reason == "preempted" else "waiting"
            batch.rows.append([batch.batch_id, rid, state, position, reason, None, 0, None,
                               request.generated if request is not None else None, _diff(batch.sched_end, since)])

    def _model(self, start: int, end: int, a: dict[str, Any]) -> None:
        batch = self.joiner.model(start, end, a)
        if batch is not None:
            self._first_tokens(batch.batch_id, end)

    def _update(self, start: int, end: int, a: dict[str, Any]) -> None:
        batch = self.joiner.update(start, end, a)
        if batch is not None:
            self._first_tokens(batch.batch_id, start)  # no model run seen: its output arrived by now

    def _first_tokens(self, batch_id: int, ts: int) -> None:
        for rid in self.awaiting_first_token.pop(batch_id, ()):
            request = self.requests.get(rid)
            if request is not None and request.first_token is None:
                request.first_token = ts
                self._event(ts, "first_token", rid, batch_id, "")

    def _state(self, ts: int, _end: int, a: dict[str, Any]) -> None:
        rid, before, after, batch_id = a.get("rid"), a.get("from"), a.get("to"), a.get("batch_id")
        request = self._request(rid)
        self.rows[STATE_TRANSITIONS].append((rid, before, after, ts - self.t0, batch_id,
                                             _diff(ts, request.state_since), ts + self.wall_offset_ns))
        request.state_since = ts
        if after == "RUNNING":
            kind = "request_resumed" if before == "PREEMPTED" else "request_scheduled"
            self._event(ts, kind, rid, batch_id, "")
        elif after == "PREEMPTED":
            request.preemptions += 1
            self._event(ts, "request_preempted", rid, batch_id, "")
        elif isinstance(after, str) and after.startswith("FINISHED"):
            reason = a.get("reason") or after[len("FINISHED_"):].lower()
            output_tokens = request.generated_at(batch_id)
            self._event(ts, "request_completed", rid, batch_id, f"reason={reason};output_tokens={output_tokens}")
            self._finish(request, ts, reason, output_tokens)

    def _allocate(self, _ts: int, _end: int, a: dict[str, Any]) -> None:
        request = self.requests.get(a.get("rid"))  # type: ignore[arg-type]
        if request is not None:
            request.blocks += int(a.get("blocks") or 0)
            request.peak_blocks = max(request.peak_blocks, request.blocks)

    def _free(self, _ts: int, _end: int, a: dict[str, Any]) -> None:
        request = self.requests.get(a.get("rid"))  # type: ignore[arg-type]
        if request is not None:
            request.frees += 1
            request.blocks = 0

    # -- rows ---------------------------------------------------------------------------------------

    def _finish(self, request: _Request, completion: int | None, reason: str, output_tokens: int) -> None:
        self.requests.pop(request.rid, None)
        arrival, first_token = request.arrival, request.first_token
        e2e = _diff(completion, arrival)
        tpot = None
        if output_tokens > 1 and completion is not None and first_token is not None:
            tpot = (completion - first_token) // (output_tokens - 1)
        throughput = round(output_tokens / (e2e / 1e9), 3) if e2e else None
        memory = request.peak_blocks * self.block_bytes if self.block_bytes is not None else None
        self.rows[PER_REQUEST].append((
            request.rid, self._rel(arrival), self._rel(request.first_scheduled), self._rel(first_token),
            self._rel(completion), _diff(request.first_scheduled, arrival), _diff(completion, request.first_scheduled),
            e2e, request.input_tokens, output_tokens, _diff(first_token, arrival), tpot, throughput,
            request.preemptions, max(0, request.frees - 1), request.peak_blocks, memory, request.priority, reason))

    def _iteration(self, batch: JoinedBatch) -> None:
        a = batch.attrs
        reqs = a.get("reqs") or ()
        prefill = [e[2] for e in reqs if e[1] == _PREFILL]
        decode = [e[2] for e in reqs if e[1] != _PREFILL]
        end = batch.step_end or batch.update_end or batch.sched_end
        self.rows[PER_ITERATION].append((
            batch.batch_id, batch.sched_start - self.t0, end - self.t0, _diff(batch.step_end, batch.step_start),
            batch.sched_end - batch.sched_start, _diff(batch.model_end, batch.model_start), len(reqs),
            batch.total_tokens, sum(prefill), sum(decode), len(prefill), len(decode), a.get("running"),
            a.get("waiting"), len(a.get("preempted") or ()), len(batch.finished), a.get("kv_used_blocks"),
            a.get("kv_total_blocks"), a.get("kv_usage"), batch.dp_rank))
        finished = {item[0] if isinstance(item, list | tuple) else item for item in batch.finished}
        out = self.rows[PER_ITERATION_REQUESTS]
        for row in batch.rows:
            if row[2] == "running" and row[1] in finished:
                row[2] = "completed"
            out.append(tuple(row))
        self.iterations_released += 1

    def release(self, final: bool = False) -> None:
        """Move the steps whose records are all in (with `final`: everything) into `rows`."""
        for batch in self.joiner.release(final):
            self._iteration(batch)
        if final:
            for request in list(self.requests.values()):
                self._finish(request, None, "unfinished", request.generated)

    def take(self) -> dict[str, list[tuple[Any, ...]]]:
        rows, self.rows = self.rows, {name: [] for name in FILES}
        return rows
