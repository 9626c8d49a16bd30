"""vLLM v1 handlers: time the engine's calls and record what `vllm_extract` reads from them.

Each handler has the contract `handler(original_func, this, *args, **kwargs)`: it calls the original
exactly once, with the arguments it was given, and returns its result or lets its exception through.
Extraction runs after the original returned (reads that the call would destroy, such as the blocks a
`free` drops, are taken just before), and all of it is inside try/except: a failure is counted and
logged, never raised into the engine. The vocabulary (domains, names, attributes) is the table
"vLLM vocabulary" in docs/DESIGN.md.

Joins across calls and processes:
- `batch_id` counts `schedule()` calls per EngineCore process (with `dp_rank`, unique per engine).
  The scheduler output object carries it to `execute_model` and `update_from_output` (a bounded map
  keyed by the object's identity).
- `modelExec` runs from `Executor.execute_model` being called to `update_from_output` starting. The
  engine calls `update_from_output` only once `sample_tokens` (or the async output's copy to host)
  has produced token ids as Python lists, so on CUDA/NPU the span ends after the device finished,
  not when kernels were launched. With a batch queue (async scheduling, PP) it ends when the
  EngineCore got round to the result, which may include scheduling the next batch.
- The engine's request id is the API server's id plus "-<8 random chars>" (and "<i>_" in front for the
  i-th of n samples); `httpReq` carries both (`rid`, `api_rid`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from service_profiler import record

from . import vllm_extract as extract
from . import vllm_http, vllm_waiting
from .console import ConsoleWindow

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.core.sched.scheduler import Scheduler

Original = Callable[..., Any]

_log = logging.getLogger("service_profiler.engines.vllm")
_now = record.now_ns

_MAX_PENDING_BATCHES = 64
"""Scheduler outputs awaiting `update_from_output`: the batch queue holds 2 (async) or PP-size."""
_MAX_TRACKED_API_REQUESTS = 1 << 17
"""API-side output-token counters; a request whose end was never seen is dropped oldest-first."""


class PendingBatch:
    __slots__ = ("batch_id", "console", "dp_rank", "exec_start_ns", "output", "schedule_end_ns")

    def __init__(self, output: SchedulerOutput, batch_id: int, dp_rank: int, schedule_end_ns: int,
                 console: bool = False) -> None:
        self.output = output
        self.batch_id = batch_id
        self.dp_rank = dp_rank
        self.schedule_end_ns = schedule_end_ns
        self.exec_start_ns = 0
        self.console = console
        """The live console was on when the batch was scheduled (its model time is counted there)."""


class VllmProbeState:
    """Per-process state of the handlers. Scheduler calls all come from the EngineCore's busy-loop
    thread and API calls from the API server's event loop, so plain attributes suffice."""

    def __init__(self, console: ConsoleWindow | None = None) -> None:
        self.next_batch_id = 0
        self.current_batch: int | None = None
        """The batch being scheduled or updated right now (for KV events raised inside)."""
        self.last_batch: int | None = None
        self.step_batch: int | None = None
        self.step_output_batch: int | None = None
        self.pending: dict[int, PendingBatch] = {}
        """Scheduled batches by `id()` of their scheduler output. An entry holds its output, so no other
        live object can have that id meanwhile."""
        self.busy: set[str] = set()
        self.dp_rank_of: tuple[Any, int] | None = None
        self.api_tokens: dict[str, int] = {}
        self.failures: dict[str, int] = {}
        self.console = console if console is not None else ConsoleWindow()

    def dp_rank(self, scheduler: Scheduler) -> int:
        cached = self.dp_rank_of
        if cached is not None and cached[0] is scheduler:
            return cached[1]
        rank = extract.data_parallel_rank(scheduler)
        self.dp_rank_of = (scheduler, rank)
        record.meta("dp_rank", rank)
        block_bytes = extract.kv_block_bytes(scheduler)
        if block_bytes is not None:
            record.meta("kv_block_bytes", block_bytes)
        return rank

    def kv_batch(self) -> int | None:
        return self.current_batch if self.current_batch is not None else self.last_batch

    def track_api_request(self, rid: str) -> None:
        tokens = self.api_tokens
        tokens[rid] = 0
        if len(tokens) > _MAX_TRACKED_API_REQUESTS:
            del tokens[next(iter(tokens))]

    def failed(self, where: str, exc: BaseException) -> None:
        count = self.failures.get(where, 0) + 1
        self.failures[where] = count
        if count & (count - 1) == 0:  # 1, 2, 4, 8, ...: visible in the raw file, never a flood
            record.meta("vllm_handler_failures", dict(self.failures))
            _log.warning("service-profiler: vLLM handler %s failed %d time(s), last: %r", where, count, exc)


STATE = VllmProbeState()


