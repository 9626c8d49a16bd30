"""Synthetic raw runs (format v1, vLLM vocabulary) with known ground truth.

`generate_run(out_dir, SyntheticConfig(...))` simulates a vLLM v1 server: an API-server process that
accepts requests (`httpReq`), receives engine outputs (`tokens`) and answers (`httpRes`), and one
EngineCore process per data-parallel rank running continuous batching with chunked prefill,
`max_num_seqs`, a token budget, a paged KV cache (allocation, preemption by recompute, free) and prefix
cache hits. Every step writes `batchFrameworkProcessing`, `modelExec`, `updateFromOutput` and
`EngineCore/step` spans, request `state` events, KVCache events and the `kvcache` / `queues` counters.

The simulation decides the true times itself, so `SyntheticRun.truth` is ground truth that does not go
through the reader or the analysis: tests compare the analysis against it. Definitions match the
analysis tables (docs/DESIGN.md "Analysis tables"): arrival = `httpReq` ts, engine arrival = `enqueue`
ts, first scheduled = start of the first `batchFrameworkProcessing` span containing the request, first
token = the API's first `tokens` event with new tokens for it, completion = the API's finishing `tokens`
event.

Clocks: each process file has its own `{"wall_ns","mono_ns"}` anchor. `engine_mono_offset_ns` moves
the engine's monotonic clock (as if on another host), so a reader that ignores the anchor gets wrong
answers.
"""

from __future__ import annotations

import json
import math
import random
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MS = 1_000_000
US = 1_000


@dataclass
class SyntheticConfig:
    requests: int = 100
    output_tokens: int = 16
    prompt_tokens: tuple[int, int] = (64, 512)
    arrival_rate_per_s: float = 500.0   # Poisson arrivals at the API server; <= 0 means all at once
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    num_gpu_blocks: int = 100_000
    prefix_hit_fraction: float = 0.25   # share of requests with a prefix-cache hit
    dp_size: int = 1
    seed: int = 0
    hostname: str = "synth-host"
    engine_hostname: str | None = None  # default: same host as the API server
    engine_mono_offset_ns: int = 0      # engine's monotonic clock minus the API server's
    api_pid: int = 4100
    engine_pid: int = 4200
    start_wall_ns: int = 1_750_000_000_000_000_000
    flush_every: int = 256              # records per `rec` line
    host_sample_period_ns: int = 500 * MS
    runner_timer_spans: bool = False    # the default YAML's runnerExecute / runnerSample timer spans per step


@dataclass
class TrueRequest:
    rid: str
    api_rid: str
    dp_rank: int
    input_tokens: int
    output_tokens: int
    arrival_ns: int = 0
    engine_arrival_ns: int = 0
    first_scheduled_ns: int = 0
    first_token_ns: int = 0
    completion_ns: int = 0
    preemptions: int = 0
    prefix_hit_tokens: int = 0
    peak_blocks: int = 0

    @property
    def ttft_ms(self) -> float:
        return (self.first_token_ns - self.arrival_ns) / MS

    @property
    def queue_ms(self) -> float:
        return (self.first_scheduled_ns - self.engine_arrival_ns) / MS

    @property
    def e2e_ms(self) -> float:
        return (self.completion_ns - self.arrival_ns) / MS

    @property
    def prefill_ms(self) -> float:
        return (self.first_token_ns - self.first_scheduled_ns) / MS

    @property
    def decode_ms(self) -> float:
        return (self.completion_ns - self.first_token_ns) / MS

    @property
    def tpot_ms(self) -> float:
        if self.output_tokens <= 1:
            return math.nan
        return (self.completion_ns - self.first_token_ns) / MS / (self.output_tokens - 1)


@dataclass
class TrueBatch:
    dp_rank: int
    batch_id: int
    start_ns: int
    schedule_ms: float
    model_run_ms: float
    step_ms: float
    batch_size: int
    num_prefill_reqs: int
    num_decode_reqs: int
    total_scheduled_tokens: int
    blocks_allocated: int
    blocks_freed: int
    kv_used_blocks: int


