"""Time and memory of `service-profiler analyze` (the DuckDB pipeline) on synthetic and real runs.

    python benchmarks/bench_columnar.py [--case 1m 10m 100m] [--real DIR ...] [--format csv db]
                                        [--repeat N] [--memory-limit 1GB] [--baseline DIR] [--work DIR] [--engines]

Cases: synthetic runs of the vLLM vocabulary and mix (max_num_seqs 16, 30 req/s,
prompts 64-1024 tokens, runner timer spans), 18,000 requests per million records; made once under
--work and reused. `--real DIR`: a profiled run directory (e.g. made with examples/demo.py).

Each analysis runs in a fresh interpreter; reported: its wall time (interpreter start included), the CPU
time of its whole process tree (user + system: on a shared, overloaded machine the steadier figure) and
the peak of the whole process tree's memory, sampled every 0.1 s from /proc: RSS summed over the tree
(pool workers included) and PSS (shared pages split, the physical total). Each figure is the median of
--repeat runs with min-max. `--baseline DIR`: the same command on another version of the package (DIR holds its
`service_profiler/`), alternated likewise.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from proctree import descendants, memory_kib  # noqa: E402

REQUESTS_PER_MILLION = 18_000

# `--engines`: the core work (read the raw files, the batch table's per-step sizes, percentiles, a CSV) in
# DuckDB and in Polars. Polars cannot decode a `rec` line's `r` (arrays of mixed types: ints and an attrs
# object), so its records are parsed by Python's json (the only way short of changing the raw format).
_ENGINE_CORE = {
    "duckdb": """
import sys, duckdb
run, out = sys.argv[1], sys.argv[2]
con = duckdb.connect(config={"memory_limit": "1GB", "temp_directory": out + ".spill"})
con.execute(f\"\"\"CREATE TABLE rec AS WITH line AS (
    SELECT filename AS file, json_transform(json, '{{"r": [["JSON"]]}}').r AS r
    FROM read_json_objects('{run}/**/*.sprof.jsonl', format='newline_delimited', filename=true, ignore_errors=true)
    WHERE starts_with(json, '{{"t":"rec"')), item AS (SELECT file, unnest(r) AS x FROM line)
    SELECT file, CAST(x[1] AS INTEGER) AS chan, CAST(x[2] AS BIGINT) AS t1, x[3] AS f2, x[5] AS f4 FROM item\"\"\")
chan = con.execute(f\"\"\"SELECT filename, json->>'id' FROM read_json_objects('{run}/**/*.sprof.jsonl', filename=true)
    WHERE json->>'t' = 'chan' AND json->>'name' = 'batchFrameworkProcessing'\"\"\").fetchall()
cond = " OR ".join(f"(file = '{f}' AND chan = {c})" for f, c in chan)
con.execute(f\"\"\"CREATE TABLE batch AS SELECT t1 AS start_ns, (CAST(f2 AS BIGINT) - t1) / 1e6 AS schedule_ms,
    json_array_length(f4, '$.reqs') AS batch_size FROM rec WHERE {cond}\"\"\")
print(con.execute("SELECT count(*), quantile_cont(schedule_ms, [0.5, 0.9, 0.99]) FROM batch").fetchall())
con.execute(f"COPY batch TO '{out}' (HEADER)")
""",
    "polars": """
import glob, json, sys, polars as pl
run, out = sys.argv[1], sys.argv[2]
rows = {"start_ns": [], "schedule_ms": [], "batch_size": []}
for path in sorted(glob.glob(run + "/**/*.sprof.jsonl", recursive=True)):
    chans = set()
    with open(path, "rb") as fh:
        for line in fh:
            if line.startswith(b'{"t":"rec"'):
                for r in json.loads(line)["r"]:
                    if r[0] in chans:
                        rows["start_ns"].append(r[1])
                        rows["schedule_ms"].append((r[2] - r[1]) / 1e6)
                        rows["batch_size"].append(len((r[4] or {}).get("reqs") or ()))
            elif line.startswith(b'{"t":"chan"'):
                c = json.loads(line)
                if c["name"] == "batchFrameworkProcessing":
                    chans.add(c["id"])
batch = pl.DataFrame(rows)
print(batch.height, [batch["schedule_ms"].quantile(q, "linear") for q in (0.5, 0.9, 0.99)])
batch.write_csv(out)
""",
}
CASES = {"1m": 1, "10m": 10, "100m": 100}


def _tree_memory_kb(pid: int) -> tuple[int, int]:
    per_process = [memory_kib(p) for p in descendants(pid)]
    return sum(rss for rss, _ in per_process), sum(pss for _, pss in per_process)


def measure(cmd: list[str], cwd: Path = ROOT) -> dict[str, float]:
    """Wall seconds, CPU seconds (user + system of the whole tree) and peak tree RSS / PSS (MB) of one
    command, run in `cwd` (`python -m` imports the package found there first)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0, 0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.1):
            rss, pss = _tree_memory_kb(proc.pid)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"wall_s": wall, "cpu_s": cpu, "tree_rss_mb": peak[0] / 1024, "tree_pss_mb": peak[1] / 1024}


