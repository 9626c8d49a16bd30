"""The Perfetto trace (`columnar/trace_out.py`, `columnar/trace_requests.py`) of `service-profiler analyze`,
and the strict validator (`tests/trace_check.py`).

Runs are hand-built raw files (tests/raw_writer.py) or synthetic runs with a known truth (tests/synthetic.py),
analyzed by the DuckDB pipeline. Every exported trace is checked twice: by `validate_trace`, and by
`_independent_check`, which re-reads the written file with ijson's streaming parser (a different JSON
parser, exact Decimal numbers) and re-checks nesting, flows and track names with code that shares nothing
with the validator.
"""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter, defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import ijson
import pytest
from raw_writer import RawProcess, RawRun
from synthetic import SyntheticConfig, SyntheticRun, generate_run
from trace_check import validate_trace

from service_profiler.columnar.pipeline import export_all
from service_profiler.columnar.run import analyze_run
from service_profiler.columnar.trace_out import write_trace

MS = 1_000_000
BASE = 1_750_000_000_123_456_789  # epoch ns, deliberately not on a second
ORIGIN = BASE - BASE % 1_000_000_000
ANCHOR = BASE - 5_000 * MS


def _batch(engine: RawProcess, bid: int, t: int, reqs: list[list[Any]], preempted: tuple[str, ...] = ()) -> None:
    """One scheduler step at BASE + t ms: step (10 ms) > schedule (1 ms) + model (8 ms) + update (1 ms)."""
    s = BASE + t * MS
    attrs = {"batch_id": bid, "dp_rank": 0, "reqs": reqs, "running": len(reqs), "waiting": 0,
             "preempted": list(preempted), "finished": [], "total_tokens": sum(r[2] for r in reqs),
             "kv_total_blocks": 100, "kv_used_blocks": 10 + bid, "kv_usage": (10 + bid) / 100}
    engine.span("EngineCore", "step", s, s + 10 * MS, 100, {"batch_id": bid})
    engine.span("BatchSchedule", "batchFrameworkProcessing", s, s + 1 * MS, 100, attrs)
    engine.span("ModelExecute", "modelExec", s + 1 * MS, s + 9 * MS, 100, {"batch_id": bid})
    engine.span("BatchSchedule", "updateFromOutput", s + 9 * MS, s + 10 * MS, 100, {"batch_id": bid, "finished": []})


