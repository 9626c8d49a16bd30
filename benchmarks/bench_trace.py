"""Time and size of the Perfetto trace export (`columnar/trace_out.py`) on one run, optionally against
another version of the exporter, alternated on the same analysis so both see the same machine load.

    python benchmarks/bench_trace.py RUN_DIR [--baseline OLD_TRACE_OUT.py] [--repeat 3] [--out DIR]

The analysis tables are built once (not timed); each repeat then writes chrome_tracing.json with the
current exporter (and the baseline, when given). Reported per exporter: each wall time and CPU time (all of
the process's threads: on a shared machine the steadier figure), their medians and min-max, the file's size
and its event counts.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from service_profiler.columnar import trace_out
from service_profiler.columnar.run import analyze_run


def _load(path: Path) -> ModuleType:
    """An exporter module from a file, imported inside the columnar package (its relative imports resolve)."""
    spec = importlib.util.spec_from_file_location("service_profiler.columnar._bench_baseline", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--baseline", type=Path, default=None, help="another trace_out.py to compare with")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="where the traces are written (default: a temp dir)")
    args = parser.parse_args()
    exporters: dict[str, Any] = {"current": trace_out}
    if args.baseline:
        exporters["baseline"] = _load(args.baseline)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-trace-"))
    built = time.perf_counter()
    run = analyze_run([args.run])
    print(f"tables built in {time.perf_counter() - built:.1f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in exporters}
    cpu: dict[str, list[float]] = {name: [] for name in exporters}
    try:
        for _ in range(args.repeat):
            for name, module in exporters.items():
                (out / name).mkdir(parents=True, exist_ok=True)
                start, start_cpu = time.perf_counter(), time.process_time()
                module.write_trace(run, out / name / "chrome_tracing.json")
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
                print(f"  {name}: {times[name][-1]:.2f} s wall, {cpu[name][-1]:.2f} s CPU", flush=True)
    finally:
        run.close()
    for name, runs in times.items():
        path = out / name / "chrome_tracing.json"
        meta = json.loads(path.read_text(encoding="utf-8"))["metadata"]
        used = cpu[name]
        print(f"{name}: wall median {statistics.median(runs):.2f} s (min {min(runs):.2f}, max {max(runs):.2f}), "
              f"CPU median {statistics.median(used):.2f} s (min {min(used):.2f}, max {max(used):.2f}), n={len(runs)}, "
              f"{path.stat().st_size / 1e6:.1f} MB, events {meta.get('events')}")


if __name__ == "__main__":
    main()
