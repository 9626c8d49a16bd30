"""Interpreter start-up cost of the installed `service_profiler.pth` line.

    python benchmarks/bench_startup.py

Reports
1. the cost of the installed .pth line itself with the variables unset, measured in-process: the
   `import` lines of `service_profiler.pth` (read from site-packages, the text `site` executes) are
   compiled once and `exec`-ed under `timeit` in a fresh namespace, as `site` does (µs per run);
2. the median wall time of `python -c pass` with the variables unset (the dormant .pth line) and set
   with collection off (the profiler activates: reads config and YAML, installs the import hook).

A `python -S` baseline would remove all site processing (every .pth file, site-packages), so it
cannot isolate our line; (1) is that isolation, (2) is what a user sees.
"""

from __future__ import annotations

import json
import os
import site
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

RUNS = 30
PTH_NAME = "service_profiler.pth"


def installed_pth() -> Path:
    for directory in [*site.getsitepackages(), site.getusersitepackages()]:
        path = Path(directory) / PTH_NAME
        if path.is_file():
            return path
    raise SystemExit(f"{PTH_NAME} not found in site-packages: install the package first (pip install .)")


def _exec_us(code: list[Any]) -> float:
    def run_lines() -> None:
        for compiled in code:
            exec(compiled, {})  # the installed .pth text, exactly what site runs

    timer = timeit.Timer(run_lines)
    number, _ = timer.autorange()
    return min(timer.repeat(repeat=7, number=number)) / number * 1e6


def pth_line_cost_us(path: Path) -> tuple[list[str], float, float]:
    """The executable lines of the .pth file, the µs one `exec` of them costs with the variables unset,
    and the µs an `exec` of `pass` costs the same way (what `exec` itself adds)."""
    # `site.addpackage` executes the lines that start with "import" (followed by a space or tab).
    lines = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines()
             if line.startswith(("import ", "import\t"))]
    if not lines:
        raise SystemExit(f"{path}: no import line")
    saved = {name: os.environ.pop(name) for name in list(os.environ)
             if name.startswith("SERVICE_PROF") or name == "PROFILING_SYMBOLS_PATH"}
    try:
        line_us = _exec_us([compile(line, str(path), "exec") for line in lines])
        empty_us = _exec_us([compile("pass", str(path), "exec") for _ in lines])
    finally:
        os.environ.update(saved)
    return lines, line_us, empty_us


def _time_interpreter(env: dict[str, str]) -> float:
    samples = []
    for _ in range(RUNS):
        start = time.perf_counter()
        # The activated profiler logs a summary line per process; the terminal is not what is measured.
        subprocess.run([sys.executable, "-c", "pass"], env=env, check=True, stderr=subprocess.DEVNULL)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def main() -> None:
    path = installed_pth()
    lines, line_us, empty_us = pth_line_cost_us(path)
    base = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_PROF") and k != "PROFILING_SYMBOLS_PATH"}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.json"
        config.write_text(json.dumps({"enable": 0, "prof_dir": str(Path(tmp) / "prof")}))
        symbols = Path(tmp) / "symbols.yaml"
        symbols.write_text("- symbol: json.decoder:JSONDecoder.decode\n")
        active = {**base, "SERVICE_PROF_CONFIG_PATH": str(config), "PROFILING_SYMBOLS_PATH": str(symbols)}
        unset = _time_interpreter(base)
        on = _time_interpreter(active)
    print(f"{path}:")
    for line in lines:
        print(f"  {line}")
    print(f"exec of its import line(s), variables unset: {line_us:.2f} µs per run "
          f"(exec of `pass` the same way: {empty_us:.2f} µs; best of 7, in-process)")
    print(f"median of {RUNS} runs of `python -c pass`:")
    print(f"  variables unset (dormant .pth line)  {unset:7.1f} ms")
    print(f"  SERVICE_PROF_CONFIG_PATH set          {on:7.1f} ms  (+{on - unset:.1f} ms to activate)")


if __name__ == "__main__":
    main()