def _small_run(directory: Path, counters: bool = True) -> tuple[RawRun, RawProcess]:
    """API server and engine on different hosts with the same pid and tid 100; a worker whose two probes
    partially overlap; r1 is preempted in batch 2 and recomputed in batch 3; r2 runs plainly."""
    run = RawRun()
    api = run.process("host-a", 100, "api_server", ANCHOR)
    engine = run.process("host-b", 100, "engine_core", ANCHOR)
    worker = run.process("host-b", 300, "worker", ANCHOR)
    engine.dropped = 7
    engine.states.append((BASE + 1 * MS, True, "startup"))
    engine.states.append((BASE + 70 * MS, False, "signal"))
    _batch(engine, 0, 10, [["r1", 0, 50, 0, 50, 0]])
    _batch(engine, 1, 20, [["r1", 1, 1, 50, 50, 0], ["r2", 0, 30, 0, 30, 0]])
    _batch(engine, 2, 30, [["r2", 1, 1, 30, 30, 0]], preempted=("r1",))
    _batch(engine, 3, 40, [["r1", 0, 51, 0, 50, 1], ["r2", 1, 1, 31, 30, 0]])
    _batch(engine, 4, 50, [["r1", 1, 1, 51, 50, 0]])
    worker.span("Probe", "a", BASE + 12 * MS, BASE + 16 * MS, 301, None)
    worker.span("Probe", "b", BASE + 14 * MS, BASE + 18 * MS, 301, {"error": "ValueError"})

    def ev(proc: RawProcess, name: str, t: float, **attrs: Any) -> None:
        proc.event("Request", name, BASE + int(t * MS), 100, attrs)

    ev(api, "httpReq", 5, rid="r1", api_rid="a1", prompt_tokens=50, max_tokens=3, stream=True)
    ev(engine, "enqueue", 6, rid="r1", prompt_tokens=50)
    ev(api, "httpReq", 15, rid="r2", api_rid="a2", prompt_tokens=30, max_tokens=3, stream=True)
    ev(engine, "enqueue", 16, rid="r2", prompt_tokens=30)
    ev(engine, "state", 30.5, rid="r1", **{"from": "RUNNING", "to": "PREEMPTED", "batch_id": 2})
    engine.event("KVCache", "allocate", BASE + 10 * MS, 100, {"rid": "r1", "blocks": 4})
    ev(api, "tokens", 20.5, reqs=[["r1", 1, 0, None]])
    ev(api, "tokens", 29.5, reqs=[["r2", 1, 0, None]])
    ev(api, "tokens", 51, reqs=[["r2", 1, 1, "length"]])
    ev(api, "httpRes", 52, rid="r2", output_tokens=3, finish_reason="length")
    ev(api, "tokens", 60, reqs=[["r1", 1, 1, "length"]])
    ev(api, "httpRes", 62, rid="r1", output_tokens=3, finish_reason="length")
    if counters:
        engine.counter("KVCache", "kvcache", BASE + 11 * MS, {"total_blocks": 100, "used_blocks": 10, "usage": 0.1})
        engine.counter("BatchSchedule", "queues", BASE + 11 * MS, {"running": 1, "waiting": 0})
        api.counter("System", "host", BASE + 12 * MS, {"cpu_percent": 12.5, "mem_used_bytes": 1e9, "mem_percent": 3.0})
        worker.counter("System", "device_memory", BASE + 13 * MS, {"used_bytes": 2e9, "total_bytes": 8e9})
    run.write(directory)
    return run, engine


def _export(directory: Path, tmp_path: Path, **options: Any) -> tuple[dict[str, Any], Path]:
    """The trace of the run in `directory`, through the pipeline, checked by both validators."""
    run = analyze_run([directory])
    out = tmp_path / ("out-" + "-".join(f"{k}{v}" for k, v in options.items()))
    try:
        outcomes = export_all(run, ["json"], out, options={"json": options})
    finally:
        run.close()
    assert outcomes[0].error is None, outcomes[0].error
    path = out / "chrome_tracing.json"
    trace = json.loads(path.read_text(encoding="utf-8"))
    assert validate_trace(trace) == []
    assert _independent_check(path) == []
    return trace, path


def _small(tmp_path: Path, counters: bool = True) -> dict[str, Any]:
    _small_run(tmp_path / "run", counters)
    return _export(tmp_path / "run", tmp_path)[0]


def _independent_check(path: Path) -> list[str]:
    """Nesting, flows and names re-checked from a streaming parse with exact decimal arithmetic."""
    problems: list[str] = []
    slices: dict[tuple[int, int], list[tuple[Decimal, Decimal]]] = defaultdict(list)
    flows: dict[tuple[str, Any], list[str]] = defaultdict(list)
    named_procs, named_threads, used_procs, used_threads = set(), set(), set(), set()
    with path.open("rb") as fh:
        for ev in ijson.items(fh, "traceEvents.item"):
            ph, pid, tid = ev["ph"], ev["pid"], ev.get("tid")
            if type(pid) is not int or (tid is not None and type(tid) is not int):
                problems.append(f"non-integer pid/tid in {ev}")
            if ph == "M":
                if ev["name"] == "process_name":
                    named_procs.add(pid)
                elif ev["name"] == "thread_name":
                    named_threads.add((pid, tid))
                continue
            used_procs.add(pid)
            if ph == "X":
                used_threads.add((pid, tid))
                start = Decimal(ev["ts"])
                if Decimal(ev["dur"]) < 0:
                    problems.append(f"negative duration in {ev}")
                slices[(pid, tid)].append((start, start + Decimal(ev["dur"])))
            elif ph in "sf":
                used_threads.add((pid, tid))
                flows[(ev["cat"], ev["id"])].append(ph + ev.get("bp", ""))
            elif ph in "BE":
                problems.append(f"unexpected {ph} event (the exporter writes complete X slices): {ev}")
    for key, spans in slices.items():
        spans.sort(key=lambda s: (s[0], -s[1]))
        open_ends: list[Decimal] = []
        for start, end in spans:
            open_ends = [e for e in open_ends if e > start]
            if any(end > e for e in open_ends):
                problems.append(f"{key}: slice [{start}, {end}] crosses an enclosing slice's end")
            open_ends.append(end)
    problems += [f"flow {k}: {v}" for k, v in flows.items() if sorted(v) != ["fe", "s"]]
    problems += [f"pid {p} unnamed" for p in used_procs - named_procs]
    problems += [f"thread {t} unnamed" for t in used_threads - named_threads]
    return problems


