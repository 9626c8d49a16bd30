"""Time `service-profiler analyze` on synthetic runs.

  (a) 1,000 requests x 64 output tokens, API server + EngineCore (two process files). Target <= 1.5 s.
  (b) about 1,000,000 records (the same vLLM vocabulary and mix, more requests). Target <= 15 s and
      peak RSS <= 1 GB; time should grow linearly with records (checked against a run 1/4 the size).

Each analysis runs in a fresh interpreter (so peak RSS is the analysis alone); the time reported is
measured inside it around `command.main` (module imports included, interpreter start-up not), next to
the wall time of the whole subprocess. Per-phase times come from the analyze progress lines.

Memory: "peak RSS" is the analysis process's own ru_maxrss. analyze also runs forked helper processes
(plots, latency model; with --jobs > 1 the chrome trace and CSVs too), reported separately as the
largest child's ru_maxrss; a child's RSS counts the pages it shares with its parent, so it is not
additive. The physical total of the process tree is what `--pss` samples (summed Pss from
/proc/PID/smaps_rollup every 0.2 s; the sampling itself costs some CPU, so timings with it are a bit
slower).

    python benchmarks/bench_analyze.py [--case a b] [--format csv db json plots model] [--keep DIR]
                                       [--jobs N] [--pss] [--repeat N]

The package is imported from compiled bytecode (as from an installed wheel), even where
PYTHONDONTWRITEBYTECODE is set: the sources are compiled into their __pycache__ first.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from synthetic import SyntheticConfig  # noqa: E402

_CHILD = """
import json, os, resource, sys, threading, time
t0 = time.perf_counter()
peak_pss = [0]
sys.path.insert(0, "benchmarks")  # run with cwd = the repository root
from proctree import descendants

def sample(stop):
    while not stop.wait(0.2):
        total = 0
        for pid in descendants(os.getpid()):
            try:
                with open(f"/proc/{pid}/smaps_rollup") as f:
                    total += sum(int(ln.split()[1]) for ln in f if ln.startswith("Pss:"))
            except OSError:
                pass
        peak_pss[0] = max(peak_pss[0], total)

argv = sys.argv[1:]
stop = threading.Event()
if "--pss" in argv:
    argv.remove("--pss")
    threading.Thread(target=sample, args=(stop,), daemon=True).start()
