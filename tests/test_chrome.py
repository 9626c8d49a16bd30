"""Chrome trace export (`analyze/chrome.py`) and the strict validator (`tests/trace_check.py`).

Every exported trace is checked twice: by `validate_trace`, and by `_independent_check`, which re-reads
the written file with ijson's streaming parser (a different JSON parser, exact Decimal numbers) and
re-checks nesting, flows and track names with code that shares nothing with the validator.
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
from synthetic import SyntheticConfig, generate_run
from trace_check import validate_trace

from service_profiler.analyze.chrome import build_chrome_trace, write_chrome_trace
from service_profiler.rawdata.rawfile import CounterRecord, EventRecord, ProcessInfo, RunData, SpanRecord, read_run

MS = 1_000_000
BASE = 1_750_000_000_123_456_789  # epoch ns, deliberately not on a second


def _proc(index: int, role: str, host: str, pid: int) -> ProcessInfo:
    return ProcessInfo(index, f"{host}:{pid}", host, pid, 1, role, ["x"], None, "0.1.0", 0)


def _batch(proc: int, tid: int, bid: int, t: int, reqs: list[list[Any]], preempted: tuple[str, ...] = (),
           ) -> list[SpanRecord]:
    """One scheduler step at BASE + t ms: step > schedule (1 ms) + model (8 ms)."""
    s = BASE + t * MS
    attrs = {"batch_id": bid, "dp_rank": 0, "reqs": reqs, "running": len(reqs), "waiting": 0,
             "preempted": list(preempted), "finished": [], "total_tokens": sum(r[2] for r in reqs),
             "kv_total_blocks": 100, "kv_used_blocks": 10 + bid, "kv_usage": (10 + bid) / 100}
    return [SpanRecord(proc, "EngineCore", "step", s, s + 10 * MS, tid, {"batch_id": bid}),
            SpanRecord(proc, "BatchSchedule", "batchFrameworkProcessing", s, s + 1 * MS, tid, attrs),
            SpanRecord(proc, "ModelExecute", "modelExec", s + 1 * MS, s + 9 * MS, tid, {"batch_id": bid})]


def _small_run(counters: bool = True) -> RunData:
    """API server and engine on different hosts with the same pid and tid 100; a worker whose two probes
    partially overlap; r1 is preempted in batch 2 and recomputed; r2 runs plainly."""
    procs = [_proc(0, "api_server", "host-a", 100), _proc(1, "engine_core", "host-b", 100),
             _proc(2, "worker", "host-b", 300)]
    procs[1].dropped = 7
    spans = (_batch(1, 100, 0, 10, [["r1", 0, 50, 0, 50, 0]])
             + _batch(1, 100, 1, 20, [["r1", 1, 1, 50, 50, 0], ["r2", 0, 30, 0, 30, 0]])
             + _batch(1, 100, 2, 30, [["r2", 1, 1, 30, 30, 0]], preempted=("r1",))
             + _batch(1, 100, 3, 40, [["r1", 0, 51, 0, 50, 1], ["r2", 1, 1, 31, 30, 0]])
             + _batch(1, 100, 4, 50, [["r1", 1, 1, 51, 50, 0]])
             + [SpanRecord(2, "Probe", "a", BASE + 12 * MS, BASE + 16 * MS, 301, None),
                SpanRecord(2, "Probe", "b", BASE + 14 * MS, BASE + 18 * MS, 301, {"error": "ValueError"})])
    spans.sort(key=lambda s: s.start_ns)

    def ev(proc: int, name: str, t: float, **attrs: Any) -> EventRecord:
        return EventRecord(proc, "Request", name, BASE + int(t * MS), 100, attrs)

    events = [ev(0, "httpReq", 5, rid="r1", api_rid="a1", prompt_tokens=50, max_tokens=3, stream=True),
              ev(1, "enqueue", 6, rid="r1", prompt_tokens=50),
              ev(0, "httpReq", 15, rid="r2", api_rid="a2", prompt_tokens=30, max_tokens=3, stream=True),
              ev(1, "enqueue", 16, rid="r2", prompt_tokens=30),
              ev(1, "state", 30.5, rid="r1", **{"from": "RUNNING", "to": "PREEMPTED", "batch_id": 2}),
              EventRecord(1, "KVCache", "allocate", BASE + 10 * MS, 100, {"rid": "r1", "blocks": 4}),
              EventRecord(0, "Request", "tokens", BASE + 29_500_000, 100, {"reqs": [["r2", 1, 0, None]]}),
              EventRecord(0, "Request", "tokens", BASE + 51 * MS, 100, {"reqs": [["r2", 1, 1, "length"]]}),
              ev(0, "httpRes", 52, rid="r2", output_tokens=3, finish_reason="length"),
              ev(0, "httpRes", 62, rid="r1", output_tokens=3, finish_reason="length")]
    events.sort(key=lambda e: e.ts_ns)
    recs: list[CounterRecord] = []
    if counters:
        recs = [CounterRecord(1, "KVCache", "kvcache", BASE + 11 * MS,
                              {"total_blocks": 100, "used_blocks": 10, "usage": 0.1}),
                CounterRecord(1, "BatchSchedule", "queues", BASE + 11 * MS, {"running": 1, "waiting": 0}),
                CounterRecord(0, "System", "host", BASE + 12 * MS,
                              {"cpu_percent": 12.5, "mem_used_bytes": 1e9, "mem_percent": 3.0}),
                CounterRecord(2, "System", "device_memory", BASE + 13 * MS,
                              {"used_bytes": 2e9, "total_bytes": 8e9})]
    return RunData(processes=procs, spans=spans, events=events, counters=recs,
                   states=[(1, BASE + 1 * MS, True, "startup")])


def _export(run: RunData, tmp_path: Path) -> tuple[dict[str, Any], Path]:
    out = tmp_path / "chrome_tracing.json"
    write_chrome_trace(run, None, out)
    trace = json.loads(out.read_text(encoding="utf-8"))
    assert validate_trace(trace) == []
    assert _independent_check(out) == []
    return trace, out


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
                slices[(pid, tid)].append((start, start + Decimal(ev["dur"])))
            elif ph in "sf":
                used_threads.add((pid, tid))
                flows[(ev["cat"], ev["id"])].append(ph + ev.get("bp", ""))
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


def test_small_run_exports_named_sorted_processes(tmp_path: Path) -> None:
    trace, _ = _export(_small_run(), tmp_path)
    names = _names(trace, "process_name")
    assert names == {1: "api_server host-a:100", 2: "engine_core host-b:100", 3: "worker host-b:300",
                     4: "Requests"}
    sort = {e["pid"]: e["args"]["sort_index"] for e in trace["traceEvents"]
            if e["ph"] == "M" and e["name"] == "process_sort_index"}
    assert sorted(sort, key=sort.__getitem__) == [1, 4, 2, 3]  # API, Requests, EngineCore, worker
    labels = [e for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "process_labels"]
    assert [(e["pid"], e["args"]["labels"]) for e in labels] == [(2, "dropped 7 records")]
    assert trace["displayTimeUnit"] == "ms"


def test_tids_are_integers_unique_across_processes(tmp_path: Path) -> None:
    trace, _ = _export(_small_run(), tmp_path)
    threads = _names(trace, "thread_name")
    api = [tid for (pid, tid), name in threads.items() if pid == 1]
    engine = [tid for (pid, tid), name in threads.items() if pid == 2]
    assert api and engine and not set(api) & set(engine)  # same raw tid 100 on two hosts
    assert threads[(2, engine[0])] == "main 100"
    tids = Counter(tid for _, tid in threads)
    assert max(tids.values()) == 1
    assert all(type(e.get("tid", 0)) is int for e in trace["traceEvents"])


def test_partially_overlapping_span_moves_to_an_overlap_lane(tmp_path: Path) -> None:
    trace, _ = _export(_small_run(), tmp_path)
    threads = _names(trace, "thread_name")
    probes = {e["name"]: e["tid"] for e in trace["traceEvents"] if e.get("cat") == "Probe"}
    assert probes["a"] != probes["b"]
    assert threads[(3, probes["a"])] == "thread 301"
    assert threads[(3, probes["b"])] == "thread 301 overlap 1"
    assert trace["metadata"]["overlap_lanes"] == 1


def test_timestamps_are_us_since_origin_with_ns_precision(tmp_path: Path) -> None:
    run = _small_run()
    trace, _ = _export(run, tmp_path)
    origin = trace["metadata"]["origin_epoch_ns"]
    assert origin == BASE - BASE % 1_000_000_000
    xs = {(e["name"], e["ts"]): e for e in trace["traceEvents"] if e["ph"] == "X" and e["pid"] == 3}
    for span in run.spans:
        if span.proc == 2:
            ev = xs[(span.name, (span.start_ns - origin) / 1000)]
            assert round(ev["ts"] * 1000) + origin == span.start_ns
            assert round(ev["dur"] * 1000) == span.end_ns - span.start_ns
    assert all(e["ts"] >= 0 for e in trace["traceEvents"] if "ts" in e)


def test_counters_one_series_per_key_and_numeric(tmp_path: Path) -> None:
    trace, _ = _export(_small_run(), tmp_path)
    counters = defaultdict(list)
    for e in trace["traceEvents"]:
        if e["ph"] == "C":
            counters[(e["pid"], e["name"])].append(e["args"])
    assert set(counters) == {(2, "kvcache"), (2, "queues"), (1, "host"), (3, "device_memory"), (2, "tokens")}
    assert counters[(1, "host")] == [{"cpu_percent": 12.5, "mem_used_bytes": 1e9, "mem_percent": 3.0}]
    assert counters[(2, "tokens")][1] == {"total": 31, "prefill": 30, "decode": 1}
    assert len(counters[(2, "kvcache")]) == 1  # recorded counters win over the span attributes
    for series in counters.values():
        assert all(type(v) in (int, float) for args in series for v in args.values())


def test_kvcache_and_queue_counters_fall_back_to_batch_attributes(tmp_path: Path) -> None:
    trace, _ = _export(_small_run(counters=False), tmp_path)
    kv = [e["args"] for e in trace["traceEvents"] if e["ph"] == "C" and e["name"] == "kvcache"]
    queues = [e["args"] for e in trace["traceEvents"] if e["ph"] == "C" and e["name"] == "queues"]
    assert len(kv) == len(queues) == 5
    assert kv[2] == {"total_blocks": 100, "used_blocks": 12, "usage": 0.12}


def _request_slices(trace: dict[str, Any]) -> dict[str, list[tuple[str, float, float]]]:
    threads = _names(trace, "thread_name")
    out: dict[str, list[tuple[str, float, float]]] = defaultdict(list)
    for e in trace["traceEvents"]:
        if e["ph"] == "X" and e["cat"] == "request":
            out[threads[(e["pid"], e["tid"])]].append((e["name"], e["ts"], e["ts"] + e["dur"]))
    return out


def test_request_tracks_show_queue_prefill_decode_and_preemption(tmp_path: Path) -> None:
    trace, _ = _export(_small_run(), tmp_path)
    origin_ms = (BASE - BASE % 1_000_000_000) / 1e6
    reqs = _request_slices(trace)
    assert set(reqs) == {"req r1", "req r2"}
    r1 = reqs["req r1"]
    assert [name for name, _, _ in r1] == ["request", "queued", "prefill", "decode", "preempted", "prefill",
                                           "decode"]
    whole, phases = r1[0], r1[1:]
    assert (whole[1], whole[2]) == (phases[0][1], phases[-1][2])
    assert all(a[2] == b[1] for a, b in itertools.pairwise(phases))  # adjacent, no gaps

    def ms(us: float) -> float:
        return round(us / 1000 + origin_ms - BASE / 1e6, 3)

    # No API tokens events for r1, so its first token is the end of the step that ran its prefill.
    # httpReq 5 ms; batch 0 at 10; its step ends at 20; PREEMPTED state at 30.5; recompute in batch 3
    # at 40, whose step ends at 50; httpRes 62.
    assert [ms(t) for _, t, _ in phases] == [5, 10, 20, 30.5, 40, 50]
    assert ms(r1[-1][2]) == 62
    # r2 has API tokens events: first token at 29.5, completion at the finishing tokens event (51),
    # not at httpRes (52) -- the request table's definitions.
    assert [(n, ms(a), ms(b)) for n, a, b in reqs["req r2"]] == [
        ("request", 15, 51), ("queued", 15, 20), ("prefill", 20, 29.5), ("decode", 29.5, 51)]
    args = next(e["args"] for e in trace["traceEvents"] if e["ph"] == "X" and e["name"] == "request"
                and e["args"]["rid"] == "r1")
    assert args == {"rid": "r1", "api_rid": "a1", "prompt_tokens": 50, "output_tokens": 3,
                    "finish_reason": "length", "preemptions": 1, "batches": 4}


def test_one_flow_per_request_from_arrival_to_first_batch(tmp_path: Path) -> None:
    trace, _ = _export(_small_run(), tmp_path)
    flows = defaultdict(list)
    for e in trace["traceEvents"]:
        if e["ph"] in "stf":
            flows[e["id"]].append(e)
    assert len(flows) == 2
    schedule = {e["args"]["batch_id"]: e for e in trace["traceEvents"]
                if e["ph"] == "X" and e["name"] == "batchFrameworkProcessing"}
    threads = _names(trace, "thread_name")
    first_batch = {"req r1": 0, "req r2": 1}
    for start, finish in flows.values():
        assert (start["ph"], finish["ph"], finish["bp"]) == ("s", "f", "e")
        assert "bp" not in start and start["cat"] == finish["cat"] == "request"
        batch = schedule[first_batch[threads[(start["pid"], start["tid"])]]]
        assert (finish["pid"], finish["tid"]) == (batch["pid"], batch["tid"])
        assert batch["ts"] < finish["ts"] < batch["ts"] + batch["dur"]
        assert start["ts"] < finish["ts"]


def test_instants_are_thread_scoped_and_high_volume_events_folded(tmp_path: Path) -> None:
    trace, _ = _export(_small_run(), tmp_path)
    instants = [e for e in trace["traceEvents"] if e["ph"] == "i"]
    names = {e["name"] for e in instants}
    assert names == {"httpReq", "enqueue", "state", "tokens", "httpRes", "collection on"}
    assert all(e["s"] == "t" for e in instants if e["cat"] != "profiler")
    assert trace["metadata"]["folded_events"] == {"KVCache/allocate": 1}


def test_malformed_batch_attributes_do_not_abort_the_export(tmp_path: Path) -> None:
    run = _small_run()
    bad = SpanRecord(1, "BatchSchedule", "batchFrameworkProcessing", BASE + 70 * MS, BASE + 71 * MS, 100,
                     {"batch_id": 9, "reqs": [["r9"], 5], "kv_usage": float("nan")})
    unhashable = SpanRecord(1, "BatchSchedule", "batchFrameworkProcessing", BASE + 72 * MS, BASE + 73 * MS,
                            100, {"batch_id": [9], "reqs": []})
    run.spans += [bad, unhashable]
    trace, _ = _export(run, tmp_path)
    assert trace["metadata"]["malformed_batches"] == 2
    assert any(e.get("args", {}).get("kv_usage") == "nan" for e in trace["traceEvents"] if e["ph"] == "X")


def test_empty_run_is_a_valid_trace(tmp_path: Path) -> None:
    trace, _ = _export(RunData(), tmp_path)
    assert trace["traceEvents"] == []


@pytest.fixture(scope="module", params=[64, 8], ids=["max_num_seqs=64", "max_num_seqs=8"])
def synthetic_1000x64(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> RunData:
    """1,000 requests x 64 output tokens: ~1,000 steps at the default batch size, ~8,000 (and ~68k
    records) with 8 sequences per batch."""
    run_dir = tmp_path_factory.mktemp("synthetic") / "run"
    generate_run(run_dir, SyntheticConfig(requests=1000, output_tokens=64, seed=3, max_num_seqs=request.param,
                                          num_gpu_blocks=2000))
    run = read_run([run_dir])
    assert not run.problems
    return run


def test_synthetic_1000_requests_x_64_tokens_is_small_fast_and_valid(
        synthetic_1000x64: RunData, tmp_path: Path) -> None:
    run = synthetic_1000x64
    out = tmp_path / "chrome_tracing.json"
    best = min(_timed(lambda: write_chrome_trace(run, None, out)) for _ in range(3))
    size = out.stat().st_size
    print(f"\n1000x64: {run.num_records} records -> {size / 1e6:.2f} MB in {best * 1000:.0f} ms")
    assert size <= 10_000_000
    assert best < 3.0  # 0.14 s / 0.45 s CPU measured; the bound only catches a blow-up on a busy box
    trace = json.loads(out.read_text(encoding="utf-8"))
    assert validate_trace(trace) == []
    assert _independent_check(out) == []
    phases = Counter(e["ph"] for e in trace["traceEvents"])
    assert phases["s"] == phases["f"] == 1000  # the reference writes ~197k flow events here
    assert phases["t"] == 0
    request_threads = [n for (pid, _), n in _names(trace, "thread_name").items() if n.startswith("req ")]
    assert len(request_threads) == 1000
    reqs = _request_slices(trace)
    assert all([n for n, _, _ in s][:4] == ["request", "queued", "prefill", "decode"] for s in reqs.values())


def test_synthetic_dp2_across_hosts_is_valid(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    truth = generate_run(run_dir, SyntheticConfig(
        requests=60, output_tokens=32, prompt_tokens=(64, 256), dp_size=2, max_num_seqs=8,
        num_gpu_blocks=60, engine_hostname="other", engine_mono_offset_ns=7_000 * MS))
    trace, _ = _export(read_run([run_dir]), tmp_path)
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
    preempted = {name[4:] for name, s in reqs.items() if "preempted" in [n for n, _, _ in s]}
    assert preempted == {rid for rid, t in truth.requests.items() if t.preemptions}
    assert preempted


def test_build_and_write_agree(tmp_path: Path) -> None:
    run = _small_run()
    _, out = _export(run, tmp_path)
    assert json.loads(out.read_text(encoding="utf-8")) == json.loads(json.dumps(build_chrome_trace(run)))


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