def _names(trace: dict[str, Any], kind: str) -> dict[Any, str]:
    return {(e["pid"], e["tid"]) if kind == "thread_name" else e["pid"]: e["args"]["name"]
            for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == kind}


def _ms(us: float) -> float:
    """A trace time as ms after BASE."""
    return round((us * 1000 + ORIGIN - BASE) / 1e6, 3)


def test_small_run_exports_named_sorted_processes(tmp_path: Path) -> None:
    trace = _small(tmp_path)
    names = _names(trace, "process_name")
    assert names == {1: "api_server host-a:100", 2: "engine_core host-b:100", 3: "worker host-b:300",
                     4: "Requests"}
    sort = {e["pid"]: e["args"]["sort_index"] for e in trace["traceEvents"]
            if e["ph"] == "M" and e["name"] == "process_sort_index"}
    assert sorted(sort, key=lambda pid: (sort[pid], pid)) == [1, 4, 2, 3]  # API, Requests, EngineCore, worker
    labels = [e for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "process_labels"]
    assert [(e["pid"], e["args"]["labels"]) for e in labels] == [(2, "dropped 7 records")]
    assert trace["metadata"]["dropped_records"] == 7
    assert trace["displayTimeUnit"] == "ms"


def test_tids_are_integers_unique_across_processes(tmp_path: Path) -> None:
    trace = _small(tmp_path)
    threads = _names(trace, "thread_name")
    api = [tid for (pid, tid), name in threads.items() if pid == 1]
    engine = [tid for (pid, tid), name in threads.items() if pid == 2]
    assert api and engine and not set(api) & set(engine)  # same raw tid 100 on two hosts
    assert threads[(2, engine[0])] == "main 100"  # the engine's own pid
    tids = Counter(tid for _, tid in threads)
    assert max(tids.values()) == 1
    assert all(type(e.get("tid", 0)) is int for e in trace["traceEvents"])


def test_partially_overlapping_span_moves_to_an_overlap_lane(tmp_path: Path) -> None:
    trace = _small(tmp_path)
    threads = _names(trace, "thread_name")
    probes = {e["name"]: e["tid"] for e in trace["traceEvents"] if e.get("cat") == "Probe"}
    assert probes["a"] != probes["b"]
    assert threads[(3, probes["a"])] == "thread 301"
    assert threads[(3, probes["b"])] == "thread 301 overlap 1"
    assert sum(" overlap " in name for name in threads.values()) == 1  # only lanes in use are named
    assert trace["metadata"]["overlap_lanes"] == 1


@pytest.mark.parametrize("spans", [[(0, 20), (5, 10), (8, 15)], [(0, 10), (5, 15), (12, 20)],
                                   [(0, 10), (2, 12), (4, 14), (6, 16), (11, 13)]],
                         ids=["crosses-a-child", "chain", "staircase"])
def test_spans_that_cross_each_get_a_lane_where_they_nest(tmp_path: Path, spans: list[tuple[int, int]]) -> None:
    """Whatever crosses on one thread, every lane nests (both validators check it) and every span is drawn."""
    run = RawRun()
    worker = run.process("host-b", 300, "worker", ANCHOR)
    for i, (start, end) in enumerate(spans):
        worker.span("Probe", f"p{i}", BASE + start * MS, BASE + end * MS, 301, None)
    trace = _export(run.write(tmp_path / "run"), tmp_path)[0]
    drawn = sorted((_ms(e["ts"]), _ms(e["ts"] + e["dur"])) for e in trace["traceEvents"] if e["ph"] == "X")
    assert drawn == sorted(spans)
    assert len({e["tid"] for e in trace["traceEvents"] if e["ph"] == "X"}) == 1 + trace["metadata"]["overlap_lanes"]


