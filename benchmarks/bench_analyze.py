"""Time `service-profiler analyze` on synthetic runs.

  (a) 1,000 requests x 64 output tokens, API server + EngineCore (two process files). Target <= 1.5 s.
  (b) about 1,000,000 records (the same vLLM vocabulary and mix, more requests). Target <= 15 s and
      peak RSS <= 1 GB; time should grow linearly with records (checked against a run 1/4 the size).

Each analysis runs in a fresh interpreter (so peak RSS is the analysis alone); the time reported is
measured inside it around `command.main` (module imports included, interpreter start-up not), next to
the wall time of the whole subprocess. Per-phase times come from the analyze progress lines.

    python benchmarks/bench_analyze.py [--case a b] [--format csv db json plots model] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service_profiler.analyze.synthetic import SyntheticConfig, generate_run  # noqa: E402

_CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
from service_profiler.analyze.command import main
rc = main(sys.argv[1:])
elapsed = time.perf_counter() - t0
print(json.dumps({"rc": rc, "elapsed_s": elapsed,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), file=sys.stderr)
"""

# (b): requests chosen so the run holds ~1M records with this mix (see the printed composition).
CASES = {
    "a": SyntheticConfig(requests=1000, output_tokens=64, max_num_seqs=256, arrival_rate_per_s=200.0),
    "b": SyntheticConfig(requests=18_000, output_tokens=64, max_num_seqs=16, arrival_rate_per_s=30.0,
                         prompt_tokens=(64, 1024)),
}
LINEARITY_FRACTION = 4


def analyze(run_dir: Path, out_dir: Path, formats: list[str]) -> dict[str, object]:
    cmd = [sys.executable, "-c", _CHILD, "--input-path", str(run_dir), "--output-path", str(out_dir),
           "--format", *formats]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    lines = proc.stderr.strip().splitlines()
    try:
        result: dict[str, object] = json.loads(lines[-1])
    except (IndexError, ValueError):
        print(proc.stdout, proc.stderr, file=sys.stderr)
        raise SystemExit(f"analyze failed (exit {proc.returncode})") from None
    result["wall_s"] = wall
    result["phases"] = [ln for ln in lines if ln.startswith("[analyze")]
    return result


def composition(run_dir: Path) -> dict[str, int]:
    from service_profiler.rawfile import read_run

    run = read_run([run_dir])
    entries = sum(len((s.attrs or {}).get("reqs") or ()) for s in run.spans if s.name == "batchFrameworkProcessing")
    entries += sum(len((e.attrs or {}).get("reqs") or ()) for e in run.events if e.name == "tokens")
    return {"records": run.num_records, "spans": len(run.spans), "events": len(run.events),
            "counters": len(run.counters), "batch_and_token_entries": entries,
            "raw_bytes": sum(p.stat().st_size for p in run_dir.glob("*.sprof.jsonl"))}


def bench(name: str, cfg: SyntheticConfig, work: Path, formats: list[str]) -> dict[str, object]:
    run_dir = work / f"run_{name}"
    truth = generate_run(run_dir, cfg)
    comp = composition(run_dir)
    res = analyze(run_dir, work / f"out_{name}", formats)
    elapsed = float(res["elapsed_s"])  # type: ignore[arg-type]
    trace = work / f"out_{name}" / "chrome_tracing.json"
    print(f"\n== case {name}: {cfg.requests:,} requests x {cfg.output_tokens} tokens, "
          f"{len(truth.files)} process files, {comp['raw_bytes'] / 1e6:.1f} MB raw")
    print(f"   records {comp['records']:,} (spans {comp['spans']:,}, events {comp['events']:,}, "
          f"counters {comp['counters']:,}); per-request entries in batches/tokens {comp['batch_and_token_entries']:,}")
    print(f"   analyze {elapsed:.2f} s in-process, {float(res['wall_s']):.2f} s wall (with interpreter start); "  # type: ignore[arg-type]
          f"peak RSS {float(res['peak_rss_mb']):.0f} MB; {comp['records'] / elapsed:,.0f} records/s")  # type: ignore[arg-type]
    if trace.exists():
        print(f"   chrome_tracing.json {trace.stat().st_size / 1e6:.1f} MB")
    for line in res["phases"]:  # type: ignore[attr-defined]
        print(f"     {line}")
    return {"case": name, **comp, **res}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    parser.add_argument("--format", nargs="+", default=["csv", "json", "db", "plots", "model"])
    parser.add_argument("--keep", type=Path, help="work directory to keep (default: a temporary one)")
    parser.add_argument("--no-linearity", action="store_true", help="skip the 1/4-size run of case b")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_analyze_") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = {name: bench(name, CASES[name], work, args.format) for name in args.case}
        if "b" in results and not args.no_linearity:
            base = CASES["b"]
            small = SyntheticConfig(**{**base.__dict__, "requests": base.requests // LINEARITY_FRACTION})
            r_small = bench("b_quarter", small, work, args.format)
            r_big = results["b"]
            per_small = float(r_small["elapsed_s"]) / int(r_small["records"])  # type: ignore[arg-type]
            per_big = float(r_big["elapsed_s"]) / int(r_big["records"])  # type: ignore[arg-type]
            print(f"\nlinearity: {per_small * 1e6:.2f} us/record at 1/{LINEARITY_FRACTION} size, "
                  f"{per_big * 1e6:.2f} us/record at full size (ratio {per_big / per_small:.2f})")
        print("\ntargets: (a) <= 1.5 s; (b) <= 15 s and <= 1024 MB peak RSS")
        for name in ("a", "b"):
            if name in results:
                r = results[name]
                limit_s = 1.5 if name == "a" else 15.0
                ok = float(r["elapsed_s"]) <= limit_s and (name == "a" or float(r["peak_rss_mb"]) <= 1024)  # type: ignore[arg-type]
                print(f"  ({name}) {'MET' if ok else 'NOT MET'}: {float(r['elapsed_s']):.2f} s, "  # type: ignore[arg-type]
                      f"{float(r['peak_rss_mb']):.0f} MB")  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
