"""The profiler's share of the engine's busy time, sampled with py-spy inside vLLM's offline engine.

    python benchmarks/bench_engine_share.py [--repeats 3] [--seconds 15] [--runs 1] [--compare DIR]
                                           [--requests 300] [--max-tokens 8] [--max-num-seqs 16]
                                           [--omp-threads 1] [--nonblocking] [--top 12] [--keep DIR]
                                           [--collection-off]

One process: `vllm.LLM` on the tiny CPU model with the EngineCore in the same process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`), the shipped YAML, collection on. After a warm-up the driver
generates `--requests` requests with `--max-tokens` output tokens each (many small steps), over and over,
while py-spy attaches `--repeats` times for `--seconds` each (raw format, CPU-busy samples only, all
Python threads of the process). Torch runs on `--omp-threads` unbound OpenMP threads (default 1): on a
shared 2-core machine, OpenMP threads bound to every core spin against other work and stretch a step of
the tiny model from ~3 ms to ~15 ms, which hides the profiler's per-step cost. Steps of a few ms are the
worst case for a profiler, whose cost per step and per request is fixed.

Every sample is charged to the profiler or to the engine as `benchmarks/pyspy_share.py` says (the
innermost profiler frame is the leaf, or calls something other than the wrapped original; a probe that is
the leaf on its call of the original is the engine's: the original's locals being freed), and split by
thread: the engine's thread (the main thread: scheduler, model, output processing, and the probes and
handlers that run on it), the profiler's writer thread (encoding and writing records; it holds the GIL
the engine needs while it encodes), and any other thread. The figures are shares of all busy samples
of the process, so the three add up to the total; a share is a ratio within one run, far less sensitive
to the machine's load than a throughput comparison between runs. Then, per thread, the profiler frames
that took the most samples. Beside it, the writer thread's CPU time over the process's (from /proc):
it does not count the time the writer waits, runnable, for a core, which py-spy counts as busy. The
total under the earlier rule (a probe's frame that is the leaf is always the profiler's) is printed too.

py-spy cannot charge the garbage collector to the profiler: a collection runs inside whichever allocation
trips it, mostly the engine's. Yet records kept alive in the buffer make the engine's young collections
more frequent and longer. So the driver times every collection (`gc.callbacks`) and the benchmark reports
the collector's share of the process's CPU time per window, beside the throughput (`generate()` rounds
per second); `--collection-off` adds runs with collection off, alternating, for both figures without
the profiler's records.

`--compare DIR` measures a second version in the same sitting: the driver imports `service_profiler`
from DIR (PYTHONPATH) instead of the installed one, and `--runs` engine runs of each alternate, so that
the machine's load hits both alike. To compare with another commit:

    git archive <commit> service_profiler | tar -x -C /tmp/base
    cp .venv/lib/python3.*/site-packages/service_profiler/runtime/_speedups*.so /tmp/base/service_profiler/runtime/

py-spy: `pip install py-spy`; it attaches to the driver with ptrace (the driver is our own child). Where
ptrace is refused, run py-spy as the driver's parent instead (`py-spy record -- python ...`). Samples
are taken with the process stopped (py-spy's default); `--nonblocking` reads the stacks while it runs,
which disturbs it less but tears some stacks: frames pushed and popped often (the probes' wrappers) then
get extra samples.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))

from pyspy_share import Sample, hot_profiler_frames, original_call_lines, share_by
from tiny_model import make_model
from vllm_service import PROMPTS

_DRIVER = r"""
import gc, json, os, sys, time
# Garbage collection runs inside whichever allocation trips it, mostly the engine's: py-spy charges it
# to the engine. Its time is counted here instead, and written after every round with the process's
# CPU time, so that each window can report the collector's share.
collecting = [0.0, 0.0]
def _gc_timer(phase, info):
    if phase == "start":
        collecting[1] = time.perf_counter()
    else:
        collecting[0] += time.perf_counter() - collecting[1]
