"""The twin without a real engine run: traces and their formats, engine args checked by vLLM, vLLM's real
scheduler on the virtual clock (determinism, prefix hits from block hashes, preemption), the step-time
model, the capture handler, and clear errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from service_profiler.model.step_model import StepModelV2, fit_step_model
from service_profiler.twin import (
    CaptureError,
    EngineArgsError,
    TraceError,
    TraceRequest,
    Twin,
    read_trace,
    write_trace,
)
from service_profiler.twin.formats import export_vllm_bench, read_azure, read_burstgpt, read_mooncake
from service_profiler.twin.shapes import ShapeCache
from service_profiler.twin.simulator import StepFeatures
from service_profiler.twin.twin import StepTimeModel, _frozen_heap

pytestmark = pytest.mark.vllm

MODEL = StepTimeModel(StepModelV2({"c_0": 2.0, "c_req": 0.05, "c_p": 0.02, "c_d": 0.01, "c_pc": 1e-6,
                                   "c_dc": 1e-5}))
SETTINGS = {"max_num_seqs": 8, "max_num_batched_tokens": 256, "max_model_len": 2048, "block_size": 32,
            "pool_blocks": 400, "enable_prefix_caching": True}


def _trace(n: int = 40, shared: int = 0) -> list[TraceRequest]:
    out = []
    for i in range(n):
        hashes = tuple(range(1, shared // 16 + 1)) if shared and i % 2 == 0 else None
        out.append(TraceRequest(rid=f"r{i}", arrival_s=i * 0.01, prompt_tokens=shared + 40 + (i * 37) % 200,
                                output_tokens=4 + (i * 7) % 30, hash_block=16 if hashes else None,
                                block_hashes=hashes))
    return out


def test_trace_round_trip(tmp_path: Path) -> None:
    requests = _trace(5, shared=64)
    path = write_trace(requests, tmp_path / "t.jsonl")
    assert read_trace(path) == requests
    assert json.loads(path.read_text().splitlines()[0]) == {"format": "service-profiler-trace", "version": 1}


@pytest.mark.parametrize(("line", "expected"), [
    ('{"rid": "a", "arrival_s": 0, "prompt_tokens": 0, "output_tokens": 3}', "'prompt_tokens' must be an integer >= 1"),
    ('{"rid": "a", "arrival_s": -1, "prompt_tokens": 5, "output_tokens": 3}', "'arrival_s' must be"),
    ('{"rid": "a", "arrival_s": 0, "prompt_tokens": 5}', "missing 'output_tokens'"),
    ('{"rid": "a", "arrival_s": 0, "prompt_tokens": 5, "output_tokens": 3, "token_ids": [1]}', "has 1 ids"),
    ('{"rid": "a", "arrival_s": 0, "prompt_tokens": 5, "output_tokens": 3, "block_hashes": [1]}', "'hash_block'"),
    ("not json", "not valid JSON"),
    ('{"format": "service-profiler-trace", "version": 9}', "unsupported header"),
])
def test_bad_trace_rows_name_the_line(tmp_path: Path, line: str, expected: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"rid": "ok", "arrival_s": 0, "prompt_tokens": 5, "output_tokens": 3}\n' + line + "\n")
    with pytest.raises(TraceError, match=expected) as info:
        read_trace(path)
    assert f"{path}:2:" in str(info.value)


def test_duplicate_rids_and_empty_traces_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "dup.jsonl"
    row = '{"rid": "a", "arrival_s": 0, "prompt_tokens": 5, "output_tokens": 3}\n'
    path.write_text(row + row)
    with pytest.raises(TraceError, match="appears twice"):
        read_trace(path)
    path.write_text("\n")
    with pytest.raises(TraceError, match="no requests"):
        read_trace(path)


def test_importers(tmp_path: Path) -> None:
    azure = tmp_path / "azure.csv"
    azure.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n"
                     "2023-11-16 18:15:50.9951690,396,109\n")
    got = read_azure(azure)
    assert [(r.prompt_tokens, r.output_tokens) for r in got] == [(374, 44), (396, 109)]
    assert got[0].arrival_s == 0 and abs(got[1].arrival_s - 4.314579) < 1e-3
    burst = tmp_path / "burst.csv"
    burst.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                     "5,ChatGPT,472,18,490,Conversation log\n8,GPT-4,1000,0,1000,Conversation log\n"
                     "9,ChatGPT,20,7,27,API log\n")
    got = read_burstgpt(burst)
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in got] == [(0.0, 472, 18), (4.0, 20, 7)]
    moon = tmp_path / "moon.jsonl"
    moon.write_text('{"timestamp": 0, "input_length": 1100, "output_length": 5, "hash_ids": [7, 8, 9]}\n'
                    '{"timestamp": 250, "input_length": 600, "output_length": 2, "hash_ids": [7, 10]}\n')
    a, b = read_mooncake(moon)
    assert b.arrival_s == 0.25 and a.hash_block == 512
    assert a.block_hashes is not None and b.block_hashes is not None
    assert len(a.block_hashes) == 2 and len(b.block_hashes) == 1 and a.block_hashes[0] == b.block_hashes[0]


def test_importers_name_bad_rows(tmp_path: Path) -> None:
    azure = tmp_path / "azure.csv"
    azure.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,abc,44\n")
    with pytest.raises(TraceError, match=r"azure.csv:2: column 'ContextTokens' must be a number"):
        read_azure(azure)
    azure.write_text("TIMESTAMP,Context\n1,2\n")
    with pytest.raises(TraceError, match="missing column"):
        read_azure(azure)
    moon = tmp_path / "moon.jsonl"
    moon.write_text('{"timestamp": 0, "input_length": 10, "output_length": 5, "hash_ids": ["x"]}\n')
    with pytest.raises(TraceError, match=r"moon.jsonl:1: 'hash_ids'"):
        read_mooncake(moon)


def test_every_jsonl_trace_reader_names_the_bad_line_alike(tmp_path: Path) -> None:
    # The twin's trace, Mooncake's and the workload generator's replay share one line reader.
    from service_profiler.workload.requests import WorkloadError, read_requests

    readers = [(read_trace, TraceError), (read_mooncake, TraceError),
               (lambda p: read_requests(p, 512), WorkloadError)]
    path = tmp_path / "t.jsonl"
    for bad, says in (("not json", "not valid JSON"), ("[1, 2]", "expected a JSON object, got list")):
        path.write_text('{"timestamp": 0, "input_length": 5, "output_length": 3, "rid": "a", "arrival_s": 0, '
                        '"prompt_tokens": 5, "output_tokens": 3}\n\n' + bad + "\n")
        for reader, error in readers:
            with pytest.raises(error, match=rf"t\.jsonl:3: {says}"):
                reader(path)
    for reader, error in readers:
        with pytest.raises(error, match="no such trace file"):
            reader(tmp_path / "missing.jsonl")
    path.write_text('{"format": "service-profiler-trace", "version": 9}\n')
    with pytest.raises(WorkloadError, match=r"t\.jsonl:1: unsupported header"):
        read_requests(path, 512)


def test_vllm_bench_exports(tmp_path: Path) -> None:
    requests = _trace(3, shared=32)
    rows = [json.loads(x) for x in export_vllm_bench(requests, tmp_path / "t.jsonl").read_text().splitlines()]
    assert rows[0]["input_length"] == requests[0].prompt_tokens and rows[0]["hash_ids"] == [1, 2]
    assert rows[1]["timestamp"] == requests[1].arrival_s and rows[1]["hash_ids"] == []
    custom_path = export_vllm_bench(requests, tmp_path / "c.jsonl", "custom")
    custom = [json.loads(x) for x in custom_path.read_text().splitlines()]
    assert custom[2]["output_tokens"] == requests[2].output_tokens and isinstance(custom[2]["prompt"], str)


def _twin(requests: list[TraceRequest] | None = None, **settings: object) -> Twin:
    return Twin.from_trace(requests or _trace(), base_settings={**SETTINGS, **settings}, step_model=MODEL)


def test_same_inputs_give_byte_identical_outputs(tmp_path: Path) -> None:
    for sub in ("a", "b"):
        _twin(_trace(60, shared=64)).run(["--max-num-seqs", "4"]).write(tmp_path / sub)
    for name in ("request.csv", "batch.csv", "prediction.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_prediction_metrics_and_tables() -> None:
    pred = _twin().run({"max_num_seqs": 4})
    assert pred.settings["max_num_seqs"] == 4 and pred.step_times == "v2"
    assert pred.metrics["completed_requests"] == 40
    assert 0 < pred.metrics["ttft_ms_p50"] <= pred.metrics["ttft_ms_p90"] <= pred.metrics["ttft_ms_p99"]
    assert max(b["total_batch_size"] for b in pred.batches) <= 4
    assert max(b["total_scheduled_tokens"] for b in pred.batches) <= 256
    assert sum(r["output_tokens"] for r in pred.requests) == sum(r.output_tokens for r in _trace())
    wider = _twin().run({"max_num_seqs": 8})
    # More requests per step: the same work in fewer steps.
    assert len(wider.batches) < len(pred.batches)


def test_block_hashes_replay_as_prefix_cache_hits() -> None:
    cached = _twin(_trace(20, shared=128)).run({})
    hits = {r["rid"]: r["prefix_hit_tokens"] for r in cached.requests}
    # Every even request shares 128 tokens (4 blocks of 32) with the first one.
    assert all(hits[f"r{i}"] == 128 for i in range(2, 20, 2)) and hits["r0"] == 0
    assert all(hits[f"r{i}"] == 0 for i in range(1, 20, 2))
    uncached = _twin(_trace(20, shared=128)).run(["--no-enable-prefix-caching"])
    assert all(r["prefix_hit_tokens"] == 0 for r in uncached.requests)


def test_small_kv_pool_preempts() -> None:
    pred = _twin(pool_blocks=30).run({})
    assert pred.metrics["preemptions"] > 0 and pred.metrics["completed_requests"] == 40
    assert pred.metrics["preemptions"] == sum(r["preemptions"] for r in pred.requests)


def test_async_scheduling_replays_with_a_batch_queue() -> None:
    sync = _twin().run({})
    batched = _twin().run(["--async-scheduling"])
    assert batched.settings["async_scheduling"] is True and batched.metrics["completed_requests"] == 40
    assert batched.metrics == _twin().run(["--async-scheduling"]).metrics
    assert batched.metrics != sync.metrics


@pytest.mark.parametrize(("args", "expected"), [
    (["--max-num-seqs", "abc"], "vLLM rejected the engine args"),
    (["--no-such-flag"], "vLLM rejected the engine args"),
    (["--tensor-parallel-size", "2"], "cannot predict a change of tensor_parallel_size"),
    ({"max_num_sequences": 3}, "unknown EngineArgs field"),
    (["--max-num-seqs", "512", "--max-num-batched-tokens", "256"], "vLLM rejected the configuration"),
])
def test_engine_args_vllm_rejects_are_clear_errors(args: object, expected: str) -> None:
    with pytest.raises(EngineArgsError, match=expected):
        _twin().run(args)  # type: ignore[arg-type]


def test_step_model_recovers_known_costs_and_reports_regimes() -> None:
    rng = np.random.default_rng(1)
    n = 600
    b = rng.integers(1, 16, n)
    p = np.where(rng.random(n) < 0.3, rng.integers(16, 256, n), 0)
    d = np.where(p > 0, rng.integers(0, 8, n), b)
    pc = p * rng.integers(0, 300, n)
    dc = d * rng.integers(10, 500, n)
    truth = 1.0 + 0.1 * b + 0.01 * p + 0.02 * d + 1e-5 * pc + 2e-4 * dc
    model = fit_step_model(np.column_stack([b, p, d, pc, dc]), truth * rng.normal(1.0, 0.02, n))
    test = model.metrics["test"]
    assert test["all"]["mape_pct"] < 4.0
    assert {"decode_only", "prefill_only", "mixed"} <= set(test)
    assert model.coefficients["c_0"] == pytest.approx(1.0, rel=0.1)
    assert model.time_scale == pytest.approx(1.0, abs=0.02)  # no host stalls in these steps
    assert all(v >= 0 for v in model.coefficients.values())
    assert model.metrics["noise_floor"]["mape_pct"] is not None
    assert StepModelV2.from_dict(json.loads(json.dumps(model.to_dict()))).coefficients == model.coefficients


def test_kernel_cache_misses_are_an_lru_of_token_counts() -> None:
    cache = ShapeCache(size=3)
    assert [cache.miss(t) for t in (8, 100, 8, 37, 52)] == [True, True, False, True, True]
    assert cache.miss(8) is False  # used recently: still cached
    assert cache.miss(100) is True  # the least recently used count, dropped when 52 came in


def test_step_model_separates_the_kernel_cache_miss_from_prefill_tokens() -> None:
    # Steps whose token count misses the engine's kernel cache pay a fixed cost, whatever their size:
    # without the feature it is smeared over the prefill tokens, and short prefills come out too cheap.
    rng = np.random.default_rng(3)
    n = 800
    b = rng.integers(1, 9, n)
    p = np.where(rng.random(n) < 0.3, rng.integers(16, 256, n), 0)
    d = np.where(p > 0, b - 1, b)
    new = ((p > 0) & (rng.random(n) < 0.8)) | (rng.random(n) < 0.02)
    truth = 1.2 + 0.05 * b + 0.006 * p + 2.3 * new
    x = np.column_stack([b, p, d, np.zeros(n), np.zeros(n), new])
    y = truth * rng.normal(1.0, 0.02, n)
    model = fit_step_model(x, y)
    assert model.coefficients["c_shape"] == pytest.approx(2.3, rel=0.1)
    assert model.coefficients["c_p"] == pytest.approx(0.006, rel=0.15)
    assert model.metrics["test"]["mixed"]["mape_pct"] < 4.0
    without = fit_step_model(x[:, :5], y)
    assert without.coefficients["c_shape"] == 0.0
    assert without.metrics["test"]["mixed"]["mape_pct"] > 3 * model.metrics["test"]["mixed"]["mape_pct"]
    # A model saved before the feature existed reads with c_shape = 0.
    old = {k: v for k, v in model.to_dict().items()}
    old["coefficients"] = {k: v for k, v in model.coefficients.items() if k != "c_shape"}
    assert StepModelV2.from_dict(old).coefficients["c_shape"] == 0.0


def test_step_model_finds_the_extra_cost_of_prefill_only_steps() -> None:
    # The CPU engine's steps of prefill tokens only (a request arriving at an idle engine, the later chunks
    # of a chunked prompt) cost a fixed amount more than a mixed step with the same prefill; they are few
    # beside the decode and mixed steps, so without their own term the fit makes them too cheap.
    rng = np.random.default_rng(4)
    n = 900
    b = rng.integers(1, 9, n)
    p = np.where(rng.random(n) < 0.25, rng.integers(16, 256, n), 0)
    d = np.where(p > 0, np.where(rng.random(n) < 0.3, 0, b - 1), b)
    b = np.where((p > 0) & (d == 0), 1, b)
    prefill_only = (p > 0) & (d == 0)
    truth = 1.3 + 0.05 * b + 0.008 * p + 1.5 * prefill_only
    model = fit_step_model(np.column_stack([b, p, d, np.zeros(n), np.zeros(n)]), truth * rng.normal(1.0, 0.02, n))
    assert model.coefficients["c_prefill_only"] == pytest.approx(1.5, rel=0.1)
    assert model.coefficients["c_p"] == pytest.approx(0.008, rel=0.15)
    assert model.metrics["test"]["prefill_only"]["mape_pct"] < 4.0
    assert model.predict_ms(1, 100, 0, 0, 0) == pytest.approx(model.predict_ms(2, 100, 1, 0, 0)
                                                              - model.coefficients["c_req"] - model.coefficients["c_d"]
                                                              + model.coefficients["c_prefill_only"])
    # The replay charges it to prefill-only steps only; a model saved without it reads it as 0.
    timer = StepTimeModel(StepModelV2({"c_0": 1.0, "c_req": 0.0, "c_p": 0.0, "c_d": 0.0, "c_pc": 0.0, "c_dc": 0.0,
                                       "c_prefill_only": 2.0}))
    assert timer(0, StepFeatures(64, 0, 1, 0, 0, 0)) == 3_000_000
    assert timer(0, StepFeatures(64, 3, 1, 3, 0, 0)) == 1_000_000
    assert timer(0, StepFeatures(0, 3, 0, 3, 0, 0)) == 1_000_000
    old = model.to_dict()
    old["coefficients"] = {k: v for k, v in model.coefficients.items() if k != "c_prefill_only"}
    assert StepModelV2.from_dict(old).coefficients["c_prefill_only"] == 0.0


def test_replay_pays_the_kernel_cache_miss_once_per_new_token_count() -> None:
    # Identical requests, far apart: only the first prefill and the first decode run a new token count.
    requests = [TraceRequest(rid=f"r{i}", arrival_s=i * 1.0, prompt_tokens=100, output_tokens=3) for i in range(4)]
    coefficients = {"c_0": 1.0, "c_req": 0.0, "c_p": 0.01, "c_d": 0.0, "c_pc": 0.0, "c_dc": 0.0}
    plain = Twin.from_trace(requests, base_settings=SETTINGS, step_model=StepTimeModel(StepModelV2(coefficients)))
    missing = Twin.from_trace(requests, base_settings=SETTINGS,
                              step_model=StepTimeModel(StepModelV2({**coefficients, "c_shape": 5.0})))
    result = missing.run({}).result
    assert result is not None
    assert [s.features.new_shape for s in result.steps] == [1, 1, 0] + [0, 0, 0] * 3
    ttft = [r["ttft_ms"] for r in missing.run({}).requests]
    base = [r["ttft_ms"] for r in plain.run({}).requests]
    assert ttft[0] == pytest.approx(base[0] + 5.0) and ttft[1:] == pytest.approx(base[1:])


def test_tokens_count_from_the_end_of_the_update_not_the_next_step() -> None:
    # The engine loop's own work after a step's update (output processing) ends the step's cycle, but
    # the captured run's first token is stamped before it: the replay stamps it output_lag_ns earlier.
    requests = [TraceRequest(rid=f"r{i}", arrival_s=i * 1.0, prompt_tokens=40, output_tokens=4) for i in range(3)]
    v2 = StepModelV2({"c_0": 2.0, "c_req": 0.0, "c_p": 0.01, "c_d": 0.0, "c_pc": 0.0, "c_dc": 0.0})
    runs = [Twin.from_trace(requests, base_settings=SETTINGS, step_model=StepTimeModel(v2, output_lag_ns=lag)).run({})
            for lag in (0, 300_000)]
    for early, late in zip(runs[1].requests, runs[0].requests, strict=True):
        assert early["ttft_ms"] == pytest.approx(late["ttft_ms"] - 0.3)
        assert early["tpot_ms"] == pytest.approx(late["tpot_ms"])
    assert [b["during_time(ms)"] for b in runs[0].batches] == [b["during_time(ms)"] for b in runs[1].batches]


def test_a_few_host_stalls_are_reported_not_spread_over_every_step() -> None:
    # A short capture on a shared machine: 1 % of the steps take 100x longer (a new shape's first step,
    # the engine descheduled) and hold half of the busy time. Spread over every step, they would double
    # every predicted step; they are host events, and are reported instead.
    rng = np.random.default_rng(2)
    n = 1000
    b = rng.integers(1, 9, n)
    p = np.where(rng.random(n) < 0.2, rng.integers(16, 200, n), 0)
    d = np.where(p > 0, rng.integers(0, 4, n), b)
    truth = 1.0 + 0.1 * b + 0.01 * p
    measured = truth * rng.normal(1.0, 0.03, n)
    stalled = rng.choice(n, 10, replace=False)
    measured[stalled] += 150.0
    model = fit_step_model(np.column_stack([b, p, d, np.zeros(n), np.zeros(n)]), measured)
    assert model.time_scale == pytest.approx(1.0, abs=0.03)
    stalls = model.metrics["stalls"]
    assert 5 <= stalls["count"] <= 10  # those in the training split
    assert stalls["share_of_busy_time"] > 0.3
    assert stalls["model"] == "v2"
    # The prediction's note names the model the stall figures are for, and what the replay did with them.
    tbs_params = model.metrics["baseline_tbs_test"]["params"]
    for use, says in (("v2", "step model v2, which the twin replayed with, leaves them out"),
                      ("tbs", "replayed with the T(B,S) model, fitted to every step with the stalls in")):
        twin = Twin.from_trace(_trace(10), base_settings=SETTINGS, step_model=StepTimeModel(model, use, tbs_params))
        notes = [n for n in twin.run({}).notes if "host stalls" in n]
        assert len(notes) == 1 and "slower than step model v2 by more than 5 MADs" in notes[0], notes
        assert says in notes[0]


def _write_rows(path: Path, rows: list[dict[str, object]]) -> None:
    columns = list(rows[0])
    path.write_text("\n".join([",".join(columns)] + [",".join(str(r[c]) for c in columns) for r in rows]) + "\n")


def test_front_end_delay_leaves_out_the_wait_for_a_running_step(tmp_path: Path) -> None:
    # r1 reaches the API server at 2 ms and is handed over at 3 ms while the engine runs a step until
    # 10 ms; the engine takes it at 10.5 ms. The 7 ms of that step are a wait the replay makes again with
    # its own steps: the front end's share is 10.5 - 2 - 7 = 1.5 ms.
    ms = 1_000_000
    t0 = 1_700_000_000_000_000_000
    request = {"rid": "", "arrival_ns": 0, "engine_arrival_ns": 0, "handoff_ns": 0, "input_tokens": 10,
               "output_tokens": 2, "first_token_ns": 0, "completion_ns": 0, "timing_source": "api", "complete": 1}
    _write_rows(tmp_path / "request.csv", [
        {**request, "rid": "r0", "arrival_ns": t0, "engine_arrival_ns": t0 + ms // 10, "handoff_ns": t0,
         "first_token_ns": t0 + 10 * ms + ms // 5, "completion_ns": t0 + 12 * ms + ms // 5},
        {**request, "rid": "r1", "arrival_ns": t0 + 2 * ms, "engine_arrival_ns": t0 + 10 * ms + ms // 2,
         "handoff_ns": t0 + 3 * ms, "first_token_ns": t0 + 12 * ms + ms // 5, "completion_ns": t0 + 14 * ms}])
    _write_rows(tmp_path / "batch.csv", [
        {"batch_id": 0, "start_ns": t0 + ms // 5, "update_end_ns": t0 + 10 * ms, "num_preempted": 0},
        {"batch_id": 1, "start_ns": t0 + 10 * ms + ms * 6 // 10, "update_end_ns": t0 + 12 * ms, "num_preempted": 0},
        {"batch_id": 2, "start_ns": t0 + 12 * ms + ms // 10, "update_end_ns": t0 + 13 * ms, "num_preempted": 0}])
    step = {"phase": "prefill", "scheduled_tokens": 10, "computed_tokens_before": 0, "prompt_tokens": 10}
    _write_rows(tmp_path / "per_iteration_requests.csv", [
        {"batch_id": 0, "rid": "r0", **step},
        {"batch_id": 1, "rid": "r1", **step},
        {"batch_id": 1, "rid": "r0", **step, "phase": "decode", "scheduled_tokens": 1, "computed_tokens_before": 10},
        {"batch_id": 2, "rid": "r1", **step, "phase": "decode", "scheduled_tokens": 1, "computed_tokens_before": 10}])
    requests = {r.rid: r for r in Twin.from_run(tmp_path).requests}
    assert requests["r1"].engine_delay_ms == pytest.approx(1.5)
    assert requests["r0"].engine_delay_ms == pytest.approx(0.1)  # no step ran: all front end
    # Delivery counts from the update's end of the step completing the prompt, batch 0 included.
    assert requests["r0"].reply_delay_ms == pytest.approx(0.2) and requests["r1"].reply_delay_ms == pytest.approx(0.2)


def test_runs_without_the_needed_records_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CaptureError, match=r"request\.csv: missing"):
        Twin.from_run(tmp_path)
    (tmp_path / "request.csv").write_text("rid,arrival_ns\nx,1\n")
    with pytest.raises(CaptureError, match="missing column"):
        Twin.from_run(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "service_profiler.cli", "twin", "--run", str(tmp_path / "nope"),
                           "--output-path", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not a directory" in proc.stderr and "Traceback" not in proc.stderr


def test_capture_handler_records_hashes_and_settings() -> None:
    from vllm_scheduler_harness import make_request, make_scheduler, prompt_of

    from service_profiler import record
    from service_profiler.engines.vllm import vllm_twin_capture as capture

    engine = types.SimpleNamespace(scheduler=make_scheduler(num_blocks=64), batch_queue_size=1)

    def add_request(this: object, request: object, request_wave: int = 0) -> str:
        return "added"

    shared = prompt_of(40)
    with record.capture() as captured:
        results = [capture.engine_add_request_handler(add_request, engine, make_request(f"q{i}", prompt))
                   for i, prompt in enumerate([shared, shared[:32] + prompt_of(8, 900), prompt_of(10)])]
        # A broken engine object costs only the record, never the call.
        assert capture.engine_add_request_handler(add_request, object(), object()) == "added"
    assert results == ["added"] * 3
    config = [p["attrs"] for p in captured.of("Request", "twinConfig")]
    facts = [p["attrs"] for p in captured.of("Request", "twinRequest")]
    assert config[0]["pool_blocks"] == 64 and config[0]["block_size"] == 16 and config[0]["max_model_len"] == 2048
    assert [len(f["block_hashes"]) for f in facts] == [2, 2, 0]
    assert facts[0]["block_hashes"] == facts[1]["block_hashes"]
    assert facts[0]["max_tokens"] == 4 and facts[0]["prompt_tokens"] == 40


def test_parallel_sweep_equals_serial_runs() -> None:
    twin = _twin()
    configs = [("four", ["--max-num-seqs", "4"]), ("mbt", {"max_num_batched_tokens": 128}), ("base", [])]
    swept = twin.sweep(configs, workers=2)
    assert [name for name, _ in swept] == ["four", "mbt", "base"]
    for (_, pred), (_, args) in zip(swept, configs, strict=True):
        assert pred.metrics == twin.run(args).metrics
    with pytest.raises(EngineArgsError, match="vLLM rejected"):
        twin.sweep([("bad", ["--max-num-seqs", "x"])])


def test_parallel_sweep_writes_the_same_files_as_serial_runs(tmp_path: Path) -> None:
    # Results come back from the workers as packed columns and prompts are made once per workload:
    # neither may change a byte of what is written (prefix hits, preemptions and async included).
    twin = _twin(_trace(50, shared=64))
    configs = [("small_kv", {"num_gpu_blocks_override": 20}), ("async", {"async_scheduling": True}), ("base", {})]
    swept = twin.sweep(configs, workers=2)
    assert swept[0][1].metrics["preemptions"] > 0
    assert any(r["prefix_hit_tokens"] for r in swept[2][1].requests)
    for (name, pred), (_, args) in zip(swept, configs, strict=True):
        pred.write(tmp_path / "swept" / name)
        twin.run(args).write(tmp_path / "serial" / name)
        for file in ("request.csv", "batch.csv", "prediction.json"):
            assert (tmp_path / "swept" / name / file).read_bytes() == \
                (tmp_path / "serial" / name / file).read_bytes(), (name, file)


def test_sweep_file_errors_name_the_key(tmp_path: Path) -> None:
    from service_profiler.twin.command import sweep_configs

    path = tmp_path / "sweep.yaml"
    path.write_text("grid:\n  max_num_seqs: [4, 8]\n  enable_prefix_caching: [true]\nconfigs:\n"
                    "  - {name: small, engine_args: '--max-num-seqs 2'}\n")
    assert [n for n, _ in sweep_configs(path)] == ["small", "enable_prefix_caching=True-max_num_seqs=4",
                                                   "enable_prefix_caching=True-max_num_seqs=8"]
    path.write_text("configs:\n  - {name: x}\n")
    with pytest.raises(ValueError, match=r"configs\[0\] needs 'engine_args'"):
        sweep_configs(path)


def test_wheel_carries_the_twin() -> None:
    from importlib.resources import files

    import service_profiler.twin.command
    import service_profiler.twin.formats  # noqa: F401

    yaml_text = files("service_profiler.engines.vllm").joinpath("vllm_v1.yaml").read_text()
    assert "vllm_twin_capture:engine_add_request_handler" in yaml_text


def test_measured_step_times_need_the_captured_workload() -> None:
    with pytest.raises(ValueError, match="needs the captured workload"):
        _twin().run({}, step_times="measured")
    with pytest.raises(ValueError, match="step_times must be"):
        _twin().run({}, step_times="fast")


def test_a_sweep_freezes_the_heap_only_while_it_runs_and_never_a_callers_frozen_heap() -> None:
    import gc

    assert gc.get_freeze_count() == 0
    with _frozen_heap():
        assert gc.get_freeze_count() > 0  # the sweep's workers do not walk the objects alive before it
    assert gc.get_freeze_count() == 0
    gc.freeze()  # a caller's own
    try:
        theirs = gc.get_freeze_count()
        made_during = [object() for _ in range(1000)]
        with _frozen_heap():
            assert gc.get_freeze_count() == theirs  # nothing of ours joins theirs, frozen for good
        assert made_during
    finally:
        gc.unfreeze()
