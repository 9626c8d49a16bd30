"""Each batch entry's per-request state: its iteration index, the tokens the request generated before it
and how long the request had been in its current state, for a chunk of entries at a time (`EntryStates`,
which carries every request's state from one chunk to the next).

Sequentially, per entry of request r in a batch that started at `start` (the definition; `_in_python`
is exactly this loop):
  - iteration = the entries of r before this one;
  - generated_before = r's entries before this one that produced a token: a decode step, or the step
    where its prefill (or its recompute after a preemption) completed, i.e. computed + scheduled >=
    prompt + generated so far;
  - time_in_state_ms = 0 at r's first entry, at an entry flagged resumed, and at the first entry after
    a preemption that came before any; otherwise the time since r's state last began: its first entry,
    a resumed entry, or the start of the batch that preempted it (a preemption is applied after the
    entries of its batch).

On a million entries that loop is ~0.8 s of Python. `_vectorized` computes the same with numpy: entries
grouped by request (a stable sort), ranks and prefix sums within each group, and a search for each
entry's last state change. Only the prefill entries (a few per request) are looked at one by one, since
whether one completed depends on the tokens generated before it. Chunks whose numbers are not all
integers (entries written without their trailing fields, or odd values from a custom handler) take
`_in_python`; both keep the same state arrays, so chunks can alternate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .tables import MS

_INTEGER_KINDS = frozenset("bi")  # numpy dtype kinds of bool and signed int columns


def _integers(values: np.ndarray) -> bool:
    """A column of ints (or bools) only: `np.array` of anything else (None, floats, text, ints beyond
    64 bits, nested lists) gives another dtype or shape."""
    return values.ndim == 1 and values.dtype.kind in _INTEGER_KINDS


class ChunkStates:
    """The states of one chunk's entries, and of the requests its batches preempted (iteration and
    generated_before after that batch)."""

    def __init__(self, iteration: list[int], generated_before: list[int], time_in_state_ms: list[float],
                 preempted: list[tuple[int, int]]) -> None:
        self.iteration, self.generated_before = iteration, generated_before
        self.time_in_state_ms, self.preempted = time_in_state_ms, preempted


class EntryStates:
    """Every request's state so far: entries seen (`its`), tokens generated (`gens`) and when its current
    state began (`resets`, epoch ns), indexed by a code per request id."""

    def __init__(self) -> None:
        self.code_of: dict[Any, int] = {}
        self.its = np.zeros(1024, dtype=np.int64)
        self.gens = np.zeros(1024, dtype=np.int64)
        self.resets = np.zeros(1024, dtype=np.int64)

    def _codes(self, rids: Sequence[Any]) -> list[int]:
        code_of = self.code_of
        for rid in dict.fromkeys(rids):  # each request once (C-level), the new ones numbered
            if rid not in code_of:
                code_of[rid] = len(code_of)
        if len(code_of) > len(self.its):
            size = max(2 * len(self.its), len(code_of))
            self.its, self.gens, self.resets = (np.concatenate([a, np.zeros(size - len(a), dtype=np.int64)])
                                                for a in (self.its, self.gens, self.resets))
        return list(map(code_of.__getitem__, rids))

    def advance(self, rid: Sequence[Any], starts: np.ndarray, phase: Sequence[Any], scheduled: Sequence[Any],
                computed: Sequence[Any], prompt: Sequence[Any], resumed: Sequence[Any],
                preempted: Sequence[tuple[int, Any, int]]) -> ChunkStates:
        """The states of a chunk's entries (one value per entry in each sequence, in batch order; `starts`:
        int64, the start of each entry's batch) and of its preemptions: (number of the chunk's entries
        before it, i.e. where its batch's entries end, rid, start of that batch), in order."""
        codes = self._codes(rid)
        preempts = [(end, code, start) for (end, _, start), code in
                    zip(preempted, self._codes([r for _, r, _ in preempted]), strict=True)]
        if codes:
            ph, re = np.array(phase), np.array(resumed)
            if _integers(ph) and _integers(re):
                # scheduled / computed / prompt matter only where a prefill may have completed
                prefills = np.flatnonzero(ph == 0)
                at = prefills.tolist()
                sc, co, pr = (np.array([col[j] for j in at]) for col in (scheduled, computed, prompt))
                if not at or (_integers(sc) and _integers(co) and _integers(pr)):
                    done = (co.astype(np.int64) + sc - pr) if at else np.zeros(0, dtype=np.int64)
                    return self._vectorized(np.array(codes, dtype=np.int64), starts, ph.astype(np.int64, copy=False),
                                            re.astype(np.int64, copy=False), prefills, done, preempts)
        return self._in_python(codes, starts.tolist(), phase, scheduled, computed, prompt, resumed, preempts)

    def _in_python(self, codes: list[int], start_ns: Sequence[int], phase: Sequence[Any], scheduled: Sequence[Any],
                   computed: Sequence[Any], prompt: Sequence[Any], resumed: Sequence[Any],
                   preempted: list[tuple[int, int, int]]) -> ChunkStates:
        its, gens, resets = self.its, self.gens, self.resets
        iteration: list[int] = []
        generated: list[int] = []
        times: list[float] = []
        states: list[tuple[int, int]] = []
        pending = iter(preempted)
        nxt = next(pending, None)
        for e, code in enumerate(codes):
            while nxt is not None and nxt[0] <= e:
                resets[nxt[1]] = nxt[2]
                states.append((int(its[nxt[1]]), int(gens[nxt[1]])))
                nxt = next(pending, None)
            it, gen, start = int(its[code]), int(gens[code]), start_ns[e]
            its[code] = it + 1
            if resumed[e] or not it:  # resumed, or its first entry (ever, or after a preemption that came first)
                resets[code] = start
                times.append(0.0)
            else:
                times.append((start - int(resets[code])) / MS)
            iteration.append(it)
            generated.append(gen)
            sc, co, pr = scheduled[e], computed[e], prompt[e]
            if phase[e] or (pr is not None and co is not None and sc is not None and co + sc >= pr + gen):
                gens[code] = gen + 1
        while nxt is not None:
            resets[nxt[1]] = nxt[2]
            states.append((int(its[nxt[1]]), int(gens[nxt[1]])))
            nxt = next(pending, None)
        return ChunkStates(iteration, generated, times, states)

    def _vectorized(self, codes: np.ndarray, starts: np.ndarray, phase: np.ndarray, resumed: np.ndarray,
                    prefills: np.ndarray, done: np.ndarray, preempted: list[tuple[int, int, int]]) -> ChunkStates:
        """`prefills`: the entries of phase 0 (ascending); `done`: computed + scheduled - prompt at each."""
        n = len(codes)
        # entries grouped by request, in entry order within each group
        order = np.argsort(codes, kind="stable")
        by_code = codes[order]
        first = np.ones(n, dtype=bool)
        first[1:] = by_code[1:] != by_code[:-1]
        group = np.cumsum(first) - 1
        group_start = np.flatnonzero(first)[group]  # per sorted entry: where its group starts
        iteration_sorted = self.its[by_code] + (np.arange(n) - group_start)

        # tokens: a decode entry always produced one; a prefill entry when its prefill completed, which
        # depends on the tokens generated before it, hence the prefill entries one by one
        decode = phase[order] != 0
        produced = decode.astype(np.int64)
        if len(prefills):
            decodes_before = np.cumsum(produced) - produced
            base = self.gens[by_code] + decodes_before - decodes_before[group_start]
            # the prefill entries in sorted (request, entry) order, each with its computed + scheduled - prompt
            rank_of = np.empty(n, dtype=np.int64)
            rank_of[order] = np.arange(n)
            sorted_at = rank_of[prefills]
            by_rank = np.argsort(sorted_at, kind="stable")
            sorted_at, done_sorted = sorted_at[by_rank], done[by_rank]
            completed_before, last_group = 0, -1
            for j, g, b, d in zip(sorted_at.tolist(), group[sorted_at].tolist(), base[sorted_at].tolist(),
                                  done_sorted.tolist(), strict=True):
                if g != last_group:
                    completed_before, last_group = 0, g
                if d >= b + completed_before:  # computed + scheduled >= prompt + generated so far
                    produced[j] = 1
                    completed_before += 1
        produced_total = np.cumsum(produced)
        produced_before = produced_total - produced
        generated_sorted = self.gens[by_code] + produced_before - produced_before[group_start]

        iteration = np.empty(n, dtype=np.int64)
        iteration[order] = iteration_sorted
        generated = np.empty(n, dtype=np.int64)
        generated[order] = generated_sorted

        # when each request's state last began: reset entries (key 2e+1) and preemptions (key 2*end, after
        # the entries before `end`), searched per entry among those of its request with a smaller key
        span = 2 * n + 2
        reset_entries = np.flatnonzero((resumed != 0) | (iteration == 0))
        p_ends = np.array([p[0] for p in preempted], dtype=np.int64)
        p_codes = np.array([p[1] for p in preempted], dtype=np.int64)
        p_starts = np.array([p[2] for p in preempted], dtype=np.int64)
        keys = np.concatenate([codes[reset_entries] * span + 2 * reset_entries + 1, p_codes * span + 2 * p_ends])
        began = np.concatenate([starts[reset_entries], p_starts])
        by_key = np.argsort(keys, kind="stable")
        keys, began = keys[by_key], began[by_key]
        since = self.resets[codes]
        if len(keys):
            last = np.searchsorted(keys, codes * span + 2 * np.arange(n) + 1, side="left") - 1
            found = last >= 0
            found[found] = keys[last[found]] // span == codes[found]
            since[found] = began[last[found]]
        times = (starts - since) / MS
        times[reset_entries] = 0.0

        # the preempted requests' iteration / generated_before just after their batch
        states: list[tuple[int, int]] = []
        if preempted:
            entry_keys = by_code * (n + 1) + order
            lo = np.searchsorted(entry_keys, p_codes * (n + 1))
            hi = np.searchsorted(entry_keys, p_codes * (n + 1) + p_ends)
            produced_upto = np.concatenate([[0], produced_total])
            its = self.its[p_codes] + (hi - lo)
            gens = self.gens[p_codes] + produced_upto[hi] - produced_upto[lo]
            states = list(zip(its.tolist(), gens.tolist(), strict=True))

        # carry the state to the next chunk
        np.add.at(self.its, codes, 1)
        np.add.at(self.gens, by_code, produced)
        if len(keys):
            key_codes = keys // span
            last_of_code = np.ones(len(keys), dtype=bool)
            last_of_code[:-1] = key_codes[1:] != key_codes[:-1]
            self.resets[key_codes[last_of_code]] = began[last_of_code]
        return ChunkStates(iteration.tolist(), generated.tolist(), times.tolist(), states)