gc.callbacks.append(_gc_timer)
from vllm import LLM, SamplingParams
spec = json.loads(sys.argv[1])
llm = LLM(model=spec["model"], max_model_len=512, dtype="bfloat16", seed=0, enforce_eager=True,
          max_num_seqs=spec["max_num_seqs"])
prompts = [spec["prompts"][i % len(spec["prompts"])] for i in range(spec["requests"])]
params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0, ignore_eos=True)
llm.generate(prompts[:16], params, use_tqdm=False)
print("READY", flush=True)
rounds = 0
while not os.path.exists(spec["stop"]):
    llm.generate(prompts, params, use_tqdm=False)
    rounds += 1
    with open(spec["progress"] + ".new", "w") as f:
        json.dump({"rounds": rounds, "gc_s": collecting[0], "cpu_s": time.process_time(),
                   "wall_s": time.perf_counter()}, f)
    os.replace(spec["progress"] + ".new", spec["progress"])
print(f"ROUNDS {rounds}", flush=True)
"""

ENGINE, WRITER, OTHER = "engine thread", "writer thread", "other threads"
_TICKS = os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds so far per kernel thread name of a process (the profiler's threads are sprof-*)."""
    usage: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = "main" if int(tid) == pid else f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # a thread that ended meanwhile
            continue
        usage[name] = usage.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / _TICKS
    return usage


def thread_role(engine_tid: str) -> object:
    def role(sample: Sample) -> str:
        if sample.thread_id == engine_tid:
            return ENGINE
        if any(frame.startswith("Recorder._run (") for frame in sample.frames):
            return WRITER
        return OTHER
    return role


