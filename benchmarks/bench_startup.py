"""Interpreter start-up cost of the installed `service_profiler.pth` line.

    python benchmarks/bench_startup.py

Compares `python -c pass` with the variables unset (the .pth line costs one dictionary lookup) and
set with collection off (the profiler activates: reads config and YAML, installs the import hook).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = 30


def _time_interpreter(env: dict[str, str], flags: list[str]) -> float:
    samples = []
    for _ in range(RUNS):
        start = time.perf_counter()
        subprocess.run([sys.executable, *flags, "-c", "pass"], env=env, check=True)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def main() -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_PROF") and k != "PROFILING_SYMBOLS_PATH"}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.json"
        config.write_text(json.dumps({"enable": 0, "prof_dir": str(Path(tmp) / "prof")}))
        symbols = Path(tmp) / "symbols.yaml"
        symbols.write_text("- symbol: json.decoder:JSONDecoder.decode\n")
        active = {**base, "SERVICE_PROF_CONFIG_PATH": str(config), "PROFILING_SYMBOLS_PATH": str(symbols)}
        no_site = _time_interpreter(base, ["-S"])
        unset = _time_interpreter(base, [])
        on = _time_interpreter(active, [])
    print(f"median of {RUNS} runs of `python -c pass`:")
    print(f"  without site (-S, no .pth at all)   {no_site:7.1f} ms")
    print(f"  variables unset (dormant .pth line)  {unset:7.1f} ms")
    print(f"  SERVICE_PROF_CONFIG_PATH set          {on:7.1f} ms  (+{on - unset:.1f} ms to activate)")


if __name__ == "__main__":
    main()
