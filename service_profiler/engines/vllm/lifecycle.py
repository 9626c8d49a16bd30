"""Handlers on an engine's own shutdown path: write what was recorded before the process can be cut off.

vLLM's process manager sends SIGTERM to each EngineCore, waits a few seconds and then kills what is
still alive; the EngineCore's teardown (executor, distributed state) often takes longer than that,
so the flush at interpreter exit never comes. `EngineCore.shutdown` is the first thing that teardown
calls, right after the busy loop has stopped stepping: flushing there keeps every step up to the
shutdown, and the raw file says it closed cleanly (`close` with reason `engine_shutdown`).

The executor's worker processes end the same way: the EngineCore's teardown closes their death pipe and
SIGTERMs, then SIGKILLs, whatever has not exited in time, and a worker is a multiprocessing child that
leaves through `os._exit`. `WorkerProc.shutdown` is the first call of a worker's own teardown, once its
busy loop has stopped.
"""

from __future__ import annotations

from typing import Any

from service_profiler import record


def engine_shutdown_handler(original_func: Any, this: Any, *args: Any, **kwargs: Any) -> Any:
    """`EngineCore.shutdown`: flush (with a `close` line), then the engine's own teardown."""
    record.process_ending("engine_shutdown")
    return original_func(this, *args, **kwargs)


def worker_shutdown_handler(original_func: Any, this: Any, *args: Any, **kwargs: Any) -> Any:
    """`WorkerProc.shutdown` (an executor's worker process): flush (with a `close` line), then the
    worker's own teardown."""
    record.process_ending("worker_shutdown")
    return original_func(this, *args, **kwargs)
