"""The one entry point behind every way the profiler is loaded into a process.

- the `service_profiler.pth` line installed with the package (every interpreter start-up),
- `sitecustomize_dir/sitecustomize.py` for environments where .pth files are not processed
  (put `python -c "import service_profiler.bootstrap as b; print(b.SITECUSTOMIZE_DIR)"` on PYTHONPATH),
- vLLM's `vllm.general_plugins` entry point (vLLM calls it in every process it starts, maybe twice).

`activate()` is idempotent, does nothing unless `SERVICE_PROF_CONFIG_PATH` is set, and never raises
into the host: a profiler that cannot start logs why and leaves the engine alone.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

from . import envvars

SITECUSTOMIZE_DIR = str(Path(__file__).with_name("sitecustomize_dir"))

_lock = threading.Lock()
_runtime: Any = None
_activated_pid: int | None = None


def _configure_logging() -> None:
    logger = logging.getLogger("service_profiler")
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(os.environ.get(envvars.SERVICE_PROF_LOG_LEVEL, "INFO").upper())
    logger.propagate = False


def activate(source: str = "api") -> Any:
    """Start the profiler in this process if the environment asks for it; returns the runtime or None."""
    global _runtime, _activated_pid
    config_path = os.environ.get(envvars.SERVICE_PROF_CONFIG_PATH)
    if not config_path or os.environ.get(envvars.SERVICE_PROF_DISABLE, "0") not in ("", "0"):
        return None
    with _lock:
        # A forked child inherits the parent's runtime (its recorder re-opens a file for the new pid).
        if _runtime is not None:
            return _runtime
        try:
            _configure_logging()
            from .runtime import Runtime

            runtime = Runtime(config_path, dict(os.environ))
            runtime.start()
        except Exception as exc:
            print(f"service-profiler: not started in pid {os.getpid()} ({source}): {exc!r}", file=sys.stderr)
            return None
        _runtime, _activated_pid = runtime, os.getpid()
        return runtime


def current_runtime() -> Any:
    return _runtime


def vllm_plugin() -> None:
    """vLLM `general_plugins` entry point."""
    activate("vllm-plugin")


def activate_from_startup() -> None:
    """Called from the .pth line and sitecustomize; swallows everything, always."""
    try:
        activate("startup")
    except BaseException:
        pass
