#!/usr/bin/env bash
# The whole test suite, as CI runs it: set-up, lint, type check, then every test (vLLM ones included;
# under CI=true they fail rather than skip when something they need is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV="${VENV:-.venv}"
"$VENV/bin/ruff" check service_profiler tests benchmarks examples
"$VENV/bin/mypy" service_profiler
# Tests import the installed wheel, never the source tree: the `pytest` script (not `python -m pytest`)
# runs from a scratch directory, so neither pytest nor the Python subprocesses the tests start
# (`python -c ...` puts the working directory first on sys.path) can pick up ./service_profiler.
ROOT="$(pwd)"
PYTEST="$(cd "$VENV" && pwd)/bin/pytest"
cd "$(mktemp -d)"
"$PYTEST" -q -c "$ROOT/pyproject.toml" --rootdir "$ROOT" "$ROOT/tests" "$@"
