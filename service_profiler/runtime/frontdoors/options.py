"""Which front doors the environment asks for, and the built-in settings used without a config file."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .. import envvars

DEFAULT_PROFILING_LOG = "scheduler_profiling.jsonl"
DEFAULT_LOG_DIR = "scheduler_logs"
RAW_SUBDIR = "raw"
"""Without a config file the raw per-process files go here, inside the front door's output directory,
so the same run can also be opened with `service-profiler analyze`."""

_TRUE = frozenset({"1", "true", "yes", "on"})


def is_true(value: str | None) -> bool:
    return value is not None and value.strip().lower() in _TRUE


def requested(env: Mapping[str, str]) -> bool:
    """True when a front door is switched on (cheap: runs at every interpreter start-up)."""
    return is_true(env.get(envvars.VLLM_ENABLE_SCHEDULER_PROFILING)) or is_true(env.get(envvars.VLLM_SCHEDULER_LOGGING))


@dataclass(frozen=True)
class FrontDoorOptions:
    profiling_log: Path | None  # the scheduler-profiling JSONL, when that door is on
    console: bool
    log_dir: Path | None  # the scheduler-logging CSV directory, when that door is on
    waiting: bool  # list waiting requests per iteration (walks the waiting queue)

    @property
    def any(self) -> bool:
        return self.profiling_log is not None or self.log_dir is not None

    def raw_dir(self) -> Path:
        """Where the raw run goes when no config file names a `prof_dir`."""
        if self.log_dir is not None:
            return self.log_dir / RAW_SUBDIR
        assert self.profiling_log is not None
        return self.profiling_log.parent / f"{self.profiling_log.stem}_{RAW_SUBDIR}"


def read_options(env: Mapping[str, str]) -> FrontDoorOptions:
    """Paths are made absolute against the current directory, so an engine process started elsewhere
    writes where the user's shell pointed."""
    log: Path | None = None
    if is_true(env.get(envvars.VLLM_ENABLE_SCHEDULER_PROFILING)):
        log = Path(os.path.abspath(os.path.expanduser(env.get(envvars.VLLM_SCHEDULER_PROFILING_LOG)
                                                      or DEFAULT_PROFILING_LOG)))
    log_dir: Path | None = None
    if is_true(env.get(envvars.VLLM_SCHEDULER_LOGGING)):
        log_dir = Path(os.path.abspath(os.path.expanduser(env.get(envvars.VLLM_SCHEDULER_LOG_DIR) or DEFAULT_LOG_DIR)))
    return FrontDoorOptions(profiling_log=log, console=is_true(env.get(envvars.VLLM_SCHEDULER_PROFILING_CONSOLE)),
                            log_dir=log_dir, waiting=is_true(env.get(envvars.VLLM_SCHEDULER_LOG_WAITING)))