# A handler marks its key busy in `STATE.busy` around the original and calls straight through while its
# key is already busy: an override calling `super()` (vllm-ascend's BalanceScheduler.schedule) is wrapped
# at both levels and must be recorded once. Written out in each handler (no helper frame per call).


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], name: str) -> Any:
    """The first parameter after `self`, passed positionally (as the engine does) or by name."""
    return args[0] if args else kwargs.get(name)


# ----------------------------------------------------------------------------------------- scheduler


def schedule_handler(original_func: Original, this: Scheduler, *args: Any, **kwargs: Any) -> Any:
    """`Scheduler.schedule` -> span BatchSchedule/batchFrameworkProcessing, counters BatchSchedule/queues
    and KVCache/kvcache, events KVCache/allocate and Request/state; feeds the live console."""
    state = STATE
    if "schedule" in state.busy:
        return original_func(this, *args, **kwargs)
    batch_id = state.next_batch_id
    state.next_batch_id = batch_id + 1
    state.current_batch = batch_id
    busy = state.busy
    busy.add("schedule")
    start = _now()
    try:
        out = original_func(this, *args, **kwargs)
    finally:
        busy.discard("schedule")
        state.current_batch = None
    end = _now()
    try:
        _after_schedule(state, this, out, batch_id, start, end)
    except Exception as exc:
        state.failed("schedule", exc)
    return out


def _after_schedule(state: VllmProbeState, scheduler: Scheduler, out: SchedulerOutput, batch_id: int,
                    start: int, end: int) -> None:
    state.last_batch = state.step_batch = batch_id
    dp_rank = state.dp_rank(scheduler)
    window = state.console
    console = window.enabled()
    pending = state.pending
    pending[id(out)] = PendingBatch(out, batch_id, dp_rank, end, console)
    if len(pending) > _MAX_PENDING_BATCHES:
        del pending[next(iter(pending))]
    enabled = record.enabled
    want_batch = enabled("BatchSchedule")
    want_kv = enabled("KVCache")
    want_request = enabled("Request")
    if not (want_batch or want_kv or want_request or console):
        return
    attrs, allocations, transitions = extract.extract_schedule(scheduler, out, batch_id, dp_rank)
    if want_batch:
        record.span("BatchSchedule", "batchFrameworkProcessing", start, end, attrs)
        record.counter("BatchSchedule", "queues", {"running": attrs["running"], "waiting": attrs["waiting"]},
                       end)
    if want_kv:
        record.counter("KVCache", "kvcache", {"total_blocks": attrs["kv_total_blocks"],
                                              "used_blocks": attrs["kv_used_blocks"],
                                              "usage": attrs["kv_usage"]}, end)
        for rid, blocks in allocations:
            record.event("KVCache", "allocate", {"rid": rid, "blocks": blocks, "batch_id": batch_id}, end)
    if want_request:
        for rid, before, after in transitions:
            record.event("Request", "state", {"rid": rid, "from": before, "to": after, "batch_id": batch_id},
                         end)
        if vllm_waiting.ENABLED:  # opt-in: walks the waiting queue
            rids, reasons = vllm_waiting.waiting_snapshot(scheduler, out)
            record.event("Request", "waiting", {"batch_id": batch_id, "rids": rids, "reasons": reasons}, end)
    if console:
        window.on_schedule(batch_id, dp_rank, attrs["reqs"], attrs["running"], attrs["waiting"],
                           attrs["kv_used_blocks"], attrs["kv_total_blocks"], attrs["kv_usage"], end - start)


def update_from_output_handler(original_func: Original, this: Scheduler, *args: Any, **kwargs: Any) -> Any:
    """`Scheduler.update_from_output` -> span ModelExecute/modelExec (execute_model start -> now),
    span BatchSchedule/updateFromOutput, Request/state events for the requests it finished."""
    state = STATE
    if "update" in state.busy:
        return original_func(this, *args, **kwargs)
    start = _now()
    batch: PendingBatch | None = None
    try:
        batch = state.pending.pop(id(args[0] if args else kwargs.get("scheduler_output")), None)
    except Exception as exc:
        state.failed("update_from_output", exc)
    state.current_batch = batch.batch_id if batch is not None else None
    busy = state.busy
    busy.add("update")
    try:
        result = original_func(this, *args, **kwargs)
    finally:
        busy.discard("update")
        state.current_batch = None
    end = _now()
    if batch is not None:  # else scheduled before collection was switched on
        try:
            _after_update(state, batch, result, start, end)
        except Exception as exc:
            state.failed("update_from_output", exc)
    return result


