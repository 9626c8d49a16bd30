"""Starting the front doors in a process (called by `bootstrap.activate`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .. import envvars
from ..settings import ProfilerSettings
from .options import FrontDoorOptions, read_options
from .tap import FrontDoorTap
from .tap import install as install_tap


def options_for_process(env: Mapping[str, str]) -> FrontDoorOptions:
    """The options, with the output paths made absolute in this process's environment too, so an engine
    process started in another directory writes where the user's shell pointed."""
    options = read_options(env)
    if options.profiling_log is not None:
        os.environ[envvars.VLLM_SCHEDULER_PROFILING_LOG] = str(options.profiling_log)
    if options.log_dir is not None:
        os.environ[envvars.VLLM_SCHEDULER_LOG_DIR] = str(options.log_dir)
    return options


def builtin_settings(options: FrontDoorOptions) -> ProfilerSettings:
    """Settings without a config file: collection on from the start, the shipped symbols, the raw run
    inside the front door's output directory, the live console line per step when asked."""
    return ProfilerSettings(enable=True, prof_dir=str(options.raw_dir()),
                            console_every_n_steps=1 if options.console else 0)


def install(runtime: Any, options: FrontDoorOptions) -> FrontDoorTap:
    return install_tap(runtime, options)
