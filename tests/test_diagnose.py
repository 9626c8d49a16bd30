"""The bottleneck analyzer: its rules on measured signals, the workload's prefix overlap, the serve-args
reader, and a real vLLM CPU run induced to be memory-bound, diagnosed end to end through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from service_profiler.diagnose import THRESHOLDS, diagnose, load_run
from service_profiler.diagnose.rules import classify
from service_profiler.diagnose.signals import parse_serve_args, prefix_overlap

QUIET = {"steps": 100, "wall_ms": 1000.0, "busy_share": 0.3, "model_share": 0.9, "step_ms_p50": 2.0,
         "tokens_per_step_mean": 40.0, "waiting_share": 0.0, "waiting_max": 0, "kv_usage_p90": 0.1,
         "kv_usage_max": 0.2, "preemptions": 0, "max_num_seqs": 8, "max_num_seqs_inferred": False,
         "max_num_batched_tokens": 2048, "at_seq_limit_share": 0.0, "at_token_budget_share": 0.0,
         "prefix_hit_rate": 0.0, "prefix_overlap": 0.0, "prefix_caching": True, "requests": 50,
         "e2e_ms_p50": 100.0, "front_end_share_p50": 0.01, "front_end_ms_p50": 1.0}


def kinds(**changes: Any) -> list[str]:
    return [v["kind"] for v in classify(QUIET | changes)]


def test_each_rule_fires_at_its_threshold_and_not_below() -> None:
    assert kinds() == []
    assert kinds(busy_share=0.95) == ["compute-bound"]
    assert kinds(preemptions=3) == ["memory-bound"]
    assert kinds(kv_usage_p90=0.95, waiting_share=0.5) == ["memory-bound"]
    assert kinds(kv_usage_p90=0.95) == []  # full but nobody waits: a well-used cache
    assert kinds(waiting_share=0.5, at_seq_limit_share=0.9) == ["scheduling-bound"]
    assert kinds(waiting_share=0.5, at_token_budget_share=0.9) == ["scheduling-bound"]
    assert kinds(waiting_share=THRESHOLDS["waiting_share"] - 0.01, at_seq_limit_share=0.9) == []
    assert kinds(prefix_overlap=0.6, prefix_hit_rate=0.0, prefix_caching=False) == ["cache-bound"]
    assert kinds(prefix_overlap=0.6, prefix_hit_rate=0.55) == []
    assert kinds(front_end_share_p50=0.5, front_end_ms_p50=50.0) == ["front-end-bound"]
    # front-end time under a couple of steps is the engine loop finishing its step
    assert kinds(front_end_share_p50=0.5, front_end_ms_p50=3.0) == []


def test_a_capacity_limit_is_named_instead_of_compute() -> None:
    assert kinds(busy_share=0.95, waiting_share=0.6, at_seq_limit_share=1.0) == ["scheduling-bound"]
    assert kinds(busy_share=0.95, preemptions=5) == ["memory-bound"]
    assert kinds(busy_share=0.95, prefix_overlap=0.7, prefix_caching=False) == ["cache-bound"]


def test_prefix_overlap_counts_full_blocks_seen_before(tmp_path: Path) -> None:
    shared = list(range(10, 74))  # 64 tokens: two blocks of 32
    rows = [{"rid": "a", "token_ids": [*shared, *range(100, 140)]},   # first: nothing seen before
            {"rid": "b", "token_ids": [*shared, *range(200, 240)]},   # 64 of 104 tokens cached
            {"rid": "c", "token_ids": [*range(300, 340)]}]
    path = tmp_path / "w.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert prefix_overlap(path, 32) == pytest.approx(64 / (104 + 104 + 40))
    assert prefix_overlap(None, 32) is None


def test_serve_args_are_read_in_all_their_spellings() -> None:
    assert parse_serve_args(["vllm", "serve", "m", "--max-num-seqs", "4", "--max-num-batched-tokens=512",
                             "--no-enable-prefix-caching", "--enable-chunked-prefill", "--block-size", "32",
                             "--scheduling-policy", "priority"]) == {
        "max_num_seqs": 4, "max_num_batched_tokens": 512, "enable_prefix_caching": False,
        "enable_chunked_prefill": True, "block_size": 32, "scheduling_policy": "priority"}


def test_bad_input_is_named(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "service_profiler.cli", "diagnose", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "run `service-profiler analyze` first" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.vllm
def test_a_tiny_kv_pool_is_diagnosed_memory_bound(tiny_model: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
    from bottleneck_scenarios import SCENARIOS, run_scenario

    doc = run_scenario(SCENARIOS["memory"], tiny_model, tmp_path)
    assert doc["primary"] == "memory-bound", doc["verdicts"]
    assert "compute-bound" not in [v["kind"] for v in doc["verdicts"]]
    verdict = doc["verdicts"][0]
    assert verdict["evidence"]["preemptions"] > 0 or verdict["evidence"]["kv_usage_p90"] >= 0.9
    assert {r["knob"] for r in verdict["recommendations"]} >= {"num_gpu_blocks_override"}
    # The same run through the CLI: performance_analysis.json and the figure, from the raw run directory.
    run_dir = next((tmp_path / "memory" / "engine" / "prof").iterdir())
    out = tmp_path / "diag"
    result = subprocess.run([sys.executable, "-m", "service_profiler.cli", "diagnose", str(run_dir),
                             "--output-path", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "[memory-bound]" in result.stdout and "thresholds:" in result.stdout
    saved = json.loads((out / "performance_analysis.json").read_text())
    assert [v["kind"] for v in saved["verdicts"]] == [v["kind"] for v in doc["verdicts"]]
    assert (out / "vllm_performance_analysis.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_run(run_dir).engine["num_gpu_blocks_override"] == 24
    assert diagnose(load_run(run_dir))["primary"] == "memory-bound"


# --- front-end-bound on analyze's own request rows -----------------------------------------------------
MS = 1_000_000
T0 = 1_700_000_000_000_000_000


def _served_run(count: int, *, preprocess_ms: float, handoff_wait_ms: float, reply_ms: float,
                engine_busy_in_handoff: bool) -> Any:
    """Raw records of `count` streamed requests, one after another, as the profiler writes them for a
    `vllm serve` run (API server: httpExchange, httpReq, tokens, httpRes; EngineCore: enqueue, steps).
    Request i arrives over HTTP at 100*i ms, is handed to the engine after `preprocess_ms`, accepted by
    the scheduler `handoff_wait_ms` later (during another request's step when `engine_busy_in_handoff`),
    prefilled in a 5 ms step that yields its only token, and its last byte is written `reply_ms` after
    the API server has that token."""
    from service_profiler.rawdata.rawfile import EventRecord, ProcessInfo, RunData, SpanRecord

    def proc(index: int, role: str) -> ProcessInfo:
        return ProcessInfo(index=index, key=f"h:{index}", hostname="h", pid=100 + index, ppid=1, role=role,
                           argv=[], engine=None, profiler_version="t", wall_offset_ns=0)

    run = RunData(processes=[proc(0, "api"), proc(1, "engine")])
    events: list[Any] = []
    spans: list[Any] = []

    def step(batch_id: int, start_ms: float, reqs: list[list[Any]], duration_ms: float = 5.0) -> None:
        lo, hi = T0 + int(start_ms * MS), T0 + int((start_ms + duration_ms) * MS)
        spans.extend([
            SpanRecord(1, "BatchSchedule", "batchFrameworkProcessing", lo, lo + MS // 10, 2,
                       {"batch_id": batch_id, "reqs": reqs, "running": len(reqs), "waiting": 0}),
            SpanRecord(1, "EngineCore", "step", lo, hi, 2, {"batch_id": batch_id}),
            SpanRecord(1, "ModelExecute", "modelExec", lo + MS // 10, hi - MS // 10, 2, {"batch_id": batch_id}),
            SpanRecord(1, "BatchSchedule", "updateFromOutput", hi - MS // 10, hi, 2,
                       {"batch_id": batch_id, "finished": [r[0] for r in reqs if r[1] == 0]})])

    for i in range(count):
        rid, at = f"r{i}", 100.0 * i
        handoff = at + preprocess_ms
        accepted = handoff + handoff_wait_ms
        if engine_busy_in_handoff:  # a long step of some other request holds the engine meanwhile
            step(2 * i + 1, handoff, [[f"other{i}", 1, 1, 64, 8, 0]], duration_ms=handoff_wait_ms)
        step(2 * i, accepted, [[rid, 0, 8, 0, 8, 0]])
        api_token = accepted + 5.5
        last = api_token + reply_ms
        offsets = {"body_received": MS // 2, "response_start": int((api_token + 0.2 - at) * MS),
                   "first_body": int((api_token + 0.2 - at) * MS), "last_body": int((last - at) * MS),
                   "end": int((last - at) * MS) + MS // 10}
        for p, domain, name, ms, attrs in [
            (0, "Request", "httpExchange", at, {"rids": [rid], "arrival_source": "kernel", "status": 200,
                                                **offsets}),
            (0, "Request", "httpReq", handoff, {"rid": rid, "api_rid": f"cmpl-{i}", "prompt_tokens": 8,
                                                "stream": True, "arrival_time": (T0 + handoff * MS) / 1e9}),
            (1, "Request", "enqueue", accepted, {"rid": rid, "prompt_tokens": 8}),
            (0, "Request", "tokens", api_token, {"reqs": [[rid, 1, 1, "length"]]}),
            (0, "Request", "httpRes", api_token + 0.1, {"rid": rid, "output_tokens": 1, "finish_reason": "length"}),
        ]:
            events.append(EventRecord(p, domain, name, T0 + int(ms * MS), 1, attrs))
    run.events = sorted(events, key=lambda e: e.ts_ns)
    run.spans = sorted(spans, key=lambda s: s.start_ns)
    return run


def _signals(run: Any) -> dict[str, Any]:
    """The diagnosis's signals on the rows `analyze` makes of `run` (written as raw files, read back)."""
    import tempfile

    from raw_files import write_run

    from service_profiler.columnar.rows import load_rows
    from service_profiler.diagnose.rules import window_signals

    with tempfile.TemporaryDirectory() as tmp:
        rows = load_rows(write_run(run, Path(tmp)))
    served = [r for r in rows.requests if not str(r["rid"]).startswith("other")]
    assert served and all(r["arrival_source"] == "http" and r["complete"] == 1 for r in served)
    return window_signals(rows.batches, rows.requests, {"max_num_seqs": 8}, None)


def test_a_slow_front_end_is_measured_from_the_http_columns_and_named() -> None:
    # 40 ms of preprocessing and 10 ms writing the reply around a 5 ms engine step: front-end-bound.
    s = _signals(_served_run(8, preprocess_ms=40.0, handoff_wait_ms=1.0, reply_ms=10.0,
                             engine_busy_in_handoff=False))
    assert s["front_end_requests"] == 8
    assert s["front_end_before_ms_p50"] == pytest.approx(41.0, abs=0.01)  # HTTP arrival -> scheduler accepts
    assert s["front_end_after_ms_p50"] == pytest.approx(0.5 + 10.0, abs=0.01)  # engine -> API, API -> last byte
    assert s["front_end_share_p50"] == pytest.approx(51.5 / 56.5, abs=0.01)
    (verdict,) = [v for v in classify(s) if v["kind"] == "front-end-bound"]
    assert verdict["evidence"]["front_end_columns"][0] == "http_arrival_ns"
    assert "engine_arrival_ns - http_arrival_ns" in verdict["evidence"]["front_end_basis"]


def test_waiting_for_a_running_engine_step_is_not_front_end_time() -> None:
    # The same 41 ms before the engine accepts the request, but 40 of them after the hand-off while an
    # engine step ran: the engine's time, not the front end's.
    s = _signals(_served_run(8, preprocess_ms=1.0, handoff_wait_ms=40.0, reply_ms=0.5,
                             engine_busy_in_handoff=True))
    assert s["front_end_before_ms_p50"] == pytest.approx(1.0, abs=0.01)
    assert "front-end-bound" not in [v["kind"] for v in classify(s)]
    # the same wait with an idle engine (the hand-off itself is slow) is the front end's
    s = _signals(_served_run(8, preprocess_ms=1.0, handoff_wait_ms=40.0, reply_ms=0.5,
                             engine_busy_in_handoff=False))
    assert s["front_end_before_ms_p50"] == pytest.approx(41.0, abs=0.01)
    assert "front-end-bound" in [v["kind"] for v in classify(s)]


def test_front_end_time_below_two_steps_is_not_a_verdict() -> None:
    # 2 + 0.5 + 0.5 ms outside a 5 ms step: a large share of a short request, but under two steps
    s = _signals(_served_run(8, preprocess_ms=2.0, handoff_wait_ms=0.0, reply_ms=0.5, engine_busy_in_handoff=False))
    assert s["front_end_share_p50"] >= THRESHOLDS["front_end_share"]
    assert s["front_end_ms_p50"] < THRESHOLDS["front_end_steps"] * s["step_ms_p50"]
    assert "front-end-bound" not in [v["kind"] for v in classify(s)]


REAL_RUN = Path(__file__).parent / "data" / "vllm_cpu_run_40req"


def test_a_run_without_http_timings_says_front_end_is_not_measured(tmp_path: Path) -> None:
    # A real vLLM run captured before the API server's HTTP timings were recorded: the columns are there
    # but empty, and the diagnosis says so instead of guessing from other columns.
    doc = diagnose(load_run(REAL_RUN))
    s = doc["signals"]
    assert s["requests"] == 40 and s["front_end_requests"] == 0 and s["front_end_share_p50"] is None
    assert "front-end-bound" not in [v["kind"] for v in doc["verdicts"]]
    assert any("http_arrival_ns empty" in n and "not assessed" in n for n in doc["notes"])
    # request.csv written before the columns existed: said so as well
    view = load_run(REAL_RUN)
    old = [{k: v for k, v in r.items() if not k.startswith(("http_", "last_byte", "first_token_sent"))}
           for r in view.requests]
    view.requests = old
    assert any("no HTTP timing columns" in n for n in diagnose(view)["notes"])


def test_the_figure_replaces_a_planted_link_and_never_writes_through_it(tmp_path: Path) -> None:
    from service_profiler.diagnose.figure import write_figure

    victim = tmp_path / "victim.txt"
    victim.write_text("keep\n")
    path = tmp_path / "vllm_performance_analysis.png"
    path.symlink_to(victim)
    batches = [{"start_ns": i * 10_000_000, "step_ms": 9.0, "model_run_ms": 8.0, "batch_size": 4, "waiting": i % 3,
                "kv_usage": 0.5, "total_scheduled_tokens": 40} for i in range(50)]
    doc = {"signals": {"max_num_seqs": 8, "max_num_batched_tokens": 256}, "thresholds": THRESHOLDS,
           "verdicts": [], "phases": [{"start_s": 0.2}]}
    assert write_figure(batches, doc, path) == path
    assert victim.read_text() == "keep\n"
    assert not path.is_symlink() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