def _after_update(state: VllmProbeState, batch: PendingBatch, result: Any, start: int, end: int) -> None:
    state.step_output_batch = batch.batch_id
    model_start = batch.exec_start_ns or batch.schedule_end_ns
    # record.span checks the domain itself; the attributes are too cheap to guard.
    record.span("ModelExecute", "modelExec", model_start, start, {"batch_id": batch.batch_id, "dp_rank": batch.dp_rank})
    if batch.console:
        state.console.on_model(start - model_start)
    want_batch = record.enabled("BatchSchedule")
    want_request = record.enabled("Request")
    if not (want_batch or want_request):
        return
    finished = extract.finished_outputs(result)
    if want_batch:
        record.span("BatchSchedule", "updateFromOutput", start, end,
                    {"batch_id": batch.batch_id, "finished": finished})
    if want_request:
        for rid, reason in finished:
            record.event("Request", "state", {"rid": rid, "from": extract.RUNNING,
                                              "to": extract.status_of_reason(reason), "reason": reason,
                                              "batch_id": batch.batch_id}, end)


def add_request_handler(original_func: Original, this: Scheduler, *args: Any, **kwargs: Any) -> Any:
    """`Scheduler.add_request` -> event Request/enqueue (the request's arrival in the engine)."""
    busy = STATE.busy
    if "add_request" in busy:
        return original_func(this, *args, **kwargs)
    busy.add("add_request")
    try:
        result = original_func(this, *args, **kwargs)
    finally:
        busy.discard("add_request")
    try:
        request = _arg(args, kwargs, "request")
        # A streaming session's next chunk re-adds an id the scheduler already holds: not an arrival.
        if record.enabled("Request") and this.requests.get(request.request_id) is request:
            record.event("Request", "enqueue", extract.engine_request(request))
    except Exception as exc:
        STATE.failed("add_request", exc)
    return result


_READABLE_ID_COLLECTIONS = (str, list, tuple, set, frozenset)


def finish_requests_handler(original_func: Original, this: Scheduler, *args: Any, **kwargs: Any) -> Any:
    """`Scheduler.finish_requests` (aborts, errors) -> Request/state events to FINISHED_*.

    Inside `update_from_output` the requests it finishes are in its outputs and recorded there."""
    state = STATE
    before: dict[str, str] | None = None
    if "update" not in state.busy and record.enabled("Request"):
        try:
            request_ids = _arg(args, kwargs, "request_ids")
            # Only collections are read beforehand: reading an iterator would consume the engine's ids.
            if request_ids is None or isinstance(request_ids, _READABLE_ID_COLLECTIONS):
                before = extract.statuses(this, extract.finish_request_ids(this, request_ids))
        except Exception as exc:
            state.failed("finish_requests", exc)
    result = original_func(this, *args, **kwargs)
    if before is not None:
        try:
            batch_id = state.kv_batch()
            for request in result:
                rid = request.request_id
                record.event("Request", "state", {"rid": rid, "from": before.get(rid),
                                                  "to": request.status.name, "batch_id": batch_id})
        except Exception as exc:
            state.failed("finish_requests", exc)
    return result


# ------------------------------------------------------------------------------------------ KV cache


def free_handler(original_func: Original, this: Any, *args: Any, **kwargs: Any) -> Any:
    """`KVCacheManager.free` -> event KVCache/free with the blocks the request held."""
    blocks: int | None = None
    rid: str | None = None
    if record.enabled("KVCache"):
        try:
            rid = _arg(args, kwargs, "request").request_id
            blocks = extract.request_block_count(this, rid)
        except Exception as exc:
            STATE.failed("free", exc)
    result = original_func(this, *args, **kwargs)
    if blocks:  # a request aborted while waiting held none
        record.event("KVCache", "free", {"rid": rid, "blocks": blocks, "batch_id": STATE.kv_batch()})
    return result


def cache_hit_handler(original_func: Original, this: Any, *args: Any, **kwargs: Any) -> Any:
    """`KVCacheManager.get_computed_blocks` -> event KVCache/cacheHit, once per admission attempt (a
    request that does not fit is looked up again at the next step); nothing when prefix caching is off."""
    busy = STATE.busy
    if "cache_hit" in busy:
        return original_func(this, *args, **kwargs)
    busy.add("cache_hit")
    try:
        result = original_func(this, *args, **kwargs)
    finally:
        busy.discard("cache_hit")
    try:
        if this.enable_caching and record.enabled("KVCache"):
            request = _arg(args, kwargs, "request")
            record.event("KVCache", "cacheHit", {"rid": request.request_id,
                                                 "hit_tokens": extract.cache_hit_tokens(result),
                                                 "query_tokens": request.num_tokens,
                                                 "batch_id": STATE.kv_batch()})
    except Exception as exc:
        STATE.failed("get_computed_blocks", exc)
    return result


# ---------------------------------------------------------------------------------- engine, executor


