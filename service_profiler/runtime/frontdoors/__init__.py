"""Front doors: the scheduler-profiling JSONL and the scheduler-logging CSVs, on the same runtime.

Both are switched on by environment variables (`envvars.VLLM_ENABLE_SCHEDULER_PROFILING`,
`envvars.VLLM_SCHEDULER_LOGGING`), with or without a config file. They do not patch anything themselves:
`tap.FrontDoorTap` sits between the handlers' `record.*` calls and the runtime, keeps a reference to the
scheduler records it needs (one deque append on the engine's thread), and on every recorder flush turns
them into rows (`batch_join`, `batch_lines`, `scheduler_tables`) that `sinks` write. `offline` builds the
same rows from a raw run, so `analyze` writes the same files.

Engine-side modules here (`options`, `tap`, `batch_join`, `batch_lines`, `scheduler_tables`, `sinks`)
import only the standard library.
"""
