"""Digests of the twin's outputs for a fixed set of replays, to show a change to the twin leaves its
predictions byte for byte as they were.

    python benchmarks/twin_digest.py > before.txt   # on the old code
    python benchmarks/twin_digest.py > after.txt    # on the new code
    diff before.txt after.txt                       # empty: the same predictions

Each replay writes prediction.json, request.csv and batch.csv and prints their sha256. The replays cover
synchronous and async scheduling, chunked prefill with a long-prefill threshold, prefix-cache hits from
block hashes, a KV pool small enough to preempt, front-end delays, and a parallel sweep (results that
come back from worker processes).
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path
from typing import Any

CONFIGS: dict[str, dict[str, Any]] = {
    "base": {},
    "small_batches": {"max_num_seqs": 4, "max_num_batched_tokens": 256},
    "threshold": {"long_prefill_token_threshold": 64},
    "no_prefix_caching": {"enable_prefix_caching": False},
    "preempting": {"num_gpu_blocks_override": 40},
    "async": {"async_scheduling": True},
}


def workload(n: int = 300) -> list[Any]:
    from service_profiler.twin import TraceRequest

    requests = []
    for i in range(n):
        shared = tuple(range(1, 1 + (i % 4) * 2)) if i % 3 else None  # prefixes of 0..6 shared blocks
        requests.append(TraceRequest(
            rid=f"r{i}", arrival_s=i * 0.01, prompt_tokens=40 + (i * 37) % 300, output_tokens=1 + (i * 13) % 60,
            hash_block=16 if shared else None, block_hashes=shared, engine_delay_ms=0.5 + (i % 7) * 0.1,
            reply_delay_ms=0.2 + (i % 5) * 0.05))
    return requests


def twin() -> Any:
    from service_profiler.model.step_model import StepModelV2
    from service_profiler.twin import Twin
    from service_profiler.twin.twin import StepTimeModel

    model = StepTimeModel(StepModelV2({"c_0": 2.0, "c_req": 0.05, "c_p": 0.02, "c_d": 0.01, "c_pc": 1e-6,
                                       "c_dc": 1e-5, "c_shape": 0.7}), output_lag_ns=150_000)
    settings = {"max_num_seqs": 16, "max_num_batched_tokens": 512, "max_model_len": 1024, "block_size": 16,
                "pool_blocks": 2000, "enable_prefix_caching": True, "batch_queue_size": 2}
    return Twin.from_trace(workload(), base_settings=settings, step_model=model)


def digests(prediction: Any) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        out = prediction.write(Path(tmp))
        return {name: hashlib.sha256((out / name).read_bytes()).hexdigest()
                for name in ("prediction.json", "request.csv", "batch.csv")}


def main() -> None:
    t = twin()
    for name, change in CONFIGS.items():
        for file, digest in digests(t.run(change)).items():
            print(f"{name:18} {file:16} {digest}")
    for name, prediction in t.sweep(list(CONFIGS.items()), workers=2):
        for file, digest in digests(prediction).items():
            print(f"sweep:{name:12} {file:16} {digest}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
