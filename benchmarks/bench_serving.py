"""Serving overhead: the same workload against `vllm serve` without the profiler and with the shipped
symbols enabled; throughput and latency percentiles side by side.

    python benchmarks/bench_serving.py [--requests 64] [--concurrency 8] [--rounds 40] [--py-spy PATH]

Target (vLLM knowledge issue): <= 3 % throughput loss on the tiny CPU model, whose steps take only
milliseconds — the worst case for a profiler, since per-step probe cost is fixed.
Each configuration gets its own server; the workload runs `--rounds` times after a warm-up round and
the best round counts (noise on a shared 2-core machine only ever slows a round down).

Throughput on a shared 2-core machine moves by ±10 % between servers, so each round also reads the CPU
time every server process and thread used (/proc/PID/task/TID/stat, utime + stime) and reports it per
1,000 generated tokens: what the profiler costs in CPU, which is what it takes from a CPU-bound server.
The profiler's own threads (writer, control, samplers) carry kernel names sprof-*; the rest of its
cost runs on the engine's threads (probes and handlers).

`--py-spy PATH` (py-spy installed separately) measures that rest directly: during one more round with
collection on, py-spy samples every server process (CPU-busy samples only) and each sample is charged to
the profiler when its innermost profiler frame is the leaf or calls something other than the wrapped
original; the share of samples per process is the profiler's share of that process's CPU work.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))

from proctree import descendants
from pyspy_share import original_call_lines, profiler_share
from tiny_model import make_model
from vllm_service import PROMPTS, Completion, run_workload, running_server


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(root_pid: int) -> dict[str, float]:
    """CPU seconds so far per '<process>/<thread group>' of the server's process tree; the thread group is
    'profiler' for its sprof-* threads, else 'engine'."""
    usage: dict[str, float] = {}
    for pid in descendants(root_pid):
        try:
            with open(f"/proc/{pid}/comm") as f:
                process = f.read().strip()
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    thread = "profiler" if f.read().startswith("sprof-") else "engine"
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                key = f"{process}/{thread}"
                usage[key] = usage.get(key, 0.0) + (int(fields[11]) + int(fields[12])) / _TICKS
        except OSError:  # a thread or process that ended meanwhile
            continue
    return usage


def _round(server: object, requests: int, concurrency: int, max_tokens: int) -> dict[str, float]:
    workload = [(PROMPTS[i % len(PROMPTS)], max_tokens, False, None) for i in range(requests)]
    root_pid = server.process.pid  # type: ignore[attr-defined]
    cpu_before = _cpu_seconds(root_pid)
    start = time.perf_counter()
    results: list[Completion] = run_workload(server, workload, concurrency)  # type: ignore[arg-type]
    elapsed = time.perf_counter() - start
    cpu_after = _cpu_seconds(root_pid)
    tokens = sum(r.completion_tokens for r in results)
    latencies = [r.e2e_ms for r in results]
    row = {"tokens_per_s": tokens / elapsed, "requests_per_s": len(results) / elapsed,
           "p50_ms": statistics.median(latencies), "p99_ms": _percentile(latencies, 99)}
    for key, seconds in cpu_after.items():
        row[f"cpu:{key}"] = 1000 * (seconds - cpu_before.get(key, 0.0)) / tokens  # CPU s per 1,000 tokens
    return row


def _set_enable(config: Path, prof_dir: Path, enable: int) -> None:
    config.write_text(json.dumps({"enable": enable, "prof_dir": str(prof_dir)}))
    time.sleep(0.6)  # every process re-reads the config within ~0.25 s


def py_spy_round(server: object, args: argparse.Namespace, out: Path) -> dict[str, tuple[int, float]]:
    pid = server.process.pid  # type: ignore[attr-defined]
    workload = [(PROMPTS[i % len(PROMPTS)], args.max_tokens, False, None) for i in range(args.requests * 10)]
    client = threading.Thread(target=run_workload, args=(server, workload, args.concurrency))
    client.start()
    time.sleep(1.0)
    subprocess.run([args.py_spy, "record", "--subprocesses", "--nonblocking", "-p", str(pid), "-d", "10",
                    "-r", "250", "-f", "raw", "-o", str(out)], check=True, capture_output=True)
    client.join()
    import service_profiler
    return profiler_share(out, original_call_lines(Path(service_profiler.__file__).parent))


def measure(model: Path, workdir: Path, profiled: bool, args: argparse.Namespace
            ) -> tuple[dict[str, dict[str, float]], list[float]]:
    """Best round per configuration, and (with the profiler) the on/off throughput ratio of each pair of
    adjacent rounds in the same server: pairs run on-off, off-on, ... so that drift cancels and machine
    noise hits both halves of a pair alike."""
    env = None
    config, prof_dir = workdir / "config.json", workdir / "prof"
    if profiled:
        config.write_text(json.dumps({"enable": 1, "prof_dir": str(prof_dir)}))
        env = {"SERVICE_PROF_CONFIG_PATH": str(config),
               "PROFILING_SYMBOLS_PATH": str(workdir / "service_profiling_symbols.yaml")}
    log = workdir / ("profiled.log" if profiled else "baseline.log")
    rounds: dict[str, list[dict[str, float]]] = {}
    ratios: list[float] = []
    with running_server(model, log, profiler_env=env, extra_args=["--max-num-seqs", "8"]) as server:
        _round(server, args.concurrency, args.concurrency, args.max_tokens)  # warm-up
        for pair in range(args.rounds):
            if not profiled:
                rounds.setdefault("no profiler", []).append(
                    _round(server, args.requests, args.concurrency, args.max_tokens))
                continue
            pair_rows: dict[bool, dict[str, float]] = {}
            for enable in ((True, False) if pair % 2 == 0 else (False, True)):
                _set_enable(config, prof_dir, int(enable))
                pair_rows[enable] = _round(server, args.requests, args.concurrency, args.max_tokens)
                rounds.setdefault("shipped YAML on" if enable else "installed, off", []).append(pair_rows[enable])
            ratios.append(pair_rows[True]["tokens_per_s"] / pair_rows[False]["tokens_per_s"])
        if profiled and args.py_spy:
            _set_enable(config, prof_dir, 1)
            for name, (samples, share) in py_spy_round(server, args, workdir / "py-spy.txt").items():
                print(f"py-spy, collection on: {name:<40} {samples:6} busy samples, {share:5.2f} % in profiler code")
    return {name: max(rows, key=lambda r: r["tokens_per_s"]) for name, rows in rounds.items()}, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--py-spy", metavar="PATH", help="py-spy executable: also measure the profiler's CPU share")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=40,
                        help="rounds without the profiler; pairs of rounds (on + off) with it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = make_model(workdir / "model")
        baseline, _ = measure(model, workdir, False, args)
        profiled, ratios = measure(model, workdir, True, args)
        results = {**baseline, **profiled}
    print(f"best of {args.rounds} rounds of {args.requests} requests, concurrency {args.concurrency}")
    print(f"{'':<18}{'tokens/s':>10}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}")
    for name, row in results.items():
        print(f"{name:<18}{row['tokens_per_s']:>10.1f}{row['requests_per_s']:>8.2f}"
              f"{row['p50_ms']:>9.1f}{row['p99_ms']:>9.1f}")
    keys = sorted({k for row in results.values() for k in row if k.startswith("cpu:")})
    print("\nCPU seconds per 1,000 generated tokens (best-throughput round of each configuration)")
    print(f"{'':<34}" + "".join(f"{name:>18}" for name in results))
    for key in keys:
        print(f"{key[4:]:<34}" + "".join(f"{row.get(key, 0.0):>18.3f}" for row in results.values()))
    print(f"{'total':<34}" + "".join(f"{sum(v for k, v in row.items() if k.startswith('cpu:')):>18.3f}"
                                      for row in results.values()))
    base = results["no profiler"]["tokens_per_s"]
    for name in ("installed, off", "shipped YAML on"):
        print(f"throughput loss, {name}: {100 * (1 - results[name]['tokens_per_s'] / base):.2f} % (target <= 3 %)")
    losses = sorted(100 * (1 - r) for r in ratios)
    quartiles = statistics.quantiles(losses, n=4) if len(losses) > 1 else [losses[0]] * 3
    print(f"collection on vs off in the same server, {len(losses)} adjacent pairs: median loss "
          f"{quartiles[1]:.2f} %, interquartile range {quartiles[0]:.1f} .. {quartiles[2]:.1f} % "
          f"(pairs: {', '.join(f'{v:.1f}' for v in losses)})")


if __name__ == "__main__":
    main()
