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

VLLM_ENABLE_SCHEDULER_PROFILING = "VLLM_ENABLE_SCHEDULER_PROFILING"
"""`true` / `1`: the scheduler-profiling JSONL front door (docs/FRONT_DOORS.md). Starts collection with the
shipped vLLM symbols even without `SERVICE_PROF_CONFIG_PATH`, and writes one JSON line per scheduler step
(batch id, schedule / model run / step time in ms, prefill and decode counts and chunk sizes, queues, KV
usage) to `VLLM_SCHEDULER_PROFILING_LOG` while the engine runs. Default `false`."""

VLLM_SCHEDULER_PROFILING_LOG = "VLLM_SCHEDULER_PROFILING_LOG"
"""Path of the scheduler-profiling JSONL; default `scheduler_profiling.jsonl` in the engine's working
directory. Replaced at the engine's first step (a second data-parallel engine writes `<stem>.dp<N>.jsonl`)."""

VLLM_SCHEDULER_PROFILING_CONSOLE = "VLLM_SCHEDULER_PROFILING_CONSOLE"
"""`true` / `1`: also print the live console line (see `engines/vllm/console.py`) from the engine; default
`false`. With a config file, its `console_every_n_steps` decides instead."""

VLLM_SCHEDULER_LOGGING = "VLLM_SCHEDULER_LOGGING"
"""`1` / `true`: the scheduler-logging CSV front door (docs/FRONT_DOORS.md): per_request.csv,
per_iteration.csv, per_iteration_requests.csv, events.csv and state_transitions.csv in
`VLLM_SCHEDULER_LOG_DIR`, times in ns since collection started in the engine process, written every 100
iterations or 60 s and completed at shutdown. Starts collection without a config file, like
`VLLM_ENABLE_SCHEDULER_PROFILING`."""

VLLM_SCHEDULER_LOG_DIR = "VLLM_SCHEDULER_LOG_DIR"
"""Directory of the scheduler-logging CSVs; default `./scheduler_logs` (created)."""

VLLM_SCHEDULER_LOG_WAITING = "VLLM_SCHEDULER_LOG_WAITING"
"""`1` / `true`: at every scheduler step also list each waiting request (queue position, waiting reason) in
per_iteration_requests.csv and, in a raw run, as `Request/waiting` events. Off by default: it walks the
waiting queue, so its cost grows with the queue (see benchmarks/README.md, "waiting-queue snapshot")."""

ALL: tuple[str, ...] = (
    SERVICE_PROF_CONFIG_PATH,
    PROFILING_SYMBOLS_PATH,
    SERVICE_PROF_RUN_DIR,
    SERVICE_PROF_DISABLE,
    SERVICE_PROF_LOG_LEVEL,
    VLLM_ENABLE_SCHEDULER_PROFILING,
    VLLM_SCHEDULER_PROFILING_LOG,
    VLLM_SCHEDULER_PROFILING_CONSOLE,
    VLLM_SCHEDULER_LOGGING,
    VLLM_SCHEDULER_LOG_DIR,
    VLLM_SCHEDULER_LOG_WAITING,
)
"""Every variable above, for `inspect`-style reports and the tests that keep this list complete."""
