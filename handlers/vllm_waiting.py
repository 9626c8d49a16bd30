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

from service_profiler import envvars
from service_profiler.frontdoors.options import is_true

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


def waiting_snapshot(scheduler: Scheduler, out: SchedulerOutput) -> list[list[Any]]:
    """[[rid, queue position, reason], ...] for every request left waiting by this step."""
    if len(scheduler.running) >= scheduler.max_num_running_reqs:
        blocked = WaitingReason.MAX_NUM_SEQS
    elif out.total_num_scheduled_tokens >= scheduler.max_num_scheduled_tokens:
        blocked = WaitingReason.TOKEN_BUDGET
    else:
        blocked = ""
    holding = getattr(scheduler, "kv_holding_waiting", ())
    entries: list[list[Any]] = []
    head_seen = False
    for position, request in enumerate(chain(holding, scheduler.waiting)):
        reason = _STATUS_REASONS.get(request.status.name)
        if reason is None:
            if blocked:
                reason = blocked
            elif not head_seen:
                reason = WaitingReason.KV_CACHE
            else:
                reason = WaitingReason.BEHIND_HEAD
            head_seen = True
        entries.append([request.request_id, position, reason])
    return entries
