"""Peak memory of `analyze` per phase: the process tree's RSS between two of its progress lines.

    python benchmarks/analyze_memory.py RUN_DIR OUT_DIR [analyze options, e.g. --memory-limit 1GB]

Runs `service-profiler analyze` (the installed one) with its progress lines on, samples the RSS of the
analyze process and of its children (the figure process) every 0.2 s from /proc, and prints, for each
phase (reading the files, building the tables, then each output until it is done), the highest sum of
the two and the analyze process's own highest. The peak of a phase tells which part of the pipeline sets
the memory the whole run needs.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from proctree import descendants, memory_kib


def rss_mib(pid: int) -> float:
    return memory_kib(pid)[0] / 1024


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    run_dir, out_dir, extra = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    shutil.rmtree(out_dir, ignore_errors=True)
    exe = Path(sys.executable).parent / "service-profiler"
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "service_profiler.cli"]
    start = time.perf_counter()
    proc = subprocess.Popen([*command, "analyze", "--input-path", run_dir, "--output-path", str(out_dir), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    samples: list[tuple[float, float, float]] = []  # (seconds, analyze process MiB, children MiB)
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            children = sum(rss_mib(pid) for pid in descendants(proc.pid) if pid != proc.pid)
            samples.append((time.perf_counter() - start, rss_mib(proc.pid), children))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    marks: list[tuple[float, str]] = []
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("[analyze"):
            marks.append((time.perf_counter() - start, line.split("]", 1)[1].strip()))
    proc.wait()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        print(f"analyze exited with {proc.returncode}", file=sys.stderr)
    marks.append((float("inf"), "exit"))
    since = 0.0
    for until, message in marks:
        phase = [s for s in samples if since <= s[0] < until]
        if phase:
            top = max(phase, key=lambda s: s[1] + s[2])
            print(f"{since:7.1f}-{min(until, samples[-1][0]):7.1f} s  until {message[:44]!r:46s} "
                  f"tree {top[1] + top[2]:6.0f} MiB (analyze {top[1]:5.0f}, children {top[2]:4.0f}); "
                  f"analyze alone at most {max(s[1] for s in phase):5.0f} MiB")
        since = until
    if samples:
        print(f"peak tree RSS {max(s[1] + s[2] for s in samples):,.0f} MiB; wall {samples[-1][0]:.1f} s")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