def _wait_for(log: Path, marker: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if marker in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise RuntimeError(f"the driver did not print {marker}:\n{log.read_text(errors='replace')[-4000:]}")


def _progress(path: Path, after: dict[str, float] | None = None, timeout_s: float = 120) -> dict[str, float]:
    """The driver's latest end-of-round figures; with `after`, the first ones of a later round."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            found: dict[str, float] = json.loads(path.read_text())
            if after is None or found["rounds"] > after["rounds"]:
                return found
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    raise RuntimeError(f"the driver wrote no progress to {path} for {timeout_s} s")


def measure(args: argparse.Namespace, workdir: Path, source: str | None = None, enable: int = 1
            ) -> list[tuple[Path, str]]:
    """Run the driver and sample it `--repeats` times; the raw files and the engine thread's id.
    `source`: a tree whose `service_profiler` the driver imports instead of the installed one;
    `enable` 0: collection off (the runtime is loaded, nothing is wrapped)."""
    model = make_model(Path(args.model_cache))
    config, prof_dir, stop = workdir / "config.json", workdir / "prof", workdir / "stop"
    config.write_text(json.dumps({"enable": enable, "prof_dir": str(prof_dir)}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SERVICE_PROF_", "VLLM_SCHEDULER_"))
           and k != "PROFILING_SYMBOLS_PATH"}
    env.update({"SERVICE_PROF_CONFIG_PATH": str(config), "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"})
    if args.omp_threads:
        env.update({"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(args.omp_threads)})
    if source:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [source, env.get("PYTHONPATH")]))
    spec = {"model": str(model), "prompts": PROMPTS, "requests": args.requests, "max_tokens": args.max_tokens,
            "max_num_seqs": args.max_num_seqs, "stop": str(stop), "progress": str(workdir / "progress.json")}
    log = workdir / "driver.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", _DRIVER, json.dumps(spec)], cwd=workdir, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    raws: list[tuple[Path, str]] = []
    try:
        _wait_for(log, "READY", proc, 600)
        for repeat in range(args.repeats):
            raw = workdir / f"py-spy-{repeat}.txt"
            cpu_before = thread_cpu_seconds(proc.pid)
            progress_before = _progress(workdir / "progress.json")
            command = [args.py_spy, "record", "--threads", "-p", str(proc.pid), "-d", str(args.seconds),
                       "-r", str(args.rate), "-f", "raw", "-o", str(raw)]
            if args.nonblocking:
                command.append("--nonblocking")
            if args.native:
                command.append("--native")
            subprocess.run(command, check=True, capture_output=True, timeout=args.seconds + 60)
            cpu = {name: seconds - cpu_before.get(name, 0.0) for name, seconds in thread_cpu_seconds(proc.pid).items()}
            (workdir / f"cpu-{repeat}.json").write_text(json.dumps(cpu))
            progress_after = _progress(workdir / "progress.json", after=progress_before)
            (workdir / f"gc-{repeat}.json").write_text(json.dumps(
                {key: progress_after[key] - progress_before[key] for key in progress_after}))
            raws.append((raw, str(proc.pid)))
        stop.touch()
        _wait_for(log, "ROUNDS", proc, 300)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    files = list(prof_dir.rglob("*.sprof.jsonl"))
    if enable and (not files or not any('"t":"rec"' in f.read_text(errors="replace") for f in files)):
        raise RuntimeError(f"collection recorded nothing under {prof_dir}: the figures would mean nothing")
    if args.keep:
        shutil.copytree(workdir, Path(args.keep) / f"run-{time.strftime('%H%M%S')}", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("stop"))
    return raws


def _spread(values: list[float]) -> str:
    return f"median {statistics.median(values):5.2f} %  range {min(values):5.2f} .. {max(values):5.2f} %"


def package_dir(source: str | None) -> Path:
    """The service_profiler package a version runs: the installed one, or the one under `source`."""
    if source is None:
        import service_profiler
        return Path(service_profiler.__file__).parent
    return Path(source) / "service_profiler"


def report(raws: list[tuple[Path, str]], top: int, original_calls: frozenset[str]) -> dict[str, list[float]]:
    totals: dict[str, list[float]] = {ENGINE: [], WRITER: [], OTHER: [], "total": [], "total, earlier rule": []}
    engine_own: list[float] = []
    writer_cpu: list[float] = []
    collector: list[float] = []
    throughput: list[float] = []
    for raw, engine_tid in raws:
        share = share_by(raw, thread_role(engine_tid), original_calls)  # type: ignore[arg-type]
        for group in (ENGINE, WRITER, OTHER):
            totals[group].append(share.percent_of_all(group))
        totals["total"].append(sum(share.profiler.values()) * 100 / max(1, share.all_samples))
        earlier = share_by(raw, thread_role(engine_tid))  # type: ignore[arg-type]
        totals["total, earlier rule"].append(sum(earlier.profiler.values()) * 100 / max(1, earlier.all_samples))
        engine_own.append(share.percent(ENGINE))
        cpu = json.loads((raw.parent / raw.name.replace("py-spy-", "cpu-").replace(".txt", ".json")).read_text())
        writer_cpu.append(100 * cpu.get("sprof-writer", 0.0) / max(1e-9, sum(cpu.values())))
        window = json.loads((raw.parent / raw.name.replace("py-spy-", "gc-").replace(".txt", ".json")).read_text())
        collector.append(100 * window["gc_s"] / max(1e-9, window["cpu_s"]))
        throughput.append(window["rounds"] / max(1e-9, window["wall_s"]))
        print(f"{raw.name}: {share.all_samples} busy samples ({share.total[ENGINE]} engine thread, "
              f"{share.total[WRITER]} writer, {share.total[OTHER]} other); profiler: "
              + ", ".join(f"{group} {share.percent_of_all(group):.2f} %" for group in (ENGINE, WRITER, OTHER))
              + f", total {totals['total'][-1]:.2f} %")
    print(f"\nprofiler's share of all busy samples, {len(raws)} repeats (target <= 3 % in total):")
    for group, values in totals.items():
        print(f"  {group:<15} {_spread(values)}")
    print(f"  (of the engine thread's own samples: {_spread(engine_own)})")
    print(f"  writer thread's CPU time / the process's CPU time (from /proc): {_spread(writer_cpu)}")
    print(f"  garbage collection / the process's CPU time (the driver's gc callbacks): {_spread(collector)}")
    rates = f"median {statistics.median(throughput):.3f}  range {min(throughput):.3f} .. {max(throughput):.3f}"
    print(f"  generate() rounds per second (throughput; noisy between runs): {rates}")
    totals["writer CPU (/proc)"] = writer_cpu
    totals["garbage collection"] = collector
    if top <= 0:
        return totals
    merged: dict[str, dict[str, int]] = {}
    for raw, engine_tid in raws:
        for group, frames in hot_profiler_frames(raw, thread_role(engine_tid), top * 3,  # type: ignore[arg-type]
                                                 original_calls).items():
            for frame, count in frames:
                merged.setdefault(group, {})[frame] = merged.setdefault(group, {}).get(frame, 0) + count
    for group, frames in merged.items():
        print(f"\nwhere the profiler's samples go, {group} (innermost profiler frame <- leaf), all repeats:")
        for frame, count in sorted(frames.items(), key=lambda item: -item[1])[:top]:
            print(f"  {count:6}  {frame[:150]}")
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="py-spy windows (default 3)")
    parser.add_argument("--seconds", type=int, default=15, help="length of each window")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--requests", type=int, default=300, help="requests per generate() call")
    parser.add_argument("--max-tokens", type=int, default=8, help="output tokens per request")
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--omp-threads", type=int, default=1,
                        help="torch's OpenMP threads, unbound (0: vLLM's own binding to every core)")
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"))
    parser.add_argument("--nonblocking", action="store_true",
                        help="sample without stopping the process (cheaper, but stacks read mid-call can be "
                             "torn: transient wrapper frames get extra samples)")
    parser.add_argument("--native", action="store_true",
                        help="native frames too (shows where C time goes, e.g. the garbage collector)")
    parser.add_argument("--top", type=int, default=12, help="profiler frames listed per thread")
    parser.add_argument("--model-cache", default=str(Path(tempfile.gettempdir()) / "sp-bench-tiny-model"))
    parser.add_argument("--keep", metavar="DIR", help="copy the raw py-spy files and the run here")
    parser.add_argument("--compare", metavar="DIR",
                        help="A/B in one sitting: also run the service_profiler found in DIR (e.g. `git archive` "
                             "of another commit, with the built _speedups module copied in), alternating")
    parser.add_argument("--runs", type=int, default=1, help="engine runs per version (alternating with --compare)")
    parser.add_argument("--collection-off", action="store_true",
                        help="also run with collection off, alternating: the garbage collector's share and the "
                             "throughput without the profiler's records")
    args = parser.parse_args()
    versions: list[tuple[str, str | None, int]] = [("installed", None, 1)]
    if args.compare:
        versions.append((args.compare, args.compare, 1))
    if args.collection_off:
        versions.append(("collection off", None, 0))
    raws: dict[str, list[tuple[Path, str]]] = {name: [] for name, _, _ in versions}
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            for number, (name, source, enable) in enumerate(versions if run % 2 == 0 else versions[::-1]):
                workdir = Path(tmp) / f"run{run}-{number}"
                workdir.mkdir()
                raws[name] += measure(args, workdir, source, enable)
        results = {}
        for name, source, _ in versions:
            print(f"\n===== {name}: {args.runs} engine run(s) x {args.repeats} windows of {args.seconds} s")
            calls = original_call_lines(package_dir(source))
            results[name] = report(raws[name], args.top if len(versions) == 1 else 0, calls)
    if len(versions) > 1:
        print("\nmedian share (range) per version:")
        for name, totals in results.items():
            print(f"  {name:<30} " + ", ".join(f"{group} {_spread(values)}" for group, values in totals.items()))


if __name__ == "__main__":
    main()
