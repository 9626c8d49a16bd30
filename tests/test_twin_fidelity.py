"""The twin on a held-out configuration, on the real vLLM CPU engine: the test suite's smaller version of
`benchmarks/bench_twin.py`.

A base configuration is captured under the profiler, served as `vllm serve` serves it (AsyncLLM, the
EngineCore in its own process), and the twin predicts a target configuration (prompts cut into 16-token
prefill chunks: several steps per prompt instead of one) from that capture. The target then runs for
real on the same workload. The runs alternate, base then target, twice, so that each prediction is
checked against the target run next to its capture: this shared machine's speed drifts by tens of
percent from one minute to the next. The prediction (the mean of the two) must lie within 10 % of the
real runs' mean, or within their spread where the machine makes that larger: the larger relative range
of the two identical base runs and the two identical target runs."""

from __future__ import annotations

from pathlib import Path
from statistics import fmean
from typing import Any

import pytest
from twin_engine_run import capture, workload

from service_profiler.twin import Twin

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

BASE: dict[str, Any] = {"max_num_seqs": 8, "max_num_batched_tokens": 256, "async_scheduling": False,
                        "enable_prefix_caching": True, "max_model_len": 1024, "block_size": 32}
TARGET: dict[str, Any] = {"long_prefill_token_threshold": 16}
KEYS = ("ttft_ms_p50", "tpot_ms_p50", "output_throughput_tok_s")
BOUND = 0.10
# The range of two runs understates that of the benchmark's three (the expected range of two normal
# samples is 1.13 standard deviations, of three 1.69): scaled to the three-run spread the issue means.
TWO_TO_THREE_RUNS = 1.69 / 1.13


def _measured(analysis: Path) -> dict[str, float]:
    metrics = Twin.from_run(analysis).captured_metrics
    assert metrics is not None
    return {key: float(metrics[key]) for key in KEYS}


def _spread(a: float, b: float) -> float:
    return TWO_TO_THREE_RUNS * abs(a - b) / min(a, b)


def test_a_held_out_configuration_is_predicted_within_10_percent_or_the_run_to_run_spread(
        tiny_model: Path, tmp_path: Path) -> None:
    requests = workload(120, 20.0, shared_prefix=128)
    bases, targets = [], []
    for i in (1, 2):
        bases.append(capture(tiny_model, tmp_path / f"base-{i}", requests, BASE, served=True))
        targets.append(capture(tiny_model, tmp_path / f"target-{i}", requests, {**BASE, **TARGET}, served=True))

    twins = [Twin.from_run(base) for base in bases]
    predicted = [twin.run(TARGET).metrics for twin in twins]
    # The twin sees the change: more prefill steps per prompt delay the first token, from either capture.
    for twin, target in zip(twins, predicted, strict=True):
        assert target["ttft_ms_p50"] > twin.run({}).metrics["ttft_ms_p50"]

    base_runs = [_measured(base) for base in bases]
    target_runs = [_measured(target) for target in targets]
    for key in KEYS:
        real = fmean(run[key] for run in target_runs)
        prediction = fmean(float(p[key]) for p in predicted)
        spread = max(_spread(base_runs[0][key], base_runs[1][key]), _spread(target_runs[0][key], target_runs[1][key]))
        error = abs(prediction - real) / real
        each = ", ".join(f"{float(p[key]):.3f}" for p in predicted)
        print(f"{key}: twin {prediction:.3f} ({each}), real {real:.3f} "  # shown with pytest -s
              f"({', '.join(f'{run[key]:.3f}' for run in target_runs)}), error {error:.1%}, spread {spread:.1%}")
        assert error <= max(BOUND, spread), (
            f"{key}: twin {prediction:.3f} (from each capture: {each}), "
            f"real {real:.3f} ({', '.join(f'{run[key]:.3f}' for run in target_runs)}), error {error:.1%}; "
            f"identical base runs {base_runs[0][key]:.3f} and {base_runs[1][key]:.3f}, spread {spread:.1%}")
