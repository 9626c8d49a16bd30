"""Every environment variable service-profiler reads, one documented constant each.

Code reads these names through this module only, so `grep envvars.` finds every place the product is
configured from the environment. Values are the variable *names*; nothing here reads the environment.
"""

from __future__ import annotations

SERVICE_PROF_CONFIG_PATH = "SERVICE_PROF_CONFIG_PATH"
"""Path of the JSON config (see `settings.py`). Setting it is what turns the profiler on in every process
the engine starts; unset means the profiler stays dormant and costs nothing. A missing file is created
with the shipped defaults (collection off: `"enable": 0`)."""

PROFILING_SYMBOLS_PATH = "PROFILING_SYMBOLS_PATH"
"""Path of the symbols YAML (see `symbols.py`), ending in `.yaml` or `.yml`. When the file does not exist
the shipped default for the installed engine is copied there, so users get an editable starting point.
Unset: `~/.config/vllm_ascend/service_profiling_symbols.<vllm version>.yaml` if present, else the
shipped default."""

SERVICE_PROF_RUN_DIR = "SERVICE_PROF_RUN_DIR"
"""Internal: the run directory chosen by the first profiled process of a run. Child processes (EngineCore,
workers) inherit it, so one `vllm serve` writes all its per-process files into one directory. Users do
not set it."""

SERVICE_PROF_DISABLE = "SERVICE_PROF_DISABLE"
"""Hard off switch: any value other than empty or `0` keeps the profiler from activating at all (no
patching, no threads), even when `SERVICE_PROF_CONFIG_PATH` is set. For ruling the profiler out when
debugging an engine problem without editing the environment the deployment sets up."""

SERVICE_PROF_LOG_LEVEL = "SERVICE_PROF_LOG_LEVEL"
"""Log level of the profiler's own logger: `DEBUG`, `INFO`, `WARNING`, `ERROR`, `CRITICAL` or a number;
default `INFO` (each process logs its one-line patch summary; problems are warnings). A value that is not
a level falls back to `INFO` with one warning; it never keeps the profiler from starting."""

ALL: tuple[str, ...] = (
    SERVICE_PROF_CONFIG_PATH,
    PROFILING_SYMBOLS_PATH,
    SERVICE_PROF_RUN_DIR,
    SERVICE_PROF_DISABLE,
    SERVICE_PROF_LOG_LEVEL,
)
"""Every variable above, for `inspect`-style reports and the tests that keep this list complete."""
