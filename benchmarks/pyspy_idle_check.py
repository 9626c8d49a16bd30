"""What py-spy counts as busy: threads whose CPU time is known, sampled the way `bench_engine_share.py` samples.

    python benchmarks/pyspy_idle_check.py --py-spy PATH [--seconds 15] [--rate 200]

A child process runs three threads: `engine`, a pure-Python loop that holds the GIL all the time (as the
engine's thread does between its C calls); `writer`, which writes 70 kB with `os.write` and then sleeps
10 ms, over and over (as the recorder's writer thread does, with less encoding); and the main thread,
asleep in one `time.sleep` for the whole run. py-spy attaches (raw format, busy samples only, blocking
samples) for `--seconds`; the child reports each thread's CPU time (`time.thread_time`).

For each thread: its samples as a share of the samples py-spy could take, beside its CPU time as a share
of the wall time. A thread whose samples far exceed its CPU time was counted while it waited: for the GIL
after `os.write` or `time.sleep` returned, the engine thread holding it meanwhile. `bench_engine_share.py`
charges such samples of the writer thread (its leaf is the line of `os.write`) to the profiler, though the
engine runs then.

`--teardown` samples another child instead: one thread calling a function that builds a local list of
200,000 one-element lists and returns. The samples whose leaf is the caller, on the line of the call, are
the callee's locals being freed after its frame was unlinked: py-spy charges that to the caller
(`pyspy_share.py` gives such samples under a probe to the engine).
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, os, sys, threading, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
data = b"x" * 70_000
stop = False
cpu = {}

def writer():
    start, writes = time.thread_time(), 0
    while not stop:
        os.write(fd, data)  # writer-write
        writes += 1
        if writes % 50 == 0:
            os.lseek(fd, 0, 0)
        time.sleep(0.01)  # writer-sleep
    cpu["writer"] = time.thread_time() - start

def engine():
    start, x = time.thread_time(), 0
    while not stop:
        for i in range(1000):
            x += i * i  # engine-loop
    cpu["engine"] = time.thread_time() - start

threads = [threading.Thread(target=writer, name="writer"), threading.Thread(target=engine, name="engine")]
for t in threads:
    t.start()
print(os.getpid(), flush=True)
wall = time.monotonic()
time.sleep(float(sys.argv[2]))  # main-sleep
stop = True
for t in threads:
    t.join()
cpu["main"] = 0.0
print(json.dumps({"cpu": cpu, "wall": time.monotonic() - wall}), flush=True)
"""

TEARDOWN_CHILD = r"""
import json, os, sys, time

def build():
    items = [[i] for i in range(200_000)]  # teardown-build
    return len(items)

print(os.getpid(), flush=True)
start, wall, end = time.thread_time(), time.monotonic(), time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    build()  # teardown-call
print(json.dumps({"cpu": {"main": time.thread_time() - start}, "wall": time.monotonic() - wall}), flush=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--py-spy", required=True)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rate", type=int, default=200)
    parser.add_argument("--teardown", action="store_true",
                        help="where py-spy puts the freeing of a returning function's locals")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "child.py").write_text(TEARDOWN_CHILD if args.teardown else CHILD)
        child = subprocess.Popen([sys.executable, str(work / "child.py"), str(work / "out.bin"),
                                  str(args.seconds + 4)], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None
            pid = child.stdout.readline().strip()
            time.sleep(1)
            raw = work / "samples.txt"
            subprocess.run([args.py_spy, "record", "--pid", pid, "--rate", str(args.rate), "--duration",
                            str(int(args.seconds)), "--format", "raw", "--output", str(raw), "--threads"],
                           check=True, capture_output=True)
            report = json.loads(child.stdout.readline())
        finally:
            child.kill()
            child.wait()
        by_line: collections.Counter[tuple[str, str]] = collections.Counter()
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            frames = stack.split(";")
            thread = frames[0].split(": ")[-1] if ": " in frames[0] else frames[0]
            if args.teardown:  # one thread, which py-spy may leave unnamed
                thread = "MainThread"
            by_line[(thread, frames[-1])] += int(count)
    possible = args.seconds * args.rate
    print(f"py-spy {args.seconds:.0f} s at {args.rate} Hz: {possible:.0f} samples possible per thread")
    print(f"{'thread':10s} {'CPU / wall':>10s} {'samples':>8s}  where")
    cpu = {"MainThread": report["cpu"]["main"], **report["cpu"]}
    for thread in ("MainThread",) if args.teardown else ("engine", "writer", "MainThread"):
        lines = {leaf: n for (t, leaf), n in by_line.items() if t == thread}
        where = ", ".join(f"{leaf.split(' (')[1].rstrip(')')}: {n}" for leaf, n in
                          sorted(lines.items(), key=lambda item: -item[1]))
        share = 100 * cpu.get(thread, 0.0) / report["wall"]
        print(f"{thread:10s} {share:9.2f} % {100 * sum(lines.values()) / possible:7.2f} %  {where}")


if __name__ == "__main__":
    main()