def engine_step_handler(original_func: Original, this: Any, *args: Any, **kwargs: Any) -> Any:
    """`EngineCore.step` / `step_with_batch_queue` -> span EngineCore/step when the step scheduled a
    batch (`batch_id`) or processed one's output (`output_batch_id`, when it is another batch)."""
    state = STATE
    if "step" in state.busy:
        return original_func(this, *args, **kwargs)
    state.step_batch = state.step_output_batch = None
    busy = state.busy
    busy.add("step")
    start = _now()
    try:
        result = original_func(this, *args, **kwargs)
    finally:
        busy.discard("step")
    end = _now()
    try:
        scheduled, processed = state.step_batch, state.step_output_batch
        if scheduled is not None or processed is not None:  # record.span checks the domain
            attrs: dict[str, Any] = {}
            if scheduled is not None:
                attrs["batch_id"] = scheduled
            if processed is not None and processed != scheduled:
                attrs["output_batch_id"] = processed
            if state.dp_rank_of is not None:
                attrs["dp_rank"] = state.dp_rank_of[1]
            record.span("EngineCore", "step", start, end, attrs)
    except Exception as exc:
        state.failed("step", exc)
    return result


def execute_model_handler(original_func: Original, this: Any, *args: Any, **kwargs: Any) -> Any:
    """`Executor.execute_model` (and its overrides): notes when the batch went to the workers; the
    `modelExec` span is recorded by `update_from_output_handler`."""
    try:
        batch = STATE.pending.get(id(args[0] if args else kwargs.get("scheduler_output")))
        if batch is not None and not batch.exec_start_ns:  # the outermost override's call counts
            batch.exec_start_ns = _now()
    except Exception as exc:
        STATE.failed("execute_model", exc)
    return original_func(this, *args, **kwargs)


# --------------------------------------------------------------------------------------- API server


def api_add_request_handler(original_func: Original, this: Any, *args: Any, **kwargs: Any) -> Any:
    """`OutputProcessor.add_request` -> event Request/httpReq: the API server hands a request to the
    engine (once per engine request: n>1 sampling adds one per child)."""
    request: Any = None
    try:
        candidate = _arg(args, kwargs, "request")
        if candidate.request_id not in this.request_states:  # a streaming chunk re-adds its id
            request = candidate
    except Exception as exc:
        STATE.failed("api_add_request", exc)
    result = original_func(this, *args, **kwargs)
    if request is not None:
        try:
            STATE.track_api_request(request.request_id)
            if record.enabled("Request"):
                record.event("Request", "httpReq", extract.http_request(request))
            vllm_http.note_engine_request(request.request_id)  # joins the HTTP exchange (vllm_http)
        except Exception as exc:
            STATE.failed("api_add_request", exc)
    return result


def api_process_outputs_handler(original_func: Original, this: Any, *args: Any, **kwargs: Any) -> Any:
    """`OutputProcessor.process_outputs` -> event Request/tokens (one per engine output batch) and
    Request/httpRes for each request it finished."""
    outputs: Any = None
    ignored: set[str] = set()
    try:
        outputs = _arg(args, kwargs, "engine_core_outputs")
        ignored = extract.ignored_outputs(outputs, this.request_states)
    except Exception as exc:
        outputs = None
        STATE.failed("api_process_outputs", exc)
    result = original_func(this, *args, **kwargs)
    if outputs is not None:
        try:
            _after_process_outputs(extract.emitted_tokens(outputs, result, ignored))
        except Exception as exc:
            STATE.failed("api_process_outputs", exc)
    return result


def _after_process_outputs(entries: list[tuple[str, int, int, str | None]]) -> None:
    tokens = STATE.api_tokens
    finished: list[tuple[str, int, str | None]] = []
    for rid, new_tokens, done, reason in entries:
        count = tokens.get(rid)
        if count is None:
            continue  # added before collection was switched on
        count += new_tokens
        if done:
            del tokens[rid]
            finished.append((rid, count, reason))
        else:
            tokens[rid] = count
    if not record.enabled("Request"):
        return
    if entries:
        record.event("Request", "tokens", {"reqs": entries})
    for rid, count, reason in finished:
        record.event("Request", "httpRes", {"rid": rid, "output_tokens": count, "finish_reason": reason})


def api_abort_handler(original_func: Original, this: Any, *args: Any, **kwargs: Any) -> Any:
    """`OutputProcessor.abort_requests` (client gone, `AsyncLLM.abort`) -> Request/httpRes "abort"."""
    result = original_func(this, *args, **kwargs)
    try:
        want = record.enabled("Request")
        for rid in result:
            count = STATE.api_tokens.pop(rid, None)
            if count is not None and want:
                record.event("Request", "httpRes",
                             {"rid": rid, "output_tokens": count, "finish_reason": "abort"})
    except Exception as exc:
        STATE.failed("api_abort", exc)
    return result