def test_timestamps_are_us_since_origin_with_ns_precision(tmp_path: Path) -> None:
    raw, _ = _small_run(tmp_path / "run")
    trace = _export(tmp_path / "run", tmp_path)[0]
    origin = trace["metadata"]["origin_epoch_ns"]
    assert origin == ORIGIN
    assert trace["metadata"]["origin_utc"] == "2025-06-15T15:06:40+00:00"  # BASE // 1e9 = 1,750,000,000 s
    worker = next(p for p in raw.processes if p.role == "worker")
    xs = {e["name"]: e for e in trace["traceEvents"] if e["ph"] == "X" and e["pid"] == 3}
    spans = [(name, rec) for (kind, _, name), rec, _ in worker.records if kind == "span"]
    assert len(spans) == 2
    for name, (start, end, _, _) in spans:
        start, end = start - 1_000_000_000 + ANCHOR, end - 1_000_000_000 + ANCHOR  # back to epoch (raw_writer)
        assert round(xs[name]["ts"] * 1000) + origin == start
        assert round(xs[name]["dur"] * 1000) == end - start
    assert all(e["ts"] >= 0 for e in trace["traceEvents"] if "ts" in e)


def _counters(trace: dict[str, Any]) -> dict[tuple[int, str], list[dict[str, Any]]]:
    counters: dict[tuple[int, str], list[tuple[float, dict[str, Any]]]] = defaultdict(list)
    for e in trace["traceEvents"]:
        if e["ph"] == "C":
            counters[(e["pid"], e["name"])].append((e["ts"], e["args"]))
    return {k: [args for _, args in sorted(v, key=lambda x: x[0])] for k, v in counters.items()}


def test_counters_one_series_per_key_numeric_and_tokens_per_step(tmp_path: Path) -> None:
    counters = _counters(_small(tmp_path))
    assert set(counters) == {(2, "kvcache"), (2, "queues"), (1, "host"), (3, "device_memory"), (2, "tokens")}
    assert counters[(1, "host")] == [{"cpu_percent": 12.5, "mem_used_bytes": 1e9, "mem_percent": 3.0}]
    # tokens scheduled per step, from the batches' entries (prefill: phase 0)
    steps = [(50, 50, 0), (31, 30, 1), (1, 0, 1), (52, 51, 1), (1, 0, 1)]
    assert counters[(2, "tokens")] == [{"total": t, "prefill": p, "decode": d} for t, p, d in steps]
    assert len(counters[(2, "kvcache")]) == 1  # recorded counters win over the span attributes
    for series in counters.values():
        assert all(type(v) in (int, float) for args in series for v in args.values())


def test_kvcache_and_queue_counters_fall_back_to_batch_attributes(tmp_path: Path) -> None:
    counters = _counters(_small(tmp_path, counters=False))
    kv, queues = counters[(2, "kvcache")], counters[(2, "queues")]
    assert len(kv) == len(queues) == 5
    assert kv[2] == {"total_blocks": 100, "used_blocks": 12, "usage": 0.12}
    assert [q["running"] for q in queues] == [1, 2, 1, 2, 1]


def test_a_counter_sample_repeating_the_one_before_is_left_out(tmp_path: Path) -> None:
    run, engine = _small_run(tmp_path / "run")
    for t in (12, 13, 14):  # the same queue lengths again, then a change
        engine.counter("BatchSchedule", "queues", BASE + t * MS, {"running": 1, "waiting": 0 if t < 14 else 3})
    run.write(tmp_path / "run")
    queues = _counters(_export(tmp_path / "run", tmp_path)[0])[(2, "queues")]
    assert queues == [{"running": 1, "waiting": 0}, {"running": 1, "waiting": 3}]


