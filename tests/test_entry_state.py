"""entry_state: the numpy computation of each batch entry's iteration, generated_before and
time_in_state_ms gives exactly what the sequential definition (`EntryStates._in_python`) gives, chunk
after chunk, preemptions, resumed entries, repeated requests and odd values included."""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from synthetic import SyntheticConfig, generate_run

from service_profiler.analyze.entries import iter_entry_chunks
from service_profiler.analyze.entry_state import ChunkStates, EntryStates
from service_profiler.analyze.tables import build_tables
from service_profiler.rawdata.rawfile import read_run


class SequentialStates(EntryStates):
    """The definition: every chunk through the Python loop."""

    def advance(self, rid: Any, starts: np.ndarray, phase: Any, scheduled: Any, computed: Any, prompt: Any,
                resumed: Any, preempted: Any) -> ChunkStates:
        codes = self._codes(rid)
        preempts = [(end, code, start) for (end, _, start), code in
                    zip(preempted, self._codes([r for _, r, _ in preempted]), strict=True)]
        return self._in_python(codes, starts.tolist(), phase, scheduled, computed, prompt, resumed, preempts)


Chunk = tuple[list[Any], list[int], list[Any], list[Any], list[Any], list[Any], list[Any], list[tuple[int, Any, int]]]


def random_chunks(seed: int, odd: bool = False) -> list[Chunk]:
    """Batches of random requests: prefills in parts, decodes, resumed entries, a request now and then
    twice in a batch, preemptions (of running requests, and of some never run yet); with `odd`, some
    chunks carry values the numpy path does not take (None, floats)."""
    rng = random.Random(seed)
    chunks: list[Chunk] = []
    start = 1_750_000_000_000_000_000
    live = [f"r{k}" for k in range(12)]
    next_rid = 12
    for c in range(rng.randint(3, 8)):
        rid: list[Any] = []
        starts: list[int] = []
        cols: list[list[Any]] = [[], [], [], [], []]  # phase, scheduled, computed, prompt, resumed
        preempted: list[tuple[int, Any, int]] = []
        for _ in range(rng.randint(0, 9)):
            start += rng.randint(1, 40_000_000)
            for r in rng.sample(live, rng.randint(0, min(6, len(live)))) + ([live[0]] if rng.random() < 0.1 else []):
                prompt = 50 + int(r[1:]) % 7 * 20
                computed = rng.choice([0, prompt // 2, prompt, prompt + rng.randint(0, 5)])
                phase = rng.choice([0, 0, 1, 1, 1, True])
                rid.append(r)
                starts.append(start)
                for col, v in zip(cols, (phase, rng.randint(1, prompt), computed, prompt, rng.choice([0, 0, 0, 1])),
                                  strict=True):
                    col.append(v)
            for r in rng.sample(live, rng.randint(0, 2)) + ([f"r{next_rid + 50}"] if rng.random() < 0.1 else []):
                preempted.append((len(rid), r, start))
            if rng.random() < 0.3:
                live.append(f"r{next_rid}")
                next_rid += 1
        if odd and rid and c % 2:
            k = rng.randrange(len(rid))
            cols[rng.randrange(1, 4)][k] = rng.choice([None, 2.5])
        chunks.append((rid, starts, *cols, preempted))  # type: ignore[arg-type]
    return chunks


def run_both(chunks: list[Chunk]) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    out = []
    for states in (EntryStates(), SequentialStates()):
        results = []
        for rid, starts, phase, sched, comp, prompt, resumed, preempted in chunks:
            done = states.advance(rid, np.array(starts, dtype=np.int64), phase, sched, comp, prompt, resumed,
                                  preempted)
            results.append((done.iteration, done.generated_before, done.time_in_state_ms, done.preempted,
                            [type(v) for v in done.iteration + done.generated_before + done.time_in_state_ms]))
        size = len(states.code_of)
        results.append((states.its[:size].tolist(), states.gens[:size].tolist(), states.resets[:size].tolist()))
        out.append(results)
    return out[0], out[1]


@pytest.mark.parametrize("seed", range(40))
def test_numpy_states_match_the_sequential_definition(seed: int) -> None:
    fast, sequential = run_both(random_chunks(seed))
    assert fast == sequential


@pytest.mark.parametrize("seed", range(10))
def test_chunks_with_odd_values_take_the_loop_and_the_rest_still_match(seed: int) -> None:
    fast, sequential = run_both(random_chunks(seed, odd=True))
    assert fast == sequential


def test_states_carry_over_chunks(tmp_path: Path) -> None:
    # a real run with preemptions, cut into chunks of 1, 7 and all batches: the same entries either way
    synth = generate_run(tmp_path / "run", SyntheticConfig(requests=200, output_tokens=30, max_num_seqs=16,
                                                           num_gpu_blocks=120, seed=9))
    tables = build_tables(read_run([synth.run_dir]))
    columns = []
    for per_chunk in (1, 7, 100_000):
        chunks = list(iter_entry_chunks(tables, per_chunk))
        columns.append([list(itertools.chain.from_iterable(getattr(c, name) for c in chunks)) for name in (
            "rid", "iteration", "generated_before", "time_in_state_ms", "preempted", "batch_row", "pos", "state")])
    assert columns[0] == columns[1] == columns[2]
    rid, iteration, generated, times, preempted = columns[0][:5]
    assert preempted, "the run has preemptions"
    # each request's iterations count up from 0; its tokens never go down
    seen: dict[str, tuple[int, int]] = {}
    for r, it, gen in zip(rid, iteration, generated, strict=True):
        last_it, last_gen = seen.get(r, (-1, 0))
        assert it == last_it + 1 and gen >= last_gen
        seen[r] = (it, gen)
    assert times[0] == 0.0 and all(t >= 0 for t in times)


@pytest.mark.parametrize("truncate", [False, True])
def test_iter_entry_chunks_matches_the_definition(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  truncate: bool) -> None:
    # the whole chunking (columns built per chunk, then the states), against the same with the sequential
    # states; `truncate`: some batches' entries written without their trailing fields (rid, phase,
    # scheduled only), which read as computed / prompt None and resumed 0 and take the loop
    from service_profiler.analyze import entries

    synth = generate_run(tmp_path / "run", SyntheticConfig(requests=120, output_tokens=20, max_num_seqs=12,
                                                           num_gpu_blocks=100, seed=2))
    tables = build_tables(read_run([synth.run_dir]))
    if truncate:
        for span in tables.batch_spans[::5]:
            span.attrs["reqs"] = [tuple(e[:3]) for e in span.attrs["reqs"]]
    names = ("rid", "computed", "prompt", "resumed", "iteration", "generated_before", "time_in_state_ms", "preempted")

    def flat(per_chunk: int) -> list[list[Any]]:
        chunks = list(iter_entry_chunks(tables, per_chunk))
        return [list(itertools.chain.from_iterable(getattr(c, name) for c in chunks)) for name in names]

    fast = [flat(n) for n in (3, 64)]
    monkeypatch.setattr(entries, "EntryStates", SequentialStates)
    assert fast == [flat(n) for n in (3, 64)]
    assert (None in fast[0][1]) == truncate and any(fast[0][7])
