"""The scheduler-profiling JSONL's analysis under the name its users know:

    python examples/scheduler_profiling_example.py analyze scheduler_profiling.jsonl [-o DIR]

Same as `service-profiler scheduler-report scheduler_profiling.jsonl`: basic statistics and six charts.
"""

from __future__ import annotations

import sys

from service_profiler.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] != "analyze" or len(args) < 2:
        sys.exit(f"usage: {sys.argv[0]} analyze FILE.jsonl [-o DIR]")
    sys.exit(main(["scheduler-report", *args[1:]]))
