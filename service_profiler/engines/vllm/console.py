"""Live console: one compact stats line from the EngineCore every `console_every_n_steps` steps.

    [service-profiler] dp0 batch 1200 | 85.3 steps/s | 31.2 tok/step (P 12.0 D 19.2) |
    reqs/step P 0.4 D 19.7 | running 32 waiting 5 | KV 41.2% 412/1000 | sched 0.21 ms model 11.30 ms

(one line in reality). Figures are averages over the window since the previous line, so nothing is
lost when lines are spaced out; queues and KV are the latest values. At most one line per
`min_interval_s` (0.2 s): with N=1 and a fast engine a line per step would cost the terminal more
than the engine. When the console is off the per-step cost is a countdown: the setting is read again
every `RECHECK_STEPS` steps (the schedule handler runs with the interpreter's caches cold; read through
the runtime at every step, the setting took about a tenth of the handler's samples in py-spy), so a
changed config file turns the console on or off within that many steps.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from service_profiler.runtime import bootstrap

PREFIX = "[service-profiler]"
RECHECK_STEPS = 64


def configured_every_n() -> int:
    """`console_every_n_steps` of the running profiler's current settings (0 = off)."""
    settings = getattr(bootstrap.current_runtime(), "settings", None)
    every_n: int = getattr(settings, "console_every_n_steps", 0) or 0  # validated as an int by settings
    return every_n


def write_stderr(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class ConsoleWindow:
    """Aggregates steps between two console lines; `on_schedule` prints when a line is due."""

    def __init__(
        self,
        every_n: Callable[[], int] = configured_every_n,
        write: Callable[[str], None] = write_stderr,
        clock: Callable[[], float] = time.monotonic,
        min_interval_s: float = 0.2,
    ) -> None:
        self.every_n = every_n
        self.write = write
        self.clock = clock
        self.min_interval_s = min_interval_s
        self._window_start: float | None = None  # the first step's time; then the previous line's
        self._on = False
        self._steps_to_recheck = 0
        self._reset()

    def _reset(self) -> None:
        self.steps = 0
        self.prefill_reqs = 0
        self.decode_reqs = 0
        self.prefill_tokens = 0
        self.decode_tokens = 0
        self.schedule_ns = 0
        self.model_ns = 0
        self.model_runs = 0

    def enabled(self) -> bool:
        """Whether the console is on, the setting read again every `RECHECK_STEPS` calls (once per step)."""
        self._steps_to_recheck -= 1
        if self._steps_to_recheck <= 0:
            self.recheck()
        return self._on

    def recheck(self) -> bool:
        """Read the setting now; whether the console is on."""
        self._steps_to_recheck = RECHECK_STEPS
        self._on = self.every_n() > 0
        return self._on

    def on_model(self, duration_ns: int) -> None:
        self.model_ns += duration_ns
        self.model_runs += 1

    def on_schedule(self, batch_id: int, dp_rank: int, reqs: Sequence[tuple[Any, ...]], running: int,
                    waiting: int, kv_used: int, kv_total: int, kv_usage: float,
                    schedule_ns: int) -> str | None:
        """Account one step; print and return the line when one is due."""
        every_n = self.every_n()
        if every_n <= 0:
            return None
        now = self.clock()
        if self._window_start is None:  # not from start-up: model loading is not engine time
            self._window_start = now - schedule_ns / 1e9
        self.steps += 1
        self.schedule_ns += schedule_ns
        for entry in reqs:
            if entry[1] == 0:
                self.prefill_reqs += 1
                self.prefill_tokens += entry[2]
            else:
                self.decode_reqs += 1
                self.decode_tokens += entry[2]
        if self.steps < every_n or now - self._window_start < self.min_interval_s:
            return None
        line = self.format_line(batch_id, dp_rank, now - self._window_start, running, waiting, kv_used,
                                kv_total, kv_usage)
        self._window_start = now
        self._reset()
        self.write(line)
        return line

    def format_line(self, batch_id: int, dp_rank: int, elapsed_s: float, running: int, waiting: int,
                    kv_used: int, kv_total: int, kv_usage: float) -> str:
        steps = self.steps
        elapsed_s = max(elapsed_s, 1e-9)
        tokens = self.prefill_tokens + self.decode_tokens
        model_ms = self.model_ns / self.model_runs / 1e6 if self.model_runs else 0.0
        return (
            f"{PREFIX} dp{dp_rank} batch {batch_id} | {steps / elapsed_s:.1f} steps/s | "
            f"{tokens / steps:.1f} tok/step (P {self.prefill_tokens / steps:.1f} "
            f"D {self.decode_tokens / steps:.1f}) | reqs/step P {self.prefill_reqs / steps:.1f} "
            f"D {self.decode_reqs / steps:.1f} | running {running} waiting {waiting} | "
            f"KV {kv_usage * 100:.1f}% {kv_used}/{kv_total} | "
            f"sched {self.schedule_ns / steps / 1e6:.2f} ms model {model_ms:.2f} ms"
        )
