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