def _request_slices(trace: dict[str, Any]) -> dict[str, list[tuple[str, float, float]]]:
    threads = _names(trace, "thread_name")
    out: dict[str, list[tuple[str, float, float]]] = defaultdict(list)
    for e in sorted(trace["traceEvents"], key=lambda e: (e.get("ts", 0), -e.get("dur", 0))):
        if e["ph"] == "X" and e["cat"] == "request":
            out[threads[(e["pid"], e["tid"])]].append((e["name"], e["ts"], e["ts"] + e["dur"]))
    return out


def test_request_tracks_show_queue_prefill_decode_and_preemption(tmp_path: Path) -> None:
    trace = _small(tmp_path)
    reqs = _request_slices(trace)
    assert set(reqs) == {"req r1", "req r2"}
    r1 = reqs["req r1"]
    assert [name for name, _, _ in r1] == ["request", "queued", "prefill", "decode", "preempted", "prefill",
                                           "decode"]
    whole, phases = r1[0], r1[1:]
    assert (whole[1], whole[2]) == (phases[0][1], phases[-1][2])
    assert all(a[2] == b[1] for a, b in itertools.pairwise(phases))  # adjacent, no gaps
    # httpReq 5 ms; batch 0 at 10; the API's first token 20.5; PREEMPTED state at 30.5; recompute in batch 3
    # at 40, whose step's update ends at 50; the API's finishing tokens event at 60 (the request table's
    # completion: before httpRes at 62)
    assert [_ms(t) for _, t, _ in phases] == [5, 10, 20.5, 30.5, 40, 50]
    assert _ms(r1[-1][2]) == 60
    assert [(n, _ms(a), _ms(b)) for n, a, b in reqs["req r2"]] == [
        ("request", 15, 51), ("queued", 15, 20), ("prefill", 20, 29.5), ("decode", 29.5, 51)]
    args = next(e["args"] for e in trace["traceEvents"] if e["ph"] == "X" and e["name"] == "request"
                and e["args"]["rid"] == "r1")
    assert args == {"rid": "r1", "arrival": "api", "api_rid": "a1", "prompt_tokens": 50, "output_tokens": 3,
                    "finish_reason": "length", "preemptions": 1, "batches": 4, "ttft_ms": 15.5, "e2e_ms": 55.0}


def test_one_flow_per_request_from_its_queue_to_its_first_batch(tmp_path: Path) -> None:
    trace = _small(tmp_path)
    flows = defaultdict(list)
    for e in trace["traceEvents"]:
        if e["ph"] in "stf":
            flows[e["id"]].append(e)
    assert len(flows) == 2
    schedule = {e["args"]["batch_id"]: e for e in trace["traceEvents"]
                if e["ph"] == "X" and e["name"] == "batchFrameworkProcessing"}
    threads = _names(trace, "thread_name")
    queued = {threads[(e["pid"], e["tid"])]: e for e in trace["traceEvents"]
              if e["ph"] == "X" and e["name"] == "queued"}
    first_batch = {"req r1": 0, "req r2": 1}
    for pair in flows.values():
        start, finish = sorted(pair, key=lambda e: e["ph"] == "f")
        assert (start["ph"], finish["ph"], finish["bp"]) == ("s", "f", "e")
        assert "bp" not in start and start["cat"] == finish["cat"] == "request"
        track = threads[(start["pid"], start["tid"])]
        batch, queue = schedule[first_batch[track]], queued[track]
        assert (finish["pid"], finish["tid"]) == (batch["pid"], batch["tid"])
        assert batch["ts"] < finish["ts"] < batch["ts"] + batch["dur"]
        assert queue["ts"] < start["ts"] < queue["ts"] + queue["dur"]
        assert start["ts"] < finish["ts"]


