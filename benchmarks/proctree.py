"""The process tree under a pid, from /proc (Linux): what the benchmarks measure CPU and memory over."""

from __future__ import annotations

import os


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (children of each of its threads, recursively); processes that
    exit meanwhile are skipped."""
    found = [pid]
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                for child in f.read().split():
                    found += descendants(int(child))
    except OSError:
        pass
    return found


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB, from /proc/PID/smaps_rollup; (0, 0) for a process gone meanwhile."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss
