"""Time of `service-profiler convert` and of `analyze` on the Parquet it writes, against `analyze` on the
raw files (docs/DISTRIBUTED.md).

    python benchmarks/bench_parquet.py --run /path/to/synthetic-1m --work /tmp/pq-bench [--repeat 3]
                                       [--format csv] [--hosts N]

The run is copied under --work (it is never written): `raw/` stays raw, `parquet/` is converted. With
`--hosts N`, each holds N copies as N hosts (`host-i/`, the hostname in each header renamed), each
converted apart as its host would. Each repeat, alternating so that both see the same machine load:
convert (each host in turn: on real hosts they run at once), analyze on `raw/`, analyze on `parquet/`.
Each command runs in a fresh interpreter under /usr/bin/time: wall, CPU (user + system) and peak RSS;
for analyze also the wall and CPU at its "read" progress line (reading the input into DuckDB, the only
part that differs between the two). Reported: median [min-max] of each.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

_READ = re.compile(r"\[analyze\s+([\d.]+)s cpu\s+([\d.]+)s.*\] read ")


def _timed(cmd: list[str]) -> dict[str, float]:
    done = subprocess.run(["/usr/bin/time", "-f", "TIME %e %U %S %M", *cmd], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    wall, user, system, rss_kb = done.stderr.strip().splitlines()[-1].split()[1:]
    out = {"wall_s": float(wall), "cpu_s": float(user) + float(system), "peak_rss_mb": int(rss_kb) / 1024}
    read = _READ.search(done.stderr)
    if read:
        out["read_wall_s"], out["read_cpu_s"] = float(read.group(1)), float(read.group(2))
    return out


def _copy(run: Path, dest: Path, hosts: int) -> None:
    if not hosts:
        shutil.copytree(run, dest, ignore=shutil.ignore_patterns("sprof-parquet"))
        return
    for i in range(hosts):
        for raw in sorted(run.glob("*.sprof.jsonl")):
            host_dir = dest / f"host-{i}"
            host_dir.mkdir(parents=True, exist_ok=True)
            with raw.open("rb") as src, (host_dir / raw.name).open("wb") as out:
                header = json.loads(src.readline())
                header["hostname"] = f"{header.get('hostname')}-{i}"
                out.write(json.dumps(header).encode() + b"\n")
                shutil.copyfileobj(src, out)


def _summary(runs: list[dict[str, float]]) -> str:
    parts = []
    for key in runs[0]:
        values = [r[key] for r in runs]
        parts.append(f"{key} {statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="raw run directory (only read)")
    parser.add_argument("--work", type=Path, required=True, help="where the copies are made")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--format", nargs="+", default=["csv"])
    parser.add_argument("--hosts", type=int, default=0, help="N copies of the run as N hosts (0: the run as is)")
    args = parser.parse_args(argv)
    raw, converted = args.work / "raw", args.work / "parquet"
    for copy in (raw, converted):
        if not copy.exists():
            _copy(args.run, copy, args.hosts)
    hosts = sorted(converted.glob("host-*")) if args.hosts else [converted]
    cli = [sys.executable, "-m", "service_profiler.cli"]
    results: dict[str, list[dict[str, float]]] = {"convert": [], "analyze raw": [], "analyze parquet": []}
    for i in range(args.repeat):
        for host in hosts:
            results["convert"].append(_timed([*cli, "convert", "--input-path", str(host)]))
        for name, run_dir in (("analyze raw", raw), ("analyze parquet", converted)):
            out = args.work / f"out-{name.split()[1]}"
            shutil.rmtree(out, ignore_errors=True)
            results[name].append(_timed([*cli, "analyze", "--input-path", str(run_dir), "--output-path", str(out),
                                         "--format", *args.format]))
        print(f"repeat {i + 1}: " + "; ".join(f"{k}: {v[-1]}" for k, v in results.items()), flush=True)
    size = sum(f.stat().st_size for f in converted.rglob("sprof-parquet/*"))
    raw_size = sum(f.stat().st_size for f in raw.rglob("*.sprof.jsonl"))
    print(f"raw {raw_size / 1e6:.0f} MB, Parquet {size / 1e6:.0f} MB")
    for name, runs in results.items():
        print(f"{name}: {_summary(runs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
