"""Per-request entries of every batch, as column chunks.

A long run holds millions of (batch, request) entries; per_iteration_requests.csv and the SQLite
batch_req table each need all of them. Building one Python tuple per entry and formatting it in a
Python loop costs ~2 µs an entry, so instead each chunk of batches is turned into columns with C-level
`map(itemgetter(k))` / list repetition, and only the per-request sequential state (iteration index,
tokens generated so far, time in the current state) is a Python loop. Consumers `zip` the columns
(C-level again) into `executemany` or `%`-format them. Chunks bound the memory (a few MB each).

Per entry: the request is "running" in that step, or "completed" when the step's updateFromOutput
finished it. Requests a step preempted are separate `preempted` rows (few): they carry no entry.
generated_tokens_before counts the steps that produced a token for the request before this one (a
decode step, or the step where its prefill, or its recompute after preemption, completed).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

from .tables import MS, AnalysisTables

_GETTERS = [itemgetter(k) for k in range(6)]
_PHASE_NAME = {0: "prefill", 1: "decode"}


@dataclass
class EntryChunk:
    # one value per entry
    batch_row: list[int] = field(default_factory=list)
    batch_id: list[Any] = field(default_factory=list)
    dp_rank: list[Any] = field(default_factory=list)
    proc: list[Any] = field(default_factory=list)
    start_ns: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    rid: list[Any] = field(default_factory=list)
    phase: list[Any] = field(default_factory=list)
    scheduled: list[Any] = field(default_factory=list)
    computed: list[Any] = field(default_factory=list)
    prompt: list[Any] = field(default_factory=list)
    resumed: list[Any] = field(default_factory=list)
    state: list[str] = field(default_factory=list)
    iteration: list[int] = field(default_factory=list)
    generated_before: list[int] = field(default_factory=list)
    time_in_state_ms: list[float] = field(default_factory=list)
    # (batch_row, index in the entry lists where that batch's entries end)
    batch_ends: list[tuple[int, int]] = field(default_factory=list)
    # per-iteration rows (lifecycle.ITERATION_COLUMNS) of requests preempted by a step, with its batch_row
    preempted: list[tuple[int, tuple[Any, ...]]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rid)

    def phase_names(self) -> list[Any]:
        return list(map(_PHASE_NAME.get, self.phase))


def _columns(reqs: list[Any]) -> list[list[Any]]:
    """The six entry fields as columns; entries written without the trailing fields get None / 0."""
    try:
        return [list(map(g, reqs)) for g in _GETTERS]
    except (IndexError, TypeError):
        padded = [(list(e) + [None, None, None, 0][max(0, len(e) - 2):])[:6] for e in reqs]
        return [list(map(g, padded)) for g in _GETTERS]


def iter_entry_chunks(tables: AnalysisTables, batches_per_chunk: int = 1024) -> Iterator[EntryChunk]:
    rows = tables.batches.rows
    spans, finished_lists = tables.batch_spans, tables.batch_finished
    # per rid: [iterations so far, tokens generated so far, when its current state began]
    per_rid: dict[Any, list[Any]] = {}
    get_state = per_rid.get
    chunk = EntryChunk()
    ms = MS
    for i, span in enumerate(spans):
        attrs = span.attrs or {}
        reqs = attrs.get("reqs") or []
        bid, dp, proc, start = rows[i][0], rows[i][1], rows[i][2], rows[i][3]
        n = len(reqs)
        if n:
            rid, phase, sched, comp, prompt, resumed = _columns(reqs)
            chunk.batch_row += [i] * n
            chunk.batch_id += [bid] * n
            chunk.dp_rank += [dp] * n
            chunk.proc += [proc] * n
            chunk.start_ns += [start] * n
            chunk.pos += range(n)
            chunk.rid += rid
            chunk.phase += phase
            chunk.scheduled += sched
            chunk.computed += comp
            chunk.prompt += prompt
            chunk.resumed += resumed
            state = ["running"] * n
            for item in finished_lists[i]:
                done = item[0] if isinstance(item, list | tuple) and item else item
                if done in rid:
                    state[rid.index(done)] = "completed"
            chunk.state += state
            it_add, gen_add = chunk.iteration.append, chunk.generated_before.append
            t_add = chunk.time_in_state_ms.append
            for r, ph, sc, co, pr, re in zip(rid, phase, sched, comp, prompt, resumed, strict=True):
                st = get_state(r)
                if st is None:
                    st = per_rid[r] = [1, 0, start]
                    it = gen = 0
                    t_add(0.0)
                else:
                    it, gen = st[0], st[1]
                    st[0] = it + 1
                    if re or not it:  # resumed, or first run after a preemption that came first
                        st[2] = start
                        t_add(0.0)
                    else:
                        t_add((start - st[2]) / ms)
                it_add(it)
                gen_add(gen)
                if ph or (pr is not None and co is not None and sc is not None and co + sc >= pr + gen):
                    st[1] = gen + 1
        chunk.batch_ends.append((i, len(chunk.rid)))
        for r in attrs.get("preempted") or ():
            st = get_state(r)
            if st is None:  # preempted before any batch ran it (never in vLLM): its state starts now
                st = per_rid[r] = [0, 0, start]
            st[2] = start
            chunk.preempted.append((i, (bid, dp, proc, start, r, "preempted", None, 0, None, None, 0,
                                        st[0], st[1], 0.0)))
        if len(chunk.batch_ends) >= batches_per_chunk:
            yield chunk
            chunk = EntryChunk()
    if chunk.batch_ends:
        yield chunk


def iter_chunk_rows(chunk: EntryChunk) -> Iterator[tuple[Any, ...]]:
    """The chunk as per-iteration rows (lifecycle.ITERATION_COLUMNS), in batch order."""
    rows = zip(chunk.batch_id, chunk.dp_rank, chunk.proc, chunk.start_ns, chunk.rid, chunk.state,
               chunk.phase_names(), chunk.scheduled, chunk.computed, chunk.prompt, chunk.resumed,
               chunk.iteration, chunk.generated_before, chunk.time_in_state_ms, strict=True)
    if not chunk.preempted:
        yield from rows
        return
    ends = dict(chunk.batch_ends)
    done = 0
    for batch_row, prow in chunk.preempted:
        end = ends[batch_row]
        while done < end:
            yield next(rows)
            done += 1
        yield prow
    yield from rows
