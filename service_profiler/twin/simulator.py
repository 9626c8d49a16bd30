"""The twin's core: vLLM's real v1 Scheduler driven on a virtual clock.

Each step: requests whose engine arrival is at or before the clock are added, `schedule()` runs,
the step's duration comes from a step-time source (measured or model), and `update_from_output()` gets a
made-up model output (one token for each request whose prompt is now fully computed, none for a partial
prefill chunk). Requests generate exactly their trace's output length (`max_tokens`, EOS ignored). The
clock is integer nanoseconds advanced only by arrivals and step durations, so the same inputs give the
same outputs, byte for byte; no host time is read.

With async scheduling the engine keeps up to `batch_queue_size` batches in flight (vLLM's
`step_with_batch_queue`): the next batch is scheduled while the previous one runs on the device, and
outputs are applied in order once each batch's device time has passed.
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .packed_steps import pack_steps, packed_preemptions, unpack_steps
from .shapes import ShapeCache
from .trace import TraceRequest

_SAMPLED_TOKEN = 5
_TOKEN_SPACE = 1 << 30
_MIX = 0x9E3779B97F4A7C15


@dataclass(frozen=True)
class StepFeatures:
    """What a step computes: the step-time model's inputs."""

    prefill_tokens: int
    decode_tokens: int
    num_prefill_reqs: int
    num_decode_reqs: int
    prefill_context: int
    decode_context: int
    new_shape: int = 0  # 1 when the step's token count missed the engine's kernel cache (shapes.py)

    @property
    def batch_size(self) -> int:
        return self.num_prefill_reqs + self.num_decode_reqs

    @property
    def total_tokens(self) -> int:
        return self.prefill_tokens + self.decode_tokens


StepTimer = Callable[[int, StepFeatures], int]
"""(step index, features) -> step duration in ns: the cycle from this step's schedule to the next one's.
A timer may also have `output_lag(index) -> ns`: how long before the cycle's end the step's outputs
were ready (the engine loop's own work after the update); tokens count from then."""


@dataclass
class SimRequest:
    """One replayed request's timeline (virtual ns from the trace's start)."""

    trace: TraceRequest
    arrival_ns: int
    engine_arrival_ns: int
    reply_delay_ns: int
    first_scheduled_ns: int | None = None
    first_token_ns: int | None = None
    completion_ns: int | None = None
    generated: int = 0
    preemptions: int = 0
    prefix_hit_tokens: int = 0
    num_iterations: int = 0
    first_batch_id: int | None = None
    aborted: bool = False


@dataclass(frozen=True)
class SimStep:
    """One replayed step: composition rows are (rid, phase, scheduled, computed_before, prompt_tokens)."""

    batch_id: int
    start_ns: int
    end_ns: int
    composition: tuple[tuple[str, str, int, int, int], ...]
    features: StepFeatures
    running: int
    waiting: int
    kv_used_blocks: int
    kv_total_blocks: int
    preempted: tuple[str, ...]
    finished: int


class SimResult:
    """A replay: its requests, its steps (built from packed columns on first use after unpickling, see
    packed_steps.py) and notes."""

    def __init__(self, requests: list[SimRequest], steps: list[SimStep], notes: list[str] | None = None) -> None:
        self.requests = requests
        self.notes = [] if notes is None else notes
        self._steps: list[SimStep] | None = steps
        self._packed: dict[str, Any] | None = None

    @property
    def steps(self) -> list[SimStep]:
        if self._steps is None:
            assert self._packed is not None
            self._steps = unpack_steps(self._packed)
            self._packed = None
        return self._steps

    @property
    def preemptions(self) -> int:
        if self._steps is None and self._packed is not None:
            return packed_preemptions(self._packed)
        return sum(len(s.preempted) for s in self.steps)

    def __getstate__(self) -> dict[str, Any]:
        packed = self._packed if self._steps is None else pack_steps(self._steps)
        return {"requests": self.requests, "notes": self.notes, "packed": packed}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.requests, self.notes = state["requests"], state["notes"]
        self._steps, self._packed = None, state["packed"]


def prompt_token_ids(trace: TraceRequest, index: int) -> list[int]:
    """Token ids standing for the prompt: the recorded ids, or ids derived from the block hashes (equal
    hashes give equal blocks), then ids unique to this request for the rest."""
    if trace.token_ids is not None:
        return list(trace.token_ids)
    tokens: list[int] = []
    if trace.block_hashes and trace.hash_block:
        size = trace.hash_block
        for h in trace.block_hashes:
            base = (h * _MIX) & 0xFFFFFFFFFFFFFFFF
            tokens.extend(((base >> (j % 32)) ^ (base * (j + 1))) % _TOKEN_SPACE + 1 for j in range(size))
    seed = ((index + 1) * _MIX) & 0xFFFFFFFFFFFFFFFF
    start = len(tokens)
    tokens.extend((seed + j * 0x2545F491) % _TOKEN_SPACE + 1 for j in range(start, trace.prompt_tokens))
    return tokens[:trace.prompt_tokens]


