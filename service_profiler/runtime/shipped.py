"""Where the shipped configuration lives: package data beside the code that reads it.

- `default_config.json` (written when `SERVICE_PROF_CONFIG_PATH` names a missing file) sits beside this
  module in `service_profiler/runtime/`;
- `engines.json` (which symbols YAML is the default for which installed engine) sits in
  `service_profiler/engines/`, and names the YAMLs relative to that folder (`vllm/vllm_v1.yaml`).

Both are inside the package, so the same paths hold for an installed wheel and a source checkout on
PYTHONPATH.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_CONFIG_PATH = Path(__file__).resolve().with_name("default_config.json")
ENGINES_DIR = Path(__file__).resolve().parent.parent / "engines"


def engines_dir() -> Path:
    """The folder of `engines.json`; the symbol YAMLs it names are relative to it."""
    return ENGINES_DIR
