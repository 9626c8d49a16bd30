"""The twin against a real vLLM CPU run (tiny model, synchronous scheduling) captured under the shipped
symbols: with the run's own step durations it must make the same batches, step by step, and the same
preemptions; the capture has prefix-cache hits (half the prompts share 128 tokens) and preemptions (a
KV pool of 39 usable blocks of 32 tokens for up to 8 requests of up to 16 blocks; the arrivals come
fast enough that the pool fills however fast the machine runs the steps)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from twin_engine_run import capture, workload

from service_profiler.twin import Twin

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ENGINE = {"max_num_seqs": 8, "max_num_batched_tokens": 256, "async_scheduling": False, "enable_prefix_caching": True,
          "max_model_len": 1024, "block_size": 32, "num_gpu_blocks_override": 40}


@pytest.fixture(scope="module")
def captured_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    requests = workload(60, 50.0, shared_prefix=128, output_range=(32, 160))
    return capture(tiny_model, tmp_path_factory.mktemp("twin-run"), requests, ENGINE)


def _compositions(rows: list[dict[str, object]]) -> list[list[tuple[str, int]]]:
    return [sorted((r[0], r[2]) for r in json.loads(str(b["res_list"]))) for b in rows]


def test_capture_has_what_the_twin_needs(captured_run: Path) -> None:
    twin = Twin.from_run(captured_run)
    assert twin.notes == []  # settings, hashes and API timings all captured
    assert twin.base_settings["pool_blocks"] == 40 and twin.base_settings["scheduler_class"] == "Scheduler"
    assert all(r.block_hashes is not None for r in twin.requests)
    truth = twin.captured.truth if twin.captured else []
    assert sum(int(r["prefix_hit_tokens"]) for r in truth) > 0
    assert sum(s.num_preempted for s in twin.captured.steps) > 0 if twin.captured else False


def test_measured_replay_reproduces_every_batch_and_preemption(captured_run: Path) -> None:
    twin = Twin.from_run(captured_run)
    assert twin.captured is not None
    prediction = twin.run([], step_times="measured")
    real = [sorted(s.composition) for s in twin.captured.steps]
    replayed = _compositions(prediction.batches)
    same = sum(1 for a, b in zip(real, replayed, strict=False) if a == b)
    assert same >= 0.99 * len(real), f"{same} of {len(real)} steps match"
    assert len(replayed) == len(real)
    # The same steps in the same order: the same token counts miss the engine's kernel cache.
    assert prediction.result is not None
    assert [s.features.new_shape for s in prediction.result.steps] == [int(s.new_shape) for s in twin.captured.steps]
    assert sum(s.new_shape for s in twin.captured.steps) > 0
    assert prediction.metrics["preemptions"] == sum(s.num_preempted for s in twin.captured.steps)
    hits = {r.get("rid"): int(r["prefix_hit_tokens"]) for r in twin.captured.truth}
    assert {r["rid"]: r["prefix_hit_tokens"] for r in prediction.requests} == hits
    captured = twin.captured_metrics or {}
    for key in ("ttft_ms_p50", "tpot_ms_p50", "e2e_ms_p50", "output_throughput_tok_s"):
        assert prediction.metrics[key] == pytest.approx(captured[key], rel=0.02), key
    # Request by request: the first token counts from the end of the step's update, as captured, not
    # from the next step's start (the engine loop's own work in between would add to every TTFT).
    real_ttft = {r["rid"]: float(r["ttft_ms"]) for r in twin.captured.truth if r.get("ttft_ms")}
    replayed_ttft = {r["rid"]: r["ttft_ms"] for r in prediction.requests if r["rid"] in real_ttft}
    off = [rid for rid, ms in replayed_ttft.items() if abs(ms - real_ttft[rid]) > 0.01]
    assert len(replayed_ttft) == len(real_ttft) and off == [], off


def test_model_replay_is_deterministic_and_says_which_model(captured_run: Path, tmp_path: Path) -> None:
    for sub in ("a", "b"):
        proc = subprocess.run([sys.executable, "-m", "service_profiler.cli", "twin", "--run", str(captured_run),
                               "--engine-args", "--max-num-seqs 4", "--output-path", str(tmp_path / sub)],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("request.csv", "batch.csv", "prediction.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    doc = json.loads((tmp_path / "a" / "prediction.json").read_text())
    assert doc["step_times"] in ("v2", "tbs") and doc["settings"]["max_num_seqs"] == 4
    header = (tmp_path / "a" / "request.csv").read_text().splitlines()[0].split(",")
    analyzed = (captured_run / "request.csv").read_text().splitlines()[0].split(",")
    assert [c for c in analyzed if c not in header] == []
    assert "ttft_ms_p50" in proc.stdout and "captured" in proc.stdout