def _make_request(trace: TraceRequest, prompt: list[int], block_size: int, caching: bool) -> Any:
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    params = SamplingParams(max_tokens=trace.output_tokens, ignore_eos=True, detokenize=False)
    hasher = _block_hasher(block_size) if caching else None
    return Request(request_id=trace.rid, prompt_token_ids=prompt, sampling_params=params,
                   pooling_params=None, block_hasher=hasher, priority=trace.priority)


def arrival_order(requests: Sequence[SimRequest]) -> list[SimRequest]:
    """The order the engine receives `requests` in (engine arrival, then rid): a request's place in it
    picks its made-up prompt tokens."""
    return sorted(requests, key=lambda r: (r.engine_arrival_ns, r.trace.rid))


PROMPT_CACHE_TOKENS = 4_000_000
"""A twin keeps the made-up prompts of a workload up to this many tokens (8 bytes each)."""


class PromptCache:
    """(rid, place in the arrival order) -> prompt token ids. They are the same for every config of a
    workload, so a twin makes them once (before a sweep forks its workers) instead of once per replay;
    a workload larger than `limit` tokens makes the rest again each time."""

    def __init__(self, limit: int = PROMPT_CACHE_TOKENS) -> None:
        self.limit = limit
        self.tokens = 0
        self._ids: dict[tuple[str, int], array[int]] = {}

    def get(self, trace: TraceRequest, index: int) -> list[int]:
        """The prompt's token ids, a new list each call (the Request keeps it)."""
        key = (trace.rid, index)
        ids = self._ids.get(key)
        if ids is not None:
            return ids.tolist()
        tokens = prompt_token_ids(trace, index)
        if self.tokens + len(tokens) <= self.limit:
            self._ids[key] = array("q", tokens)
            self.tokens += len(tokens)
        return tokens


_HASHERS: dict[int, Any] = {}


def _block_hasher(block_size: int) -> Any:
    if block_size not in _HASHERS:
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash

        init_none_hash(sha256)
        _HASHERS[block_size] = get_request_block_hasher(block_size, sha256)
    return _HASHERS[block_size]