@dataclass
class SyntheticRun:
    run_dir: Path
    files: list[Path]
    requests: dict[str, TrueRequest]
    batches: list[TrueBatch]
    num_records: int
    config: SyntheticConfig

    def truth_json(self) -> dict[str, Any]:
        reqs = {}
        for rid, t in self.requests.items():
            row = asdict(t)
            row.update(ttft_ms=t.ttft_ms, queue_ms=t.queue_ms, e2e_ms=t.e2e_ms, prefill_ms=t.prefill_ms,
                       decode_ms=t.decode_ms, tpot_ms=None if math.isnan(t.tpot_ms) else t.tpot_ms)
            reqs[rid] = row
        return {"config": asdict(self.config), "num_records": self.num_records, "requests": reqs,
                "batches": [asdict(b) for b in self.batches]}


class _ProcWriter:
    """Collects one process's records, then writes them as a raw file sorted by the time they were recorded
    (spans when they end, like the real writer thread)."""

    def __init__(self, hostname: str, pid: int, role: str, wall_offset_ns: int, mono_start: int) -> None:
        self.hostname, self.pid, self.role = hostname, pid, role
        self.wall_offset_ns = wall_offset_ns  # epoch = mono + wall_offset_ns
        self.mono_start = mono_start
        self.chan_ids: dict[tuple[str, str, str], int] = {}
        self.chan_lines: list[dict[str, Any]] = []
        self.items: list[tuple[int, int, list[Any]]] = []  # (recorded-at mono, chan id, record)
        self.meta: list[tuple[str, Any]] = []

    def _chan(self, kind: str, domain: str, name: str) -> int:
        key = (kind, domain, name)
        cid = self.chan_ids.get(key)
        if cid is None:
            cid = self.chan_ids[key] = len(self.chan_ids) + 1
            self.chan_lines.append({"t": "chan", "id": cid, "kind": kind, "domain": domain, "name": name})
        return cid

    def mono(self, epoch_ns: int) -> int:
        return epoch_ns - self.wall_offset_ns

    def span(self, domain: str, name: str, start: int, end: int, attrs: dict[str, Any] | None) -> None:
        cid = self._chan("span", domain, name)
        self.items.append((self.mono(end), cid, [cid, self.mono(start), self.mono(end), 1, attrs]))

    def event(self, domain: str, name: str, ts: int, attrs: dict[str, Any] | None) -> None:
        cid = self._chan("event", domain, name)
        self.items.append((self.mono(ts), cid, [cid, self.mono(ts), 1, attrs]))

    def counter(self, domain: str, name: str, ts: int, values: dict[str, float]) -> None:
        cid = self._chan("counter", domain, name)
        self.items.append((self.mono(ts), cid, [cid, self.mono(ts), values]))

    def write(self, run_dir: Path, flush_every: int, engine: dict[str, str] | None) -> Path:
        path = run_dir / f"{self.hostname}-{self.pid}.sprof.jsonl"
        header = {"t": "header", "format": 1, "hostname": self.hostname, "pid": self.pid, "ppid": 1,
                  "role": self.role, "argv": ["vllm", "serve", "synthetic"], "profiler_version": "0.1.0",
                  "engine": engine, "clock": {"wall_ns": self.mono_start + self.wall_offset_ns,
                                              "mono_ns": self.mono_start}}
        self.items.sort(key=lambda it: it[0])
        declared: set[int] = set()
        chan_by_id = {c["id"]: c for c in self.chan_lines}
        dumps = json.dumps
        with path.open("w", encoding="utf-8") as fh:
            fh.write(dumps(header) + "\n")
            for key, value in self.meta:
                fh.write(dumps({"t": "meta", "key": key, "value": value}) + "\n")
            fh.write(dumps({"t": "state", "enabled": True, "ts": self.mono_start, "reason": "startup"}) + "\n")
            for i in range(0, len(self.items), flush_every):
                chunk = self.items[i:i + flush_every]
                for _, cid, _ in chunk:
                    if cid not in declared:
                        declared.add(cid)
                        fh.write(dumps(chan_by_id[cid], separators=(",", ":")) + "\n")
                fh.write(dumps({"t": "rec", "r": [rec for _, _, rec in chunk]}, separators=(",", ":")) + "\n")
            fh.write(dumps({"t": "dropped", "count": 0, "ts": self.items[-1][0] if self.items else 0}) + "\n")
        return path


@dataclass
class _Req:
    truth: TrueRequest
    prompt: int
    target: int              # output tokens to generate
    hit: int                 # prefix-cache hit tokens (first schedule only)
    computed: int = 0
    generated: int = 0
    blocks: int = 0
    resumed: bool = False
    scheduled_once: bool = False
    state: str = "WAITING"