from service_profiler.analyze.command import main
rc = main(argv)
elapsed = time.perf_counter() - t0
stop.set()
print(json.dumps({"rc": rc, "elapsed_s": elapsed,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "child_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "tree_pss_mb": peak_pss[0] / 1024}),
      file=sys.stderr)
"""

# (b): requests chosen so the run holds ~1M records with this mix (see the printed composition).
CASES = {
    "a": SyntheticConfig(requests=1000, output_tokens=64, max_num_seqs=256, arrival_rate_per_s=200.0,
                         runner_timer_spans=True),
    "b": SyntheticConfig(requests=18_000, output_tokens=64, max_num_seqs=16, arrival_rate_per_s=30.0,
                         prompt_tokens=(64, 1024), runner_timer_spans=True),
}
LINEARITY_FRACTION = 4


@dataclass
class Result:
    name: str
    records: int
    entries: int
    raw_mb: float
    elapsed_s: float
    wall_s: float
    peak_rss_mb: float
    child_rss_mb: float
    tree_pss_mb: float
    phases: list[str]


def compile_sources() -> None:
    """Compile the package's modules into their __pycache__ (git-ignored), so the timed runs import
    compiled bytecode as from an installed wheel (pip compiles it), even where PYTHONDONTWRITEBYTECODE
    is set: compiling the analyzer's modules from source costs ~60 ms a run. (Not PYTHONPYCACHEPREFIX:
    that would hide the installed packages' bytecode and make the first run compile matplotlib.)"""
    subprocess.run([sys.executable, "-m", "compileall", "-q", "service_profiler"], cwd=ROOT, check=True)


def analyze(run_dir: Path, out_dir: Path, formats: list[str], extra: list[str]
            ) -> tuple[float, float, dict[str, float], list[str]]:
    """(in-process seconds, subprocess wall seconds, memory stats MB, progress lines) of one analysis."""
    cmd = [sys.executable, "-c", _CHILD, "--input-path", str(run_dir), "--output-path", str(out_dir),
           "--format", *formats, *extra]
    shutil.rmtree(out_dir, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    lines = proc.stderr.strip().splitlines()
    try:
        stats = json.loads(lines[-1])
    except (IndexError, ValueError):
        print(proc.stdout, proc.stderr, file=sys.stderr)
        raise SystemExit(f"analyze failed (exit {proc.returncode})") from None
    mem = {k: float(stats[k]) for k in ("peak_rss_mb", "child_peak_rss_mb", "tree_pss_mb")}
    return float(stats["elapsed_s"]), wall, mem, [ln for ln in lines if ln.startswith("[analyze")]


_PREPARE = """
import json, sys
from dataclasses import asdict
from pathlib import Path
sys.path.insert(0, 'tests'); from synthetic import SyntheticConfig, generate_run
from service_profiler.rawdata.rawfile import read_run
cfg = SyntheticConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(sys.argv[1]).items()})
run_dir = Path(sys.argv[2])
generate_run(run_dir, cfg)
run = read_run([run_dir])
entries = sum(len((s.attrs or {}).get("reqs") or ()) for s in run.spans if s.name == "batchFrameworkProcessing")
entries += sum(len((e.attrs or {}).get("reqs") or ()) for e in run.events if e.name == "tokens")
print(json.dumps({"records": run.num_records, "spans": len(run.spans), "events": len(run.events),
                  "counters": len(run.counters), "entries": entries, "files": len(run.processes)}))
"""


def prepare(cfg: SyntheticConfig, run_dir: Path) -> dict[str, int]:
    """Generate the run and count it in a separate process: a child process inherits its parent's peak
    RSS (ru_maxrss survives fork and exec), so the benchmark's own process must stay small."""
    proc = subprocess.run([sys.executable, "-c", _PREPARE, json.dumps(asdict(cfg)), str(run_dir)], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    counts: dict[str, int] = json.loads(proc.stdout.strip().splitlines()[-1])
    return counts


def bench(name: str, cfg: SyntheticConfig, work: Path, formats: list[str], extra: list[str], repeat: int
          ) -> Result:
    run_dir = work / f"run_{name}"
    n = prepare(cfg, run_dir)
    raw_mb = sum(p.stat().st_size for p in run_dir.glob("*.sprof.jsonl")) / 1e6
    runs = [analyze(run_dir, work / f"out_{name}", formats, extra) for _ in range(repeat)]
    # the median run by in-process time is reported (this shared machine is noisy)
    elapsed, wall, mem, phases = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    rss = mem["peak_rss_mb"]
    trace = work / f"out_{name}" / "chrome_tracing.json"
    print(f"\n== case {name}: {cfg.requests:,} requests x {cfg.output_tokens} tokens, max_num_seqs "
          f"{cfg.max_num_seqs}, {n['files']} process files, {raw_mb:.1f} MB raw")
    print(f"   records {n['records']:,} (spans {n['spans']:,}, events {n['events']:,}, counters {n['counters']:,}); "
          f"per-request entries in batch spans + tokens events {n['entries']:,}")
    print(f"   analyze {elapsed:.2f} s in-process, {wall:.2f} s wall (with interpreter start); "
          f"peak RSS {rss:.0f} MB; {n['records'] / elapsed:,.0f} records/s")
    if repeat > 1:
        print(f"   {repeat} runs, median reported; in-process s: {' '.join(f'{r[0]:.2f}' for r in runs)}")
    print(f"   helper processes: largest peak RSS {mem['child_peak_rss_mb']:.0f} MB (shared pages included)"
          + (f"; process tree peak PSS {mem['tree_pss_mb']:.0f} MB" if mem["tree_pss_mb"] else ""))
    if trace.exists():
        print(f"   chrome_tracing.json {trace.stat().st_size / 1e6:.1f} MB")
    for line in phases:
        print(f"     {line}")
    return Result(name, n["records"], n["entries"], raw_mb, elapsed, wall, rss, mem["child_peak_rss_mb"],
                  mem["tree_pss_mb"], phases)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    parser.add_argument("--format", nargs="+", default=["csv", "json", "db", "plots", "model"])
    parser.add_argument("--keep", type=Path, help="work directory to keep (default: a temporary one)")
    parser.add_argument("--no-linearity", action="store_true", help="skip the 1/4-size run of case b")
    parser.add_argument("--jobs", type=int, default=1, help="analyze --jobs (default 1)")
    parser.add_argument("--pss", action="store_true", help="sample the process tree's total PSS")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="analyze each run N times and report the median (default 1)")
    args = parser.parse_args()
    extra = ["--jobs", str(args.jobs)] + (["--pss"] if args.pss else [])
    with tempfile.TemporaryDirectory(prefix="bench_analyze_") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        compile_sources()
        results = {name: bench(name, CASES[name], work, args.format, extra, args.repeat) for name in args.case}
        if "b" in results and not args.no_linearity:
            small_cfg = replace(CASES["b"], requests=CASES["b"].requests // LINEARITY_FRACTION)
            small, big = bench("b_quarter", small_cfg, work, args.format, extra, args.repeat), results["b"]
            per_small, per_big = small.elapsed_s / small.records, big.elapsed_s / big.records
            print(f"\nlinearity: {per_small * 1e6:.2f} us/record at 1/{LINEARITY_FRACTION} size, "
                  f"{per_big * 1e6:.2f} us/record at full size (ratio {per_big / per_small:.2f})")
        print("\ntargets: (a) <= 1.5 s; (b) <= 15 s and <= 1024 MB peak RSS")
        for name, limit_s in (("a", 1.5), ("b", 15.0)):
            if name in results:
                r = results[name]
                # measured, the process tree's physical total is what counts (helpers included)
                ok = r.elapsed_s <= limit_s and (name == "a" or max(r.peak_rss_mb, r.tree_pss_mb) <= 1024)
                tree = f", process tree PSS {r.tree_pss_mb:.0f} MB" if r.tree_pss_mb else ""
                print(f"  ({name}) {'MET' if ok else 'NOT MET'}: {r.elapsed_s:.2f} s, {r.peak_rss_mb:.0f} MB{tree} "
                      f"(formats: {' '.join(args.format)}; --jobs {args.jobs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