class Simulation:
    """One replay of `requests` through `scheduler` (built by engine_config.build_scheduler)."""

    def __init__(self, scheduler: Any, requests: Sequence[SimRequest], step_time: StepTimer, *,
                 block_size: int, prefix_caching: bool, batch_queue_size: int = 1,
                 prompts: PromptCache | None = None) -> None:
        self.scheduler = scheduler
        self.order = arrival_order(requests)
        self.prompts = PromptCache() if prompts is None else prompts
        self.by_rid = {r.trace.rid: r for r in self.order}
        self.step_time = step_time
        self.output_lag: Callable[[int], int] | None = getattr(step_time, "output_lag", None)
        self.block_size = block_size
        self.caching = prefix_caching
        self.depth = max(1, batch_queue_size)
        self.next_arrival = 0
        self.shapes = ShapeCache()
        self.steps: list[SimStep] = []
        self.notes: list[str] = []

    def _admit(self, now: int) -> None:
        order = self.order
        while self.next_arrival < len(order) and order[self.next_arrival].engine_arrival_ns <= now:
            trace = order[self.next_arrival].trace
            prompt = self.prompts.get(trace, self.next_arrival)
            self.scheduler.add_request(_make_request(trace, prompt, self.block_size, self.caching))
            self.next_arrival += 1

    def _pending_arrival(self) -> int | None:
        if self.next_arrival < len(self.order):
            return self.order[self.next_arrival].engine_arrival_ns
        return None

    def _schedule(self, start: int) -> tuple[Any, Any, StepFeatures, tuple[Any, ...]]:
        from vllm.v1.outputs import ModelRunnerOutput

        scheduler = self.scheduler
        out = scheduler.schedule()
        live = scheduler.requests
        scheduled = out.num_scheduled_tokens
        req_ids = list(scheduled)
        sampled: list[list[int]] = []
        comp = []
        pre_t = dec_t = pre_n = dec_n = pre_ctx = dec_ctx = 0
        batch_id = len(self.steps)
        for new in out.scheduled_new_reqs:
            sim = self.by_rid[new.req_id]
            if sim.first_scheduled_ns is None:
                sim.first_scheduled_ns = start
                sim.first_batch_id = batch_id
                sim.prefix_hit_tokens = new.num_computed_tokens
        for rid, tokens in scheduled.items():
            request = live[rid]
            computed = request.num_computed_tokens
            before = computed - tokens
            prompt = request.num_prompt_tokens
            sampled.append([_SAMPLED_TOKEN] if computed >= request.num_tokens else [])
            if before < prompt or tokens > 1:
                comp.append((rid, "prefill", tokens, before, prompt))
                pre_t += tokens
                pre_n += 1
                pre_ctx += tokens * (before + tokens // 2)
            else:
                comp.append((rid, "decode", tokens, before, prompt))
                dec_t += tokens
                dec_n += 1
                dec_ctx += before + tokens
        for rid in out.preempted_req_ids or ():
            self.by_rid[rid].preemptions += 1
        output = ModelRunnerOutput(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                                   sampled_token_ids=sampled)
        new_shape = int(self.shapes.miss(pre_t + dec_t)) if pre_t + dec_t > 0 else 0
        return out, output, StepFeatures(pre_t, dec_t, pre_n, dec_n, pre_ctx, dec_ctx, new_shape), tuple(comp)

    def _outputs_at(self, index: int, start: int, end: int) -> int:
        """When step `index` (start..end) had its outputs: `output_lag` before its end."""
        lag = self.output_lag(index) if self.output_lag is not None else 0
        return max(end - max(lag, 0), start + 1) if lag else end

    def _update(self, out: Any, output: Any, end: int) -> int:
        """Apply the step's outputs; `end` is when they were ready."""
        self.scheduler.update_from_output(out, output)
        finished = 0
        for rid, tokens in zip(output.req_ids, output.sampled_token_ids, strict=True):
            if not tokens:
                continue
            sim = self.by_rid[rid]
            sim.generated += 1
            if sim.first_token_ns is None:
                sim.first_token_ns = end + sim.reply_delay_ns
            if sim.generated >= sim.trace.output_tokens and sim.completion_ns is None:
                sim.completion_ns = end + sim.reply_delay_ns
                finished += 1
        return finished

    def _record(self, start: int, end: int, out: Any, feats: StepFeatures, comp: tuple[Any, ...]) -> None:
        scheduler = self.scheduler
        pool = scheduler.kv_cache_manager.block_pool
        total = pool.num_gpu_blocks - 1
        self.steps.append(SimStep(len(self.steps), start, end, comp, feats, len(scheduler.running),
                                  len(scheduler.waiting), total - pool.get_num_free_blocks(), total,
                                  tuple(sorted(out.preempted_req_ids or ())), len(out.finished_req_ids)))

    def _stalled(self, clock: int) -> int | None:
        """Nothing could be scheduled and nothing runs: wait for the next arrival, or give up on the
        waiting requests (they can never fit) when none is left."""
        nxt = self._pending_arrival()
        if nxt is not None:
            return max(nxt, clock + 1)
        stuck = [r.request_id for r in list(self.scheduler.waiting)]
        from vllm.v1.request import RequestStatus

        self.scheduler.finish_requests(stuck, RequestStatus.FINISHED_ABORTED)
        for rid in stuck:
            self.by_rid[rid].aborted = True
        self.notes.append(f"{len(stuck)} request(s) could never be scheduled (KV cache too small) and were dropped")
        return None

    def run(self) -> SimResult:
        if self.depth > 1:
            self._run_batch_queue()
        else:
            self._run_sync()
        # A request's iterations are the steps it was scheduled in: counted once here, not in every step.
        by_rid = self.by_rid
        for step in self.steps:
            for row in step.composition:
                by_rid[row[0]].num_iterations += 1
        return SimResult(list(self.order), self.steps, self.notes)

    def _run_sync(self) -> None:
        scheduler = self.scheduler
        starts = getattr(self.step_time, "starts", None)
        clock = 0
        while True:
            if not scheduler.has_unfinished_requests():
                nxt = self._pending_arrival()
                if nxt is None:
                    return
                clock = max(clock, nxt)
            index = len(self.steps)
            if starts is not None and index < len(starts):
                clock = max(clock, starts[index])  # measured: the step began when the real one did
            self._admit(clock)
            out, output, feats, comp = self._schedule(clock)
            if out.total_num_scheduled_tokens == 0:
                # An empty step (nothing fits, or only finished ids to report) takes no model time and is
                # not a batch, as in the captured tables.
                self.scheduler.update_from_output(out, output)
                resume = self._stalled(clock) if not scheduler.running else clock + 1
                if resume is not None:
                    clock = resume
                continue
            end = clock + max(int(self.step_time(index, feats)), 1)
            self._record(clock, end, out, feats, comp)
            self._update(out, output, self._outputs_at(index, clock, end))
            clock = end

    def _run_batch_queue(self) -> None:
        scheduler = self.scheduler
        queue: deque[tuple[Any, Any, int, int]] = deque()
        clock = 0  # the engine's own time
        device_free = 0
        while True:
            if not scheduler.has_unfinished_requests() and not queue:
                nxt = self._pending_arrival()
                if nxt is None:
                    return
                clock = max(clock, nxt)
            self._admit(clock)
            if scheduler.has_unfinished_requests() and len(queue) < self.depth:
                index = len(self.steps)
                out, output, feats, comp = self._schedule(clock)
                start = max(clock, device_free)
                end = start + max(int(self.step_time(index, feats)), 1)
                device_free = end
                self._record(start, end, out, feats, comp)
                queue.append((out, output, end, self._outputs_at(index, start, end)))
                if out.total_num_scheduled_tokens > 0 and len(queue) < self.depth:
                    continue
            if not queue:
                continue
            out, output, end, ready = queue.popleft()
            clock = max(clock, end)
            self._update(out, output, ready)
            if out.total_num_scheduled_tokens == 0 and not scheduler.running and not queue:
                resume = self._stalled(clock)
                if resume is not None:
                    clock = resume
