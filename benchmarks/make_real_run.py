"""A real profiled run to measure `analyze` on: `vllm serve` (vLLM's CPU build, the tiny local model) under
the profiler (shipped YAML), N streamed requests of 64 output tokens at concurrency C.

    python benchmarks/make_real_run.py OUT [--requests 1000] [--concurrency 32] [--max-num-seqs 32]

Prints the run directory (OUT/prof/<run>) when done.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

from vllm_service import run_workload, running_server  # noqa: E402

from service_profiler.workload.tiny_model import make_model  # noqa: E402

PROMPTS = ["The quick brown fox jumps over the lazy dog and then", "Write a short story about a robot who",
           "List five facts about the ocean:", "Explain why the sky looks blue on a clear day"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--model-dir", type=Path, default=ROOT / ".cache" / "tiny-llama")
    args = parser.parse_args()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=False)
    model = make_model(args.model_dir.resolve())
    config = out / "ms_service_profiler_config.json"
    config.write_text(json.dumps({"enable": 1, "prof_dir": str(out / "prof")}))
    env = {"SERVICE_PROF_CONFIG_PATH": str(config), "PROFILING_SYMBOLS_PATH": str(out / "symbols.yaml")}
    requests = [(PROMPTS[i % len(PROMPTS)], 64, True, None) for i in range(args.requests)]
    with running_server(model, out / "server.log", profiler_env=env,
                        extra_args=["--max-num-seqs", str(args.max_num_seqs)]) as server:
        started = time.monotonic()
        results = run_workload(server, requests, args.concurrency)
        print(f"{len(results)} requests in {time.monotonic() - started:.1f} s", flush=True)
        time.sleep(1.5)  # every process flushes its last second
    print(sorted((out / "prof").iterdir())[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
