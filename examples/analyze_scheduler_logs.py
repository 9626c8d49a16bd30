"""The scheduler-logging CSVs' analysis under the name its users know:

    python examples/analyze_scheduler_logs.py ./scheduler_logs [-o DIR]

Same as `service-profiler scheduler-report ./scheduler_logs`: TTFT/TPOT percentiles, preemption rate, KV
cache utilisation and three charts.
"""

from __future__ import annotations

import sys

from service_profiler.cli import main

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(f"usage: {sys.argv[0]} LOG_DIR [-o DIR]")
    sys.exit(main(["scheduler-report", *sys.argv[1:]]))
