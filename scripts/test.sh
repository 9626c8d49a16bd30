#!/usr/bin/env bash
# The whole test suite, as CI runs it: set-up, lint, type check, then every test (vLLM ones included;
# under CI=true they fail rather than skip when something they need is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV="${VENV:-.venv}"
"$VENV/bin/ruff" check service_profiler handlers tests benchmarks examples
"$VENV/bin/mypy" service_profiler handlers
# The `pytest` script (not `python -m pytest`) keeps the source tree off sys.path: tests import the
# installed wheel.
"$VENV/bin/pytest" -q tests "$@"