def test_instants_are_thread_scoped_and_high_volume_events_folded(tmp_path: Path) -> None:
    trace = _small(tmp_path)
    instants = [e for e in trace["traceEvents"] if e["ph"] == "i"]
    names = {e["name"] for e in instants}
    assert names == {"httpReq", "enqueue", "state", "tokens", "httpRes", "collection on", "collection off"}
    assert all(e["s"] == "t" for e in instants if e["cat"] != "profiler")
    switches = [(e["name"], e["pid"], _ms(e["ts"]), e["args"]) for e in instants if e["cat"] == "profiler"]
    assert switches == [("collection on", 2, 1, {"reason": "startup"}), ("collection off", 2, 70, {"reason": "signal"})]
    assert trace["metadata"]["folded_events"] == {"KVCache/allocate": 1}
    # containers in args are shown as their length
    tokens = next(e for e in instants if e["name"] == "tokens")
    assert tokens["args"] == {"n_reqs": 1}
    schedule = next(e for e in trace["traceEvents"] if e["name"] == "batchFrameworkProcessing")
    assert schedule["args"]["n_reqs"] == 1 and "reqs" not in schedule["args"]


def test_malformed_batch_attributes_cost_only_themselves(tmp_path: Path) -> None:
    run, engine = _small_run(tmp_path / "run")
    for i, attrs in enumerate(({"batch_id": 9, "reqs": [["r9"], 5], "kv_usage": "nan", "running": "x"},
                               {"batch_id": [9], "reqs": "none", "total_tokens": {"a": 1}})):
        start = BASE + (70 + 2 * i) * MS
        engine.span("BatchSchedule", "batchFrameworkProcessing", start, start + MS, 100, attrs)
    run.write(tmp_path / "run")
    trace = _export(tmp_path / "run", tmp_path)[0]
    schedule = [e for e in trace["traceEvents"] if e["name"] == "batchFrameworkProcessing"]
    assert len(schedule) == 7
    assert len(_request_slices(trace)) == 2
    assert [c["total"] for c in _counters(trace)[(2, "tokens")][:5]] == [50, 31, 1, 52, 1]


def test_a_run_without_records_is_a_valid_trace(tmp_path: Path) -> None:
    run = RawRun()
    run.process("host-a", 100, "api_server", ANCHOR)
    trace = _export(run.write(tmp_path / "run"), tmp_path)[0]
    assert [e for e in trace["traceEvents"] if e["ph"] != "M"] == []