@dataclass
class _Engine:
    cfg: SyntheticConfig
    dp_rank: int
    w: _ProcWriter
    api: _ProcWriter
    rng: random.Random
    free_blocks: int = 0
    batches: list[TrueBatch] = field(default_factory=list)
    _allocated: int = 0      # blocks allocated / freed during the current step
    _freed: int = 0
    # like the real handler, allocations and admissions are recorded when schedule() returns
    _deferred: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    def alloc(self, req: _Req, new_tokens: int, ts: int) -> bool:
        need = -(-(req.computed + new_tokens) // self.cfg.block_size) - req.blocks
        if need <= 0:
            return True
        if need > self.free_blocks:
            return False
        self.free_blocks -= need
        req.blocks += need
        req.truth.peak_blocks = max(req.truth.peak_blocks, req.blocks)
        self._deferred.append(("KVCache", "allocate", {"rid": req.truth.rid, "blocks": need}))
        self._allocated += need
        return True

    def release(self, req: _Req, ts: int) -> None:
        if req.blocks:
            self.w.event("KVCache", "free", ts, {"rid": req.truth.rid, "blocks": req.blocks})
            self._freed += req.blocks
            self.free_blocks += req.blocks
            req.blocks = 0

    def run(self, reqs: list[_Req]) -> None:
        cfg, w = self.cfg, self.w
        self.free_blocks = cfg.num_gpu_blocks
        pending = deque(sorted(reqs, key=lambda r: r.truth.engine_arrival_ns))
        waiting: deque[_Req] = deque()
        running: list[_Req] = []
        finished_last: list[str] = []
        t = pending[0].truth.engine_arrival_ns if pending else 0
        batch_id = 0
        next_sample = t
        while pending or waiting or running:
            if not waiting and not running:
                t = max(t, pending[0].truth.engine_arrival_ns)
            while pending and pending[0].truth.engine_arrival_ns <= t:
                waiting.append(pending.popleft())
            while next_sample <= t:
                w.counter("System", "host", next_sample, {"cpu_percent": 50.0 + self.rng.random() * 10,
                                                          "mem_used_bytes": 8e9, "mem_percent": 25.0})
                next_sample += cfg.host_sample_period_ns
            self._allocated = self._freed = 0
            step_start = t
            sched_start = t + 20 * US
            ts = sched_start + 5 * US
            budget = cfg.max_num_batched_tokens
            entries: list[list[Any]] = []
            scheduled: list[tuple[_Req, int]] = []
            preempted: list[str] = []
            idx = 0
            while idx < len(running) and budget > 0:
                req = running[idx]
                eff = req.prompt + req.generated if req.resumed else req.prompt
                num_new = 1 if req.computed >= eff else min(eff - req.computed, budget)
                while not self.alloc(req, num_new, ts):
                    victim = running.pop()
                    victim.state, victim.computed, victim.resumed = "PREEMPTED", 0, True
                    victim.truth.preemptions += 1
                    self.release(victim, ts)
                    self._deferred.append(("Request", "state", {"rid": victim.truth.rid, "from": "RUNNING",
                                                                "to": "PREEMPTED", "batch_id": batch_id}))
                    preempted.append(victim.truth.rid)
                    waiting.appendleft(victim)
                    if victim is req:
                        break
                if req.state != "RUNNING":
                    break
                entries.append([req.truth.rid, 0 if req.computed < eff else 1, num_new, req.computed,
                                req.prompt, 0])
                scheduled.append((req, num_new))
                budget -= num_new
                idx += 1
            while not preempted and waiting and len(running) < cfg.max_num_seqs and budget > 0:
                req = waiting[0]
                if not req.scheduled_once:
                    req.computed = req.hit
                eff = req.prompt + req.generated if req.resumed else req.prompt
                num_new = min(eff - req.computed, budget)
                if not self.alloc(req, num_new, ts):
                    break
                waiting.popleft()
                if not req.scheduled_once:
                    req.scheduled_once = True
                    req.truth.first_scheduled_ns = sched_start
                    w.event("KVCache", "cacheHit", ts, {"rid": req.truth.rid, "hit_tokens": req.hit,
                                                        "query_tokens": req.prompt})
                self._deferred.append(("Request", "state", {"rid": req.truth.rid, "from": req.state,
                                                            "to": "RUNNING", "batch_id": batch_id}))
                req.state = "RUNNING"
                running.append(req)
                entries.append([req.truth.rid, 0, num_new, req.computed, req.prompt, 1 if req.resumed else 0])
                scheduled.append((req, num_new))
                budget -= num_new
            if not entries and not running and waiting:
                raise ValueError(f"num_gpu_blocks={cfg.num_gpu_blocks} cannot hold request "
                                 f"{waiting[0].truth.rid}; raise it")
            total_tokens = sum(n for _, n in scheduled)
            sched_end = sched_start + 150 * US + 2 * US * len(entries) + 7 * US * len(preempted)
            for domain, name, attrs in self._deferred:
                if name == "allocate":
                    attrs["batch_id"] = batch_id
                w.event(domain, name, sched_end, attrs)
            self._deferred.clear()
            used = cfg.num_gpu_blocks - self.free_blocks
            usage = used / cfg.num_gpu_blocks
            w.span("BatchSchedule", "batchFrameworkProcessing", sched_start, sched_end, {
                "batch_id": batch_id, "dp_rank": self.dp_rank, "reqs": entries, "running": len(running),
                "waiting": len(waiting), "preempted": preempted, "finished": finished_last,
                "total_tokens": total_tokens, "kv_total_blocks": cfg.num_gpu_blocks,
                "kv_used_blocks": used, "kv_usage": usage})
            w.counter("KVCache", "kvcache", sched_end, {"total_blocks": cfg.num_gpu_blocks,
                                                        "used_blocks": used, "usage": usage})
            w.counter("BatchSchedule", "queues", sched_end, {"running": len(running), "waiting": len(waiting)})
            exec_start = sched_end + 10 * US
            model_ns = int(4 * MS + 20 * US * total_tokens + 30 * US * len(entries)
                           + self.rng.randint(0, 200) * US)
            exec_end = exec_start + model_ns
            w.span("ModelExecute", "modelExec", exec_start, exec_end, {"batch_id": batch_id,
                                                                        "dp_rank": self.dp_rank})
            if cfg.runner_timer_spans:
                # the default YAML's timer probes on GPUModelRunner.execute_model / sample_tokens
                run_end = exec_end - 300 * US
                w.span("ModelExecute", "runnerExecute", exec_start + 30 * US, run_end, None)
                w.span("ModelExecute", "runnerSample", run_end + 20 * US, exec_end - 20 * US, None)
            upd_start = exec_end + 10 * US
            upd_end = upd_start + 60 * US + 1 * US * len(entries)
            token_ts = upd_end + 150 * US
            out_entries: list[list[Any]] = []
            done: list[list[str]] = []
            finished_last = []
            for req, num_new in scheduled:
                eff = req.prompt + req.generated if req.resumed else req.prompt
                req.computed += num_new
                if req.computed < eff:
                    continue  # partial prefill chunk: no token this step
                req.resumed = False
                req.generated += 1
                if req.truth.first_token_ns == 0:
                    req.truth.first_token_ns = token_ts
                if req.generated >= req.target:
                    req.truth.completion_ns = token_ts
                    req.state = "FINISHED_LENGTH_CAPPED"
                    running.remove(req)
                    self.release(req, upd_start + 20 * US)
                    w.event("Request", "state", upd_start + 20 * US, {
                        "rid": req.truth.rid, "from": "RUNNING", "to": "FINISHED_LENGTH_CAPPED",
                        "batch_id": batch_id})
                    done.append([req.truth.rid, "length"])
                    finished_last.append(req.truth.rid)
                    out_entries.append([req.truth.rid, 1, 1, "length"])
                    self.api.event("Request", "httpRes", token_ts + 30 * US, {
                        "rid": req.truth.rid, "output_tokens": req.generated, "finish_reason": "length"})
                else:
                    out_entries.append([req.truth.rid, 1, 0, None])
            w.span("BatchSchedule", "updateFromOutput", upd_start, upd_end, {"batch_id": batch_id,
                                                                               "finished": done})
            w.span("EngineCore", "step", step_start, upd_end + 5 * US, {"batch_id": batch_id})
            if out_entries:
                self.api.event("Request", "tokens", token_ts, {"reqs": out_entries})
            self.batches.append(TrueBatch(
                dp_rank=self.dp_rank, batch_id=batch_id, start_ns=sched_start,
                schedule_ms=(sched_end - sched_start) / MS, model_run_ms=model_ns / MS,
                step_ms=(upd_end + 5 * US - step_start) / MS, batch_size=len(entries),
                num_prefill_reqs=sum(1 for e in entries if e[1] == 0),
                num_decode_reqs=sum(1 for e in entries if e[1] == 1), total_scheduled_tokens=total_tokens,
                blocks_allocated=self._allocated, blocks_freed=self._freed, kv_used_blocks=used))
            batch_id += 1
            t = upd_end + 40 * US


def generate_run(out_dir: Path | str, config: SyntheticConfig | None = None) -> SyntheticRun:
    """Simulate a run and write its raw files under `out_dir` (created). Returns the ground truth."""
    cfg = config or SyntheticConfig()
    run_dir = Path(out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    t0 = cfg.start_wall_ns + 50 * MS
    # API clock: mono = epoch - offset; mono starts near 10 s after boot. Engine clock optionally elsewhere.
    api_offset = cfg.start_wall_ns - 10_000 * MS
    api = _ProcWriter(cfg.hostname, cfg.api_pid, "api_server", api_offset, cfg.start_wall_ns - api_offset)
    api.meta.append(("role", "api_server"))
    engines: list[_Engine] = []
    for rank in range(cfg.dp_size):
        offset = api_offset - cfg.engine_mono_offset_ns
        start = cfg.start_wall_ns + 5 * MS * (rank + 1)
        w = _ProcWriter(cfg.engine_hostname or cfg.hostname, cfg.engine_pid + rank, "engine_core", offset,
                        start - offset)
        w.meta += [("role", "engine_core"), ("dp_rank", rank), ("device", "cpu")]
        engines.append(_Engine(cfg, rank, w, api, random.Random(cfg.seed * 1000 + rank + 1)))
    truth: dict[str, TrueRequest] = {}
    per_rank: list[list[_Req]] = [[] for _ in range(cfg.dp_size)]
    t = t0
    lo, hi = cfg.prompt_tokens
    for i in range(cfg.requests):
        if cfg.arrival_rate_per_s > 0:
            t += int(rng.expovariate(cfg.arrival_rate_per_s) * 1e9)
        rank = i % cfg.dp_size
        prompt = rng.randint(lo, hi)
        hit = 0
        if rng.random() < cfg.prefix_hit_fraction:
            hit = (rng.randint(0, prompt - 1) // cfg.block_size) * cfg.block_size
        # vLLM's shapes: the API server's "cmpl-<32 hex>-0", the engine's adds "-<8 hex>"
        api_rid = f"cmpl-{rng.getrandbits(128):032x}-0"
        rid = f"{api_rid}-{rng.getrandbits(32):08x}"
        tr = TrueRequest(rid=rid, api_rid=api_rid, dp_rank=rank, input_tokens=prompt,
                         output_tokens=cfg.output_tokens, prefix_hit_tokens=hit)
        tr.arrival_ns = t
        tr.engine_arrival_ns = t + 300 * US + rng.randint(0, 100) * US
        api.event("Request", "httpReq", t, {"rid": rid, "api_rid": tr.api_rid, "prompt_tokens": prompt,
                                            "max_tokens": cfg.output_tokens, "stream": True})
        engines[rank].w.event("Request", "enqueue", tr.engine_arrival_ns, {"rid": rid, "prompt_tokens": prompt})
        truth[rid] = tr
        per_rank[rank].append(_Req(tr, prompt, cfg.output_tokens, hit))
    for eng, reqs in zip(engines, per_rank, strict=True):
        eng.run(reqs)
    engine_info = {"name": "vllm", "version": "0.32.0"}
    files = [api.write(run_dir, cfg.flush_every, engine_info)]
    files += [e.w.write(run_dir, cfg.flush_every, engine_info) for e in engines]
    # patch report on the engine: what `inspect` shows
    with files[1].open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"t": "patch", "applied": ["vllm.v1.core.sched.scheduler:Scheduler.schedule"],
                             "skipped": [{"symbol": "vllm_ascend.worker:NPUModelRunner.execute_model",
                                          "reason": "module not imported"}], "failed": []}) + "\n")
    num_records = len(api.items) + sum(len(e.w.items) for e in engines)
    batches = [b for e in engines for b in e.batches]
    return SyntheticRun(run_dir, files, truth, batches, num_records, cfg)


def write_truth(run: SyntheticRun, path: Path | str) -> None:
    Path(path).write_text(json.dumps(run.truth_json(), indent=1), encoding="utf-8")
