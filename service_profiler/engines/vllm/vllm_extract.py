"""Pure extractors: vLLM v1 objects in, plain dicts / lists / tuples out. No recording, no state.

Everything here reads documented fields by plain attribute access and never mutates an engine object.
Per-step work is O(batch): it walks `SchedulerOutput.scheduled_new_reqs`, `scheduled_cached_reqs` and
`num_scheduled_tokens`, looks up `scheduler.requests[rid]` for scheduled ids only, and reads queue
lengths and the block pool's free count (O(1)); it never walks the waiting queue.

Valid for vLLM 0.23 (vllm-ascend 0.23) through 0.33; where those versions differ the difference is noted
where it is handled. Wired to the recording API by `vllm_v1.py`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine import EngineCoreOutputs, EngineCoreRequest
    from vllm.v1.engine.output_processor import OutputProcessorOutput

PREFILL = 0
DECODE = 1

WAITING = "WAITING"
RUNNING = "RUNNING"
PREEMPTED = "PREEMPTED"

# FinishReason (what outputs carry) -> RequestStatus name (what the `state` event reports), the inverse
# of vllm.v1.request._FINISHED_REASON_MAP (IGNORED also maps to "length"; it is reported as LENGTH_CAPPED).
_STATUS_OF_REASON = {
    "stop": "FINISHED_STOPPED",
    "length": "FINISHED_LENGTH_CAPPED",
    "abort": "FINISHED_ABORTED",
    "error": "FINISHED_ERROR",
    "repetition": "FINISHED_REPETITION",
}

ScheduledReq = tuple[str, int, int, int, int, int]
"""(rid, phase 0=prefill/1=decode, tokens scheduled, tokens computed before, prompt tokens, resumed 0/1)."""

Transition = tuple[str, str, str]
"""(rid, from state, to state)."""

Allocation = tuple[str, int]
"""(rid, blocks assigned in this step)."""


def extract_schedule(scheduler: Scheduler, out: SchedulerOutput, batch_id: int, dp_rank: int
                     ) -> tuple[dict[str, Any], list[Allocation], list[Transition]]:
    """What one `schedule()` call did, read from its output in one pass over the scheduled requests:
    the attributes of its `batchFrameworkProcessing` span, its block allocations and its state changes.

    One pass rather than one per table: it runs once per step between the model's runs, with the
    interpreter's caches cold, where a further pass over the requests costs several times its
    instructions (a handler's cost per step in the engine is several times what the same code costs
    called in a loop).

    `reqs`, one entry per scheduled request (`ScheduledReq`), new requests first, then cached ones in
    vLLM's order. "Computed before" is the value the scheduler put into the output (taken before
    `_update_after_schedule` advanced it). A request is in decode when it has output tokens and this step
    starts at its last sampled token; prefill covers first prefills, chunks, and the recompute after a
    preemption. Under async scheduling `num_output_tokens` includes the in-flight placeholders, and so
    does `num_computed_tokens`, so the same rule holds.

    Allocations: (rid, blocks assigned in this step) for requests that got blocks. A new request reports
    all its blocks (prefix-cache hits included: they are now referenced by it); a running one the blocks
    appended this step; a resumed one its whole new block table. This is what `allocate_slots` handed
    out, read once per step instead of wrapping a per-request call.

    Transitions: preemptions first (they happen while the running queue is scheduled, before waiting
    requests are admitted), then admissions and resumptions. Requests that waited on remote KV or on a
    grammar count as WAITING. Running requests that just continue are not state changes.

    Queue lengths are vLLM's own metrics' (`get_request_counts`). KV blocks: the pool's block 0 is the null
    block, never handed out, so it counts neither as total nor as used; `kv_usage` equals vLLM's own
    `BlockPool.get_usage()` (the `kv_cache_usage_perc` metric). All O(1) apart from the scheduled requests.
    """
    requests = scheduler.requests
    num_scheduled = out.num_scheduled_tokens
    reqs: list[ScheduledReq] = []
    allocations: list[Allocation] = []
    preempted = out.preempted_req_ids
    transitions: list[Transition] = [(rid, RUNNING, PREEMPTED) for rid in sorted(preempted)] if preempted else []
    for new in out.scheduled_new_reqs:
        rid = new.req_id
        request = requests[rid]
        # The v2 model runner sends resumed requests as new ones; only they have been preempted.
        resumed = 1 if request.num_preemptions > 0 else 0
        reqs.append((rid, PREFILL, num_scheduled[rid], new.num_computed_tokens, request.num_prompt_tokens, resumed))
        count = block_count(new.block_ids)
        if count:
            allocations.append((rid, count))
        transitions.append((rid, PREEMPTED if resumed else WAITING, RUNNING))
    cached = out.scheduled_cached_reqs
    resumed_ids = cached.resumed_req_ids
    for rid, computed, outputs, block_ids in zip(cached.req_ids, cached.num_computed_tokens,
                                                 cached.num_output_tokens, cached.new_block_ids, strict=False):
        prompt = requests[rid].num_prompt_tokens
        reqs.append((rid, DECODE if outputs and computed >= prompt + outputs - 1 else PREFILL, num_scheduled[rid],
                     computed, prompt, 1 if resumed_ids and rid in resumed_ids else 0))
        if block_ids is not None:  # most decode steps: no new block
            count = block_count(block_ids)
            if count:
                allocations.append((rid, count))
    if resumed_ids:
        transitions.extend((rid, PREEMPTED, RUNNING) for rid in sorted(resumed_ids))
    running, waiting = scheduler.get_request_counts()
    pool = scheduler.kv_cache_manager.block_pool
    total = pool.num_gpu_blocks - 1
    used = total - pool.get_num_free_blocks()
    attrs = {
        "batch_id": batch_id,
        "dp_rank": dp_rank,
        "reqs": reqs,
        "running": running,
        "waiting": waiting,
        # Sets in vLLM; sorted so that a record does not depend on the hash seed.
        "preempted": sorted(preempted) if preempted else [],
        "finished": sorted(out.finished_req_ids),
        "total_tokens": out.total_num_scheduled_tokens,
        "kv_total_blocks": total,
        "kv_used_blocks": used,
        "kv_usage": used / total if total > 0 else 0.0,
    }
    return attrs, allocations, transitions


def block_count(blocks: Iterable[Any] | None) -> int:
    """Blocks in a per-KV-cache-group tuple of lists (`block_ids`, `KVCacheBlocks.blocks`); None is 0."""
    return sum(map(len, blocks)) if blocks is not None else 0


def request_block_count(kv_cache_manager: KVCacheManager, request_id: str) -> int:
    """Blocks a request holds now (read before `free`, which drops them): what `get_blocks` returns, counted
    in the per-group managers' own table, without the `KVCacheBlocks` that `get_blocks` builds (that
    building was most of the `free` handler's cost). Where a version lays the managers out otherwise,
    through `get_blocks`."""
    try:
        count = 0
        for manager in kv_cache_manager.coordinator.single_type_managers:  # a loop: a third of a sum()'s time
            held = manager.req_to_blocks.get(request_id)  # a defaultdict: `get` adds no entry
            if held:
                count += len(held)
        return count
    except AttributeError:
        blocks: KVCacheBlocks = kv_cache_manager.get_blocks(request_id)
        return block_count(blocks.blocks)


def cache_hit_tokens(result: Any) -> int:
    """Tokens found in the prefix cache by `get_computed_blocks`: its second element in every version
    (vLLM 0.23 returns (blocks, tokens); 0.32+ (blocks, tokens, shared_prefix_boundary))."""
    return int(result[1])


def finished_outputs(result: Mapping[int, EngineCoreOutputs]) -> list[tuple[str, str]]:
    """(rid, finish reason) for every request `update_from_output` finished, from its return value."""
    finished: list[tuple[str, str]] = []
    for outputs in result.values():
        for output in outputs.outputs:
            if output.finish_reason is not None:
                finished.append((output.request_id, str(output.finish_reason)))
    return finished


def status_of_reason(reason: str) -> str:
    """The RequestStatus name a finish reason stands for ("stop" -> "FINISHED_STOPPED")."""
    return _STATUS_OF_REASON.get(reason, "FINISHED_" + reason.upper())


def finish_request_ids(scheduler: Scheduler, request_ids: str | Iterable[str] | None) -> list[str]:
    """The ids `Scheduler.finish_requests` will look at, as it normalises them (None means all)."""
    if request_ids is None:
        return list(scheduler.requests)
    if isinstance(request_ids, str):
        return [request_ids]
    return list(request_ids)


def statuses(scheduler: Scheduler, request_ids: Iterable[str]) -> dict[str, str]:
    """Current status name of each known, unfinished request among `request_ids`."""
    requests = scheduler.requests
    found: dict[str, str] = {}
    for rid in request_ids:
        request = requests.get(rid)
        if request is not None and not request.is_finished():
            found[rid] = request.status.name
    return found


def engine_request(request: Any) -> dict[str, Any]:
    """`enqueue` attributes of a `vllm.v1.request.Request` entering the scheduler."""
    return {"rid": request.request_id, "prompt_tokens": request.num_prompt_tokens,
            "arrival_time": request.arrival_time, "priority": request.priority}


def kv_block_bytes(scheduler: Scheduler) -> int | None:
    """Bytes of one KV cache block across all layers (the KV tensors' size over the block count)."""
    config = getattr(scheduler, "kv_cache_config", None)
    if config is None or not config.num_blocks:
        return None
    return sum(int(tensor.size) for tensor in config.kv_cache_tensors) // int(config.num_blocks)


def prompt_length(request: EngineCoreRequest) -> int:
    if request.prompt_token_ids is not None:
        return len(request.prompt_token_ids)
    embeds = request.prompt_embeds
    return int(embeds.shape[0]) if embeds is not None else 0


def http_request(request: EngineCoreRequest) -> dict[str, Any]:
    """`httpReq` attributes of the EngineCoreRequest the API server hands to the engine.

    `request_id` is the engine's id: vLLM appends 8 random characters to the id the API server chose
    (`InputProcessor.assign_request_id`: "cmpl-<id>-0" -> "cmpl-<id>-0-1a2b3c4d"), and prefixes "<i>_"
    for the i-th of n>1 parallel samples. `external_req_id` keeps the API server's id.
    `arrival_time` (epoch seconds) is when vLLM's renderer started on the HTTP request.
    """
    params = request.sampling_params
    kind = params.output_kind if params is not None else None
    return {
        "rid": request.request_id,
        "api_rid": request.external_req_id,
        "prompt_tokens": prompt_length(request),
        "max_tokens": params.max_tokens if params is not None else None,
        "stream": kind is not None and kind.name == "DELTA",
        "arrival_time": request.arrival_time,
    }


def ignored_outputs(engine_core_outputs: Iterable[Any], request_states: Mapping[str, Any]) -> set[str]:
    """Ids of outputs `process_outputs` will drop: requests the API server already aborted.
    Read before the call, which removes the requests it finishes."""
    return {output.request_id for output in engine_core_outputs if output.request_id not in request_states}


def emitted_tokens(engine_core_outputs: Iterable[Any], result: OutputProcessorOutput | None,
                   ignored: set[str]) -> list[tuple[str, int, int, str | None]]:
    """(rid, new tokens, finished 0/1, finish reason) per output the API server processed.

    Read after `process_outputs`, so tokens trimmed after a stop string are already gone; a stop string
    found by the detokenizer finishes the request with "stop" although the engine output had no reason
    (vLLM lists such requests in `reqs_to_abort`).
    """
    stopped = set(result.reqs_to_abort) if result is not None and result.reqs_to_abort else ()
    entries: list[tuple[str, int, int, str | None]] = []
    for output in engine_core_outputs:
        rid = output.request_id
        if rid in ignored:
            continue
        reason = output.finish_reason
        if reason is not None:
            entries.append((rid, len(output.new_token_ids), 1, str(reason)))
        elif rid in stopped:
            entries.append((rid, len(output.new_token_ids), 1, "stop"))
        else:
            entries.append((rid, len(output.new_token_ids), 0, None))
    return entries


def data_parallel_rank(scheduler: Scheduler) -> int:
    """The engine's DP rank. `data_parallel_index` (vLLM >= 0.23) keeps it where vLLM resets
    `data_parallel_rank` to 0 (dense models run DP as independent replicas)."""
    parallel = scheduler.vllm_config.parallel_config
    index = getattr(parallel, "data_parallel_index", None)
    return int(index if index is not None else parallel.data_parallel_rank)
