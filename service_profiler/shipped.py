"""Where the shipped configuration (`config/`: default JSON, symbol YAMLs, engines.json) lives.

Installed, it is the package `service_profiler.shipped_config` (pyproject maps `config/` there). Run
from a source checkout on PYTHONPATH (no install), that package does not exist: the checkout's own
`config/` next to `service_profiler/` is used instead, so the profiler starts there too.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path


@functools.cache
def shipped_config_dir() -> Path:
    try:
        return Path(str(resources.files("service_profiler.shipped_config")))
    except ModuleNotFoundError:
        checkout = Path(__file__).resolve().parent.parent / "config"
        if (checkout / "default_config.json").is_file():
            return checkout
        raise
