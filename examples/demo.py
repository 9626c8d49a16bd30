"""The main job end to end, on the embedded default: a tiny Llama made locally, served by vLLM's CPU
build under service-profiler with the shipped symbols, a short mixed workload, then `analyze`.

    python examples/demo.py [--out demo-run] [--requests 24] [--concurrency 6]

What it does is exactly what a user does:
    export SERVICE_PROF_CONFIG_PATH=<out>/ms_service_profiler_config.json   (collection on)
    export PROFILING_SYMBOLS_PATH=<out>/service_profiling_symbols.yaml      (created from the shipped default)
    vllm serve <model>            # here: python -m vllm.entrypoints.openai.api_server
    ... requests ...
    service-profiler analyze --input-path <run dir> --output-path <out>/analysis
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from tiny_model import make_model
from vllm_service import PROMPTS, run_workload, running_server


def workload(requests: int) -> list[tuple[str, int, bool, int | None]]:
    """Mixed prompt lengths and output lengths; every third request streams."""
    return [(PROMPTS[i % len(PROMPTS)], 8 + (i * 7) % 40, i % 3 == 0, None) for i in range(requests)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo-run"))
    parser.add_argument("--model-dir", type=Path, default=Path(".cache/tiny-llama"))
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=6)
    args = parser.parse_args()

    out: Path = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model = make_model(args.model_dir.resolve())
    config = out / "ms_service_profiler_config.json"
    config.write_text(json.dumps({"enable": 1, "prof_dir": str(out / "prof"), "host_system_usage_freq": 5,
                                  "console_every_n_steps": 50}, indent=2))
    env = {"SERVICE_PROF_CONFIG_PATH": str(config),
           "PROFILING_SYMBOLS_PATH": str(out / "service_profiling_symbols.yaml")}

    print(f"serving {model} under service-profiler (log: {out / 'server.log'}) ...", flush=True)
    started = time.monotonic()
    with running_server(model, out / "server.log", profiler_env=env, extra_args=["--max-num-seqs", "4"]) as server:
        print(f"server up in {time.monotonic() - started:.0f}s; sending {args.requests} requests", flush=True)
        results = run_workload(server, workload(args.requests), args.concurrency)
        time.sleep(1.5)  # let every process flush its last second of records
    ttfts = sorted(r.ttft_ms for r in results if r.ttft_ms is not None)
    print(f"client: {len(results)} completions, {sum(r.completion_tokens for r in results)} tokens"
          + (f", streaming TTFT p50 {ttfts[len(ttfts) // 2]:.1f} ms" if ttfts else ""))

    run_dirs = sorted((out / "prof").iterdir())
    run_dir = run_dirs[-1]
    print(f"run directory: {run_dir}")
    analysis = out / "analysis"
    cli = [sys.executable, "-m", "service_profiler.cli"]
    subprocess.run([*cli, "inspect", str(run_dir)], check=True)
    subprocess.run([*cli, "analyze", "--input-path", str(run_dir), "--output-path", str(analysis)], check=True)
    print(f"\noutputs in {analysis}:")
    for path in sorted(analysis.iterdir()):
        print(f"  {path.name:<36} {path.stat().st_size:>10,} bytes")
    print("\nopen chrome_tracing.json in https://ui.perfetto.dev (or MindStudio Insight)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
