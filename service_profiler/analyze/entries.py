"""Per-request entries of every batch, as column chunks.

A long run holds millions of (batch, request) entries; per_iteration_requests.csv and the SQLite
batch_req table each need all of them. Building one Python tuple per entry and formatting it in a
Python loop costs ~2 µs an entry, so instead each chunk of batches is turned into columns at once: the
entry fields by C-level `map(itemgetter(k))` over the chunk's entries, the batch's values repeated over
its entries by numpy, and the per-request sequential state (iteration index, tokens generated so far,
time in the current state) by `entry_state`. Consumers `zip` the columns (C-level again) into
`executemany` or `%`-format them. Chunks bound the memory (a few MB each).

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

import numpy as np

from .entry_state import EntryStates
from .tables import AnalysisTables

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


@dataclass
class EntrySource:
    """What one chunk of entries is made from (`build_chunk`): consecutive batches' values, entries,
    finished and preempted lists. Small and picklable: analyze hands these to the database process,
    which builds the chunks itself."""

    first_batch: int  # the batch row of the first batch
    batches: list[tuple[Any, Any, Any, int]]  # (batch_id, dp_rank, proc, start_ns) per batch
    reqs: list[Any]  # per batch, its entries as recorded
    finished: list[Any]  # per batch, the requests its step finished
    preempted: list[Any]  # per batch, the requests it preempted


def iter_entry_sources(tables: AnalysisTables, batches_per_chunk: int = 1024) -> Iterator[EntrySource]:
    rows, spans, finished = tables.batches.rows, tables.batch_spans, tables.batch_finished
    for lo in range(0, len(spans), batches_per_chunk):
        hi = min(lo + batches_per_chunk, len(spans))
        attrs = [spans[i].attrs or {} for i in range(lo, hi)]
        yield EntrySource(lo, [rows[i][:4] for i in range(lo, hi)], [a.get("reqs") or [] for a in attrs],
                          finished[lo:hi], [a.get("preempted") or () for a in attrs])


def iter_entry_chunks(tables: AnalysisTables, batches_per_chunk: int = 1024) -> Iterator[EntryChunk]:
    states = EntryStates()  # every request's state, carried from chunk to chunk
    for source in iter_entry_sources(tables, batches_per_chunk):
        yield build_chunk(source, states)


def build_chunk(source: EntrySource, states: EntryStates) -> EntryChunk:
    """The entries of the source's batches, their columns built for the whole chunk at once; `states`:
    every request's state after the chunks before this one (advanced past this one)."""
    chunk = EntryChunk()
    per_batch, reqs_of = source.batches, source.reqs
    batches = range(source.first_batch, source.first_batch + len(per_batch))
    lengths = list(map(len, reqs_of))
    entries: list[Any] = []
    for reqs in reqs_of:
        entries += reqs
    n = len(entries)
    # per batch -> per entry: the batch's values repeated over its entries
    for name, k in (("batch_id", 0), ("dp_rank", 1), ("proc", 2)):
        values = np.empty(len(per_batch), dtype=object)
        values[:] = [r[k] for r in per_batch]
        setattr(chunk, name, np.repeat(values, lengths).tolist())
    starts = np.repeat(np.array([r[3] for r in per_batch], dtype=np.int64), lengths)  # epoch ns: int64
    chunk.start_ns = starts.tolist()
    chunk.batch_row = np.repeat(np.arange(batches.start, batches.stop), lengths).tolist()
    ends = np.cumsum(lengths)
    chunk.pos = (np.arange(n) - np.repeat(ends - lengths, lengths)).tolist()
    (chunk.rid, chunk.phase, chunk.scheduled, chunk.computed, chunk.prompt, chunk.resumed) = _columns(entries)
    chunk.batch_ends = list(zip(batches, ends.tolist(), strict=True))
    state = ["running"] * n
    rid = chunk.rid
    preempted: list[tuple[int, Any, int]] = []  # (entries before it in the chunk, rid, batch start)
    for i, end, length, r, finished, preempted_ids in zip(batches, ends.tolist(), lengths, per_batch,
                                                          source.finished, source.preempted, strict=True):
        for item in finished:
            done = item[0] if isinstance(item, list | tuple) and item else item
            ids = rid[end - length:end]
            if done in ids:
                state[end - length + ids.index(done)] = "completed"
        for p in preempted_ids:
            preempted.append((end, p, r[3]))
            chunk.preempted.append((i, (r[0], r[1], r[2], r[3], p, "preempted", None, 0, None, None, 0)))
    chunk.state = state
    return _with_states(chunk, states, starts, preempted)


def _with_states(chunk: EntryChunk, states: EntryStates, starts: np.ndarray,
                 preempted: list[tuple[int, Any, int]]) -> EntryChunk:
    """The chunk with each entry's iteration, generated_before and time_in_state_ms (`entry_state`), and
    its preempted rows completed with the request's iteration and generated_before."""
    done = states.advance(chunk.rid, starts, chunk.phase, chunk.scheduled, chunk.computed, chunk.prompt,
                          chunk.resumed, preempted)
    chunk.iteration, chunk.generated_before = done.iteration, done.generated_before
    chunk.time_in_state_ms = done.time_in_state_ms
    chunk.preempted = [(i, (*row, it, gen, 0.0)) for (i, row), (it, gen) in
                       zip(chunk.preempted, done.preempted, strict=True)]
    return chunk


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