def synthetic_run(work: Path, millions: int) -> Path:
    run_dir = work / f"synthetic-{millions}m"
    if not (run_dir / ".complete").exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        code = ("import sys; sys.path.insert(0, 'tests'); from synthetic import SyntheticConfig, generate_run; "
                "generate_run(sys.argv[1], SyntheticConfig(requests=int(sys.argv[2]), output_tokens=64, "
                "max_num_seqs=16, arrival_rate_per_s=30.0, prompt_tokens=(64, 1024), runner_timer_spans=True))")
        subprocess.run([sys.executable, "-c", code, str(run_dir), str(millions * REQUESTS_PER_MILLION)], cwd=ROOT,
                       check=True)
        (run_dir / ".complete").touch()
    return run_dir


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):8.2f} [{min(values):.2f}-{max(values):.2f}]"


def bench(name: str, run_dir: Path, args: argparse.Namespace) -> dict[str, object]:
    raw_mb = sum(p.stat().st_size for p in run_dir.rglob("*.sprof.jsonl")) / 1e6
    out = Path(args.work) / "out"
    new_cmd = [sys.executable, "-m", "service_profiler.cli", "analyze", "--input-path", str(run_dir),
               "--output-path", str(out), "--format", *args.format, "--quiet", "--memory-limit", args.memory_limit]
    runs: dict[str, list[dict[str, float]]] = {"new": [], "baseline": []}
    commands = [("new", new_cmd, ROOT)]
    if args.baseline:
        commands.append(("baseline", new_cmd, args.baseline))
    for _ in range(args.repeat):
        for label, cmd, cwd in commands:
            shutil.rmtree(out, ignore_errors=True)
            runs[label].append(measure(cmd, cwd))
    print(f"\n== {name}: {run_dir} ({raw_mb:,.0f} MB raw), formats {' '.join(args.format)}, "
          f"memory limit {args.memory_limit}, {args.repeat} run(s): median [min-max]")
    for label, results in runs.items():
        if results:
            print(f"  {label}: wall {_summary([r['wall_s'] for r in results])} s   CPU "
                  f"{_summary([r['cpu_s'] for r in results])} s   tree RSS "
                  f"{_summary([r['tree_rss_mb'] for r in results])} MB   tree PSS "
                  f"{_summary([r['tree_pss_mb'] for r in results])} MB")
    return {"case": name, "raw_mb": raw_mb, "runs": runs}


def bench_engines(name: str, run_dir: Path, args: argparse.Namespace) -> None:
    """The core work in each engine, alternating, each in a fresh interpreter."""
    runs: dict[str, list[dict[str, float]]] = {engine: [] for engine in _ENGINE_CORE}
    for _ in range(args.repeat):
        for engine, code in _ENGINE_CORE.items():
            out = Path(args.work) / f"engine-{engine}.csv"
            runs[engine].append(measure([sys.executable, "-c", code, str(run_dir), str(out)]))
    print(f"\n== engines, core work on {name}: median [min-max] of {args.repeat}")
    for engine, results in runs.items():
        print(f"  {engine:7s} wall {_summary([r['wall_s'] for r in results])} s   CPU "
              f"{_summary([r['cpu_s'] for r in results])} s   tree RSS "
              f"{_summary([r['tree_rss_mb'] for r in results])} MB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", nargs="*", choices=sorted(CASES), default=["1m"])
    parser.add_argument("--real", nargs="*", type=Path, default=[], metavar="DIR")
    parser.add_argument("--format", nargs="+", default=["csv", "db"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--memory-limit", default="1GB")
    parser.add_argument("--baseline", type=Path, metavar="DIR",
                        help="also time the same command on another version of the package, alternating: DIR holds "
                             "its service_profiler/ (e.g. `pip install --no-deps --target DIR` of an older wheel)")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "bench-columnar")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--engines", action="store_true", help="compare DuckDB and Polars on the core work instead")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.engines:
        for run_dir in [*args.real, *(synthetic_run(args.work, CASES[case]) for case in args.case)]:
            bench_engines(str(run_dir), run_dir, args)
        return 0
    results = [bench(str(real), real, args) for real in args.real]
    results += [bench(case, synthetic_run(args.work, CASES[case]), args) for case in args.case]
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=asdict))
    return 0


if __name__ == "__main__":
    sys.exit(main())
