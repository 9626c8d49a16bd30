#!/usr/bin/env bash
# The main job end to end on the embedded default (tiny local Llama, vLLM CPU build): set-up, serve
# under the profiler, send a workload, analyze. Outputs land in ./demo-run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV="${VENV:-.venv}"
exec "$VENV/bin/python" examples/demo.py "$@"
