"""The one entry point behind every way the profiler is loaded into a process.

- the `service_profiler.pth` line installed with the package (every interpreter start-up),
- `runtime/sitecustomize_dir/sitecustomize.py` for environments where .pth files are not processed
  (put `python -c "import service_profiler.runtime.bootstrap as b; print(b.SITECUSTOMIZE_DIR)"` on PYTHONPATH),
- vLLM's `vllm.general_plugins` entry point (vLLM calls it in every process it starts, maybe twice).

`activate()` is idempotent, does nothing unless `SERVICE_PROF_CONFIG_PATH` is set or a front door is
switched on (`VLLM_ENABLE_SCHEDULER_PROFILING`, `VLLM_SCHEDULER_LOGGING`: docs/FRONT_DOORS.md), and never
raises into the host: a profiler that cannot start logs why and leaves the engine alone.
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

DEFAULT_LOG_LEVEL = logging.INFO
"""Level of the profiler's own logger when `SERVICE_PROF_LOG_LEVEL` is unset or not a level name."""

_lock = threading.Lock()
_runtime: Any = None
_activated_pid: int | None = None
_failed_pid: int | None = None  # a start that failed is not retried in the same process


def _configure_logging() -> None:
    logger = logging.getLogger("service_profiler")
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    raw = os.environ.get(envvars.SERVICE_PROF_LOG_LEVEL, "").strip()
    level = _parse_log_level(raw) if raw else DEFAULT_LOG_LEVEL
    logger.setLevel(DEFAULT_LOG_LEVEL if level is None else level)
    if level is None:
        # A typo in a logging knob must not cost the user their profile: default level, one warning.
        logger.warning("service-profiler: %s=%r is not a log level (DEBUG, INFO, WARNING, ERROR, CRITICAL "
                       "or a number); using %s", envvars.SERVICE_PROF_LOG_LEVEL, raw,
                       logging.getLevelName(DEFAULT_LOG_LEVEL))


def _parse_log_level(text: str) -> int | None:
    if text.isdigit():
        return int(text)
    level = logging.getLevelName(text.upper())
    return level if isinstance(level, int) else None


def activate(source: str = "api") -> Any:
    """Start the profiler in this process if the environment asks for it; returns the runtime or None."""
    global _runtime, _activated_pid, _failed_pid
    config_path = os.environ.get(envvars.SERVICE_PROF_CONFIG_PATH)
    if os.environ.get(envvars.SERVICE_PROF_DISABLE, "0") not in ("", "0"):
        return None
    if not config_path and not _front_door_requested():
        return None
    with _lock:
        # A forked child inherits the parent's runtime (its recorder re-opens a file for the new pid).
        if _runtime is not None or _failed_pid == os.getpid():
            return _runtime
        runtime: Any = None
        try:
            _configure_logging()
            from .core import Runtime

            front_doors: Any = None
            builtin: Any = None
            if _front_door_requested():
                from .frontdoors import activation

                front_doors = activation.options_for_process(os.environ)
                builtin = None if config_path else activation.builtin_settings(front_doors)
            runtime = Runtime(config_path, dict(os.environ), builtin)
            runtime.start()
            if front_doors is not None:
                activation.install(runtime, front_doors)
        except Exception as exc:
            if runtime is not None:
                runtime.abort()  # nothing half-installed stays behind
            print(f"service-profiler: not started in pid {os.getpid()} ({source}): {exc!r}", file=sys.stderr)
            _failed_pid = os.getpid()
            return None
        _runtime, _activated_pid = runtime, os.getpid()
        return runtime


def _front_door_requested() -> bool:
    # Inline and cheap: this runs at every interpreter start-up.
    env = os.environ
    return any(env.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in (envvars.VLLM_ENABLE_SCHEDULER_PROFILING, envvars.VLLM_SCHEDULER_LOGGING))


def current_runtime() -> Any:
    return _runtime


def vllm_plugin() -> None:
    """vLLM `general_plugins` entry point; never raises into vLLM's plugin loader."""
    try:
        activate("vllm-plugin")
    except Exception as exc:
        try:
            print(f"service-profiler: not started in pid {os.getpid()} (vllm-plugin): {exc!r}", file=sys.stderr)
        except Exception:
            pass


def activate_from_startup() -> None:
    """Called from the .pth line and sitecustomize; swallows everything, always."""
    try:
        activate("startup")
    except BaseException:
        pass
