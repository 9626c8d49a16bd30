"""The waiting queue of vLLM v1's scheduler at the end of a step: each waiting request's position and why
it waits. Opt-in (`envvars.VLLM_SCHEDULER_LOG_WAITING`): it walks the queue, O(waiting) per step, which
vLLM's maintainers warn against doing by default (benchmarks/README.md has its cost per step).

Positions follow the order the next `schedule()` will consider them: requests that hold KV blocks first
(`kv_holding_waiting`, when the scheduler has it), then `waiting` in its policy's order (FCFS or priority).
"""

from __future__ import annotations

import os
from itertools import chain
from typing import TYPE_CHECKING, Any

from service_profiler.runtime import envvars
from service_profiler.runtime.frontdoors.options import is_true

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.core.sched.scheduler import Scheduler

ENABLED = is_true(os.environ.get(envvars.VLLM_SCHEDULER_LOG_WAITING))


class WaitingReason:
    """Why a request was still waiting when the step was scheduled."""

    PREEMPTED = "preempted"  # preempted earlier; waits to be resumed (recomputed)
    MAX_NUM_SEQS = "max_num_seqs"  # the running batch is full
    TOKEN_BUDGET = "token_budget"  # the step's max_num_batched_tokens was used up
    KV_CACHE = "kv_cache"  # the first waiting request the scheduler tried: not enough free KV blocks
    BEHIND_HEAD = "behind_queue_head"  # waits behind an earlier request that could not be scheduled
    STRUCTURED_OUTPUT = "structured_output_grammar"  # its grammar is still compiling
    REMOTE_KV = "remote_kv_transfer"  # its KV cache is being received (disaggregated prefill)
    STREAMING_INPUT = "streaming_input"  # a streaming session waiting for its next input chunk


_STATUS_REASONS = {
    "PREEMPTED": WaitingReason.PREEMPTED,
    "WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR": WaitingReason.STRUCTURED_OUTPUT,
    "WAITING_FOR_FSM": WaitingReason.STRUCTURED_OUTPUT,
    "WAITING_FOR_REMOTE_KVS": WaitingReason.REMOTE_KV,
    "WAITING_FOR_STREAMING_REQ": WaitingReason.STREAMING_INPUT,
}
_by_status: dict[Any, str] = {}


def _reasons_by_status(request: Any) -> dict[Any, str]:
    """The reasons keyed by the status enum members themselves: a dict lookup per request, no `.name`."""
    if not _by_status:
        for status in type(request.status):
            reason = _STATUS_REASONS.get(status.name)
            if reason is not None:
                _by_status[status] = reason
    return _by_status


def waiting_snapshot(scheduler: Scheduler, out: SchedulerOutput) -> tuple[list[str], list[str]]:
    """(request ids, reasons) of every request left waiting by this step, in queue order: a request's
    position is its index. Two lists of objects that already exist (the ids, the reason constants), so
    the walk allocates nothing per request: with tens of thousands waiting, per-request tuples would set
    off the garbage collector inside the engine's step."""
    if len(scheduler.running) >= scheduler.max_num_running_reqs:
        blocked = WaitingReason.MAX_NUM_SEQS
    elif out.total_num_scheduled_tokens >= scheduler.max_num_scheduled_tokens:
        blocked = WaitingReason.TOKEN_BUDGET
    else:
        blocked = ""
    holding = getattr(scheduler, "kv_holding_waiting", ())
    rids: list[str] = []
    reasons: list[str] = []
    by_status: dict[Any, str] | None = None
    plain = blocked or WaitingReason.BEHIND_HEAD
    head_seen = bool(blocked)  # with a batch-wide limit every plain waiting request has that reason
    for request in chain(holding, scheduler.waiting):
        if by_status is None:
            by_status = _reasons_by_status(request)
        reason = by_status.get(request.status)
        if reason is None:
            if head_seen:
                reason = plain
            else:
                reason = WaitingReason.KV_CACHE
                head_seen = True
        rids.append(request.request_id)
        reasons.append(reason)
    return rids, reasons
