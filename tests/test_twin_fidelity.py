"""The twin on a held-out configuration, on the real vLLM CPU engine: the test suite's smaller version of
`benchmarks/bench_twin.py --served` (one target instead of four).

A base configuration is captured under the profiler, served as `vllm serve` serves it (AsyncLLM, the
EngineCore in its own process), and the twin predicts a target configuration from that capture. The
target then runs for real on the same workload. Base and target alternate five times (B, T, B, T, ...),
and each prediction is compared with the target run next to its capture.

On this shared machine the same decode step takes 0.35 to 1.6 times as long from one run to the next, a
few minutes apart (measured over the benchmark's captures), which alone moves p50 TTFT and TPOT by more
than the 10 % bound. That is the machine, not the twin, so each run's speed is measured, and each
prediction is scaled by the target run's speed over its base capture's: the median time of the
decode-only steps of the same batch size, which the target's change (how prompts are cut into prefill
chunks) does not touch. The median of the five pairs' errors (each scaled prediction against the target
run of its pair) must lie within 10 %, or within the real target runs' spread (max - min over the
median) where that is larger. What this checks is the twin's prediction of what the target changes (more
prefill steps per prompt, steps of prefill alone, decodes sharing steps with chunks), at the machine's
speed of the moment; the unscaled error is printed beside it, and the benchmark reports it against the
spread.
"""

from __future__ import annotations

from pathlib import Path
from statistics import median
from typing import Any

import pytest
from twin_engine_run import capture, paired_errors, scaled, speed_ratio, workload

from service_profiler.twin import Twin

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

BASE: dict[str, Any] = {"max_num_seqs": 8, "max_num_batched_tokens": 256, "async_scheduling": False,
                        "enable_prefix_caching": True, "max_model_len": 1024, "block_size": 32}
# Prompts longer than 64 tokens are prefilled 64 tokens a step: several steps for most prompts instead of one.
# Not prefix caching off: caching costs the engine host time per request per step, beside its hits, so
# the decode steps that measure the machine's speed would change with the target too.
TARGET: dict[str, Any] = {"long_prefill_token_threshold": 64}
KEYS = ("ttft_ms_p50", "tpot_ms_p50", "output_throughput_tok_s")  # throughput is not scaled (`scaled`)
BOUND = 0.10
# Five, not three: the pairs' errors move with the machine's load from one pair to the next; with three, a
# CI run's median p50 TTFT error came out -14 % (pairs -9, -14, -29 %). A failure prints the twin's error
# on its own base captures and the speed ratios beside it, to tell the machine from the twin.
PAIRS = 5


def _prefill_steps(rows: list[dict[str, Any]]) -> int:
    return sum(1 for row in rows if int(row["Prefill_batch_size"]) > 0)


def test_a_held_out_configuration_is_predicted_within_10_percent(tiny_model: Path, tmp_path: Path) -> None:
    requests = workload(120, 15.0, shared_prefix=128)
    pairs = []
    for i in range(PAIRS):
        base = capture(tiny_model, tmp_path / f"base-{i}", requests, BASE, served=True)
        target = capture(tiny_model, tmp_path / f"target-{i}", requests, {**BASE, **TARGET}, served=True)
        pairs.append((Twin.from_run(base), Twin.from_run(target)))

    predictions, ratios, real, own = [], [], [], []
    for base, target in pairs:
        prediction, replay = base.run(TARGET), base.run({})
        # The twin sees the change: prompts take more prefill steps in the target.
        steps = _prefill_steps(replay.batches), _prefill_steps(prediction.batches)
        assert steps[1] > steps[0] * 1.5, f"steps with prefill tokens, base and target: {steps}"
        ratios.append(speed_ratio(base, target))
        predictions.append({key: float(prediction.metrics[key]) for key in KEYS})
        assert target.captured_metrics is not None
        real.append({key: float(target.captured_metrics[key]) for key in KEYS})
        assert base.captured_metrics is not None
        # the twin replaying its own capture: tells a failure from the machine apart from one of the change
        own.append(", ".join(f"{key} {float(replay.metrics[key]) / float(base.captured_metrics[key]) - 1:+.1%}"
                             for key in KEYS[:2]))
        print(f"pair: target run's decode steps {ratios[-1]:.3f} times as long as its base capture's")  # pytest -s

    print("the twin on its own base captures:", "; ".join(own))  # pytest -s
    failures = []
    for key in KEYS:
        runs = [run[key] for run in real]
        # each prediction against the target run of its own pair, as the design pairs them (the speed ratio
        # is a pair's too); the median of the pairs' errors is what is bounded
        errors = paired_errors(key, predictions, ratios, real)
        error = median(errors)
        raw_error = median(paired_errors(key, predictions, [1.0] * len(ratios), real))
        spread = (max(runs) - min(runs)) / median(runs)
        corrected = [scaled(key, p[key], ratio) for p, ratio in zip(predictions, ratios, strict=True)]
        line = (f"{key}: twin, scaled to each target run's speed, {', '.join(f'{v:.3f}' for v in corrected)} "
                f"(unscaled {', '.join(f'{p[key]:.3f}' for p in predictions)}); "
                f"real {', '.join(f'{r:.3f}' for r in runs)}; errors {', '.join(f'{e:+.1%}' for e in errors)}, "
                f"median {error:+.1%} (unscaled {raw_error:+.1%}); real spread {spread:.1%}")
        print(line)  # pytest -s
        if abs(error) > max(BOUND, spread):
            failures.append(line)
    assert not failures, "\n".join([*failures, "the twin on its own base captures: " + "; ".join(own),
                                     "speed ratios: " + ", ".join(f"{r:.3f}" for r in ratios)])