@pytest.fixture(scope="module", params=[64, 8], ids=["max_num_seqs=64", "max_num_seqs=8"])
def synthetic_1000x64(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> SyntheticRun:
    """1,000 requests x 64 output tokens: ~1,000 steps at the default batch size, ~8,000 (and ~68k
    records) with 8 sequences per batch."""
    return generate_run(tmp_path_factory.mktemp("synthetic") / "run",
                        SyntheticConfig(requests=1000, output_tokens=64, seed=3, max_num_seqs=request.param,
                                        num_gpu_blocks=2000))


def test_synthetic_1000_requests_x_64_tokens_is_small_fast_and_valid(
        synthetic_1000x64: SyntheticRun, tmp_path: Path) -> None:
    analysis = analyze_run([synthetic_1000x64.run_dir])
    out = tmp_path / "chrome_tracing.json"
    try:
        best = min(_timed(lambda: write_trace(analysis, out)) for _ in range(3))
    finally:
        analysis.close()
    size = out.stat().st_size
    print(f"\n1000x64: {synthetic_1000x64.num_records} records -> {size / 1e6:.2f} MB in {best * 1000:.0f} ms")
    assert size <= 10_000_000
    assert best < 5.0  # the bound only catches a blow-up on a busy box
    trace = json.loads(out.read_text(encoding="utf-8"))
    assert validate_trace(trace) == []
    assert _independent_check(out) == []
    phases = Counter(e["ph"] for e in trace["traceEvents"])
    assert phases["s"] == phases["f"] == 1000  # one flow per request, not one per step
    assert phases["t"] == 0
    request_threads = [n for (pid, _), n in _names(trace, "thread_name").items() if n.startswith("req ")]
    assert len(request_threads) == 1000
    reqs = _request_slices(trace)
    assert all([n for n, _, _ in s][:4] == ["request", "queued", "prefill", "decode"] for s in reqs.values())


@pytest.fixture(scope="module")
def dp2_across_hosts(tmp_path_factory: pytest.TempPathFactory) -> SyntheticRun:
    """Two data-parallel engines on another host's clock, a KV cache small enough to preempt."""
    return generate_run(tmp_path_factory.mktemp("dp2") / "run", SyntheticConfig(
        requests=60, output_tokens=32, prompt_tokens=(64, 256), dp_size=2, max_num_seqs=8,
        num_gpu_blocks=60, engine_hostname="other", engine_mono_offset_ns=7_000 * MS))


def test_synthetic_dp2_across_hosts_matches_the_truth(tmp_path: Path, dp2_across_hosts: SyntheticRun) -> None:
    truth = dp2_across_hosts
    trace = _export(truth.run_dir, tmp_path)[0]
    assert len({e["pid"] for e in trace["traceEvents"] if e["ph"] == "X"}) == 3  # 2 engines + Requests
    reqs = _request_slices(trace)
    assert len(reqs) == 60
    origin = trace["metadata"]["origin_epoch_ns"]
    for name, slices in reqs.items():
        true = truth.requests[name[4:]]
        # Clock-aligned across hosts: the API's arrival and the engine's first batch land where they were.
        assert round(slices[0][1] * 1000) + origin == true.arrival_ns
        assert round(slices[2][1] * 1000) + origin == true.first_scheduled_ns
        first_decode = next(start for n, start, _ in slices if n == "decode")
        assert round(first_decode * 1000) + origin == true.first_token_ns
        assert round(slices[0][2] * 1000) + origin == true.completion_ns
        assert [n for n, _, _ in slices].count("preempted") == true.preemptions
    assert any(t.preemptions for t in truth.requests.values())
    request_args = {e["args"]["rid"]: e["args"] for e in trace["traceEvents"] if e["name"] == "request"}
    assert {rid: a["preemptions"] for rid, a in request_args.items()} == {
        rid: t.preemptions for rid, t in truth.requests.items()}


def test_tokens_counter_follows_the_scheduled_tokens_of_each_step(tmp_path: Path, dp2_across_hosts: SyntheticRun
                                                                   ) -> None:
    trace = _export(dp2_across_hosts.run_dir, tmp_path)[0]
    origin = trace["metadata"]["origin_epoch_ns"]
    by_start = {b.start_ns: b for b in dp2_across_hosts.batches}
    samples: dict[int, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for e in trace["traceEvents"]:
        if e["ph"] == "C" and e["name"] == "tokens":
            samples[e["pid"]].append((round(e["ts"] * 1000) + origin, e["args"]))
    assert len(samples) == 2  # one series per engine
    for series in samples.values():
        for ts, args in series:
            batch = by_start[ts]  # a sample at each step's start
            assert args["total"] == batch.total_scheduled_tokens == args["prefill"] + args["decode"]
            assert (args["prefill"] > 0) == (batch.num_prefill_reqs > 0)
            assert (args["decode"] > 0) == (batch.num_decode_reqs > 0)
    # every step whose total differs from its engine's step before has its own sample
    shown = {ts for series in samples.values() for ts, _ in series}
    for dp in (0, 1):
        steps = sorted((b for b in dp2_across_hosts.batches if b.dp_rank == dp), key=lambda b: b.start_ns)
        changed = [b.start_ns for a, b in itertools.pairwise(steps)
                   if a.total_scheduled_tokens != b.total_scheduled_tokens]
        assert changed and set(changed) <= shown


@pytest.fixture(scope="module")
def busy(tmp_path_factory: pytest.TempPathFactory) -> SyntheticRun:
    """400 requests arriving at 500 a second for about a second: more than 5 a second."""
    return generate_run(tmp_path_factory.mktemp("busy") / "run", SyntheticConfig(
        requests=400, output_tokens=16, max_num_seqs=24, num_gpu_blocks=400, seed=5))


def test_max_per_second_bounds_requests_flows_and_tokens(tmp_path: Path, busy: SyntheticRun) -> None:
    full = _export(busy.run_dir, tmp_path)[0]
    capped = _export(busy.run_dir, tmp_path, max_per_second=5)[0]
    origin = capped["metadata"]["origin_epoch_ns"]
    per_second: Counter[tuple[Any, ...]] = Counter()
    for e in capped["traceEvents"]:
        if e["ph"] in "XiC" and e.get("cat") != "request":
            per_second[(e["pid"], e["name"], int(e["ts"] // 1e6))] += 1
        elif e["ph"] == "X" and e["name"] == "request":
            per_second[("arrivals", int(e["ts"] // 1e6))] += 1
    assert per_second and max(per_second.values()) <= 5
    assert any(name == "tokens" for _, name, *_ in per_second if _ != "arrivals")
    arrivals = Counter((t.arrival_ns - origin) // 1_000_000_000 for t in busy.requests.values())
    requests = [e for e in capped["traceEvents"] if e["ph"] == "X" and e["name"] == "request"]
    assert len(requests) == sum(min(n, 5) for n in arrivals.values())
    assert capped["metadata"]["capped_events"]["request"] == len(busy.requests) - len(requests)
    flows = Counter(e["ph"] for e in capped["traceEvents"] if e["ph"] in "sf")
    assert 0 < flows["s"] == flows["f"] <= len(requests)
    assert full["metadata"]["capped_events"] == {"span": 0, "instant": 0, "counter": 0, "request": 0}
    assert sum(capped["metadata"]["capped_events"].values()) > 0


def test_window_bounds_requests_flows_and_tokens(tmp_path: Path, busy: SyntheticRun) -> None:
    trace = _export(busy.run_dir, tmp_path, window=(0.3, 0.5))[0]
    lo, hi = 0.3e6, 0.5e6
    requests = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["name"] == "request"]
    origin = trace["metadata"]["origin_epoch_ns"]
    overlapping = [t for t in busy.requests.values()
                   if t.completion_ns >= origin + 300 * MS and t.arrival_ns <= origin + 500 * MS]
    assert 0 < len(requests) == len(overlapping) < len(busy.requests)
    assert all(e["ts"] + e["dur"] >= lo and e["ts"] <= hi for e in requests)
    tokens = [e for e in trace["traceEvents"] if e["ph"] == "C" and e["name"] == "tokens"]
    assert tokens and all(lo <= e["ts"] <= hi for e in tokens)
    flows = Counter(e["ph"] for e in trace["traceEvents"] if e["ph"] in "sf")
    assert 0 < flows["s"] == flows["f"] <= len(requests)


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def test_odd_attributes_cost_only_themselves(tmp_path: Path) -> None:
    """Attributes repeating a key (a crafted line), not an object, or a counter with non-numeric values:
    the trace stays valid and shows what it can."""
    run, engine = _small_run(tmp_path / "run")
    engine.event("Request", "odd", BASE + 61 * MS, 100, None)
    engine.counter("System", "mixed", BASE + 61 * MS, {"ok": 2, "text": "x", "list": [1]})
    run.write(tmp_path / "run")
    path = tmp_path / "run" / "host-b-100.sprof.jsonl"
    text = path.read_text(encoding="utf-8")
    assert text.count(", 100, null]") == 1 and text.count('{"rid": "r2", "prompt_tokens": 30}') == 1
    path.write_text(text.replace(", 100, null]", ', 100, ["not", "an", "object"]]')
                    .replace('{"rid": "r2", "prompt_tokens": 30}', '{"rid": "r2", "prompt_tokens": 30, "rid": [2]}'),
                    encoding="utf-8")
    trace = _export(tmp_path / "run", tmp_path)[0]
    assert _counters(trace)[(2, "mixed")] == [{"ok": 2}]
    odd = next(e for e in trace["traceEvents"] if e["name"] == "odd")
    assert odd["args"] == {"value": ["not", "an", "object"]}
    enqueued = sorted((e["args"] for e in trace["traceEvents"] if e["name"] == "enqueue"), key=json.dumps)
    assert enqueued == [{"rid": "r1", "prompt_tokens": 50}, {"value": {"rid": [2], "prompt_tokens": 30}}]
