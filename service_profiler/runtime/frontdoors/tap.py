"""The record sink the front doors put in front of the runtime.

Every `record.*` call of the handlers still reaches the runtime (and the raw file) exactly as before; the
scheduler records the front doors need are also kept, by reference, in a deque (one append on the engine's
thread, nothing else). The recorder calls `on_flush` on its writer thread at every flush (at least every
`flush_interval_s`, and at exit / SIGTERM with `final`), where the records become rows and files.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

from ... import record
from .batch_join import BatchJoiner
from .batch_lines import batch_line, encode
from .options import FrontDoorOptions
from .scheduler_tables import COLUMNS, SchedulerTables
from .sinks import CsvTablesWriter, JsonlWriter

MAX_QUEUED = 1 << 20
"""Records held between two flushes at most; beyond that they are counted as lost and reported."""
CSV_FLUSH_ITERATIONS = 100
CSV_FLUSH_INTERVAL_S = 60.0

WANTED = SchedulerTables.WANTED
_DOMAINS = frozenset(domain for domain, _ in WANTED)
_NAMES = frozenset(name for _, name in WANTED)
_LINE_PARTS = {"batchFrameworkProcessing": "schedule", "modelExec": "model", "updateFromOutput": "update",
               "step": "step"}


class FrontDoorTap:
    """`record.RecordSink` in front of the runtime; one per process."""

    def __init__(self, runtime: Any, options: FrontDoorOptions) -> None:
        self.runtime = runtime
        self.options = options
        self._start_process()

    def _start_process(self) -> None:
        self.lock = threading.Lock()
        self.queue: deque[tuple[str, str, int, int, Any]] = deque()
        self.dropped = 0
        self.t0 = time.perf_counter_ns()
        self.wall_offset_ns = time.time_ns() - time.perf_counter_ns()
        self.block_bytes: int | None = None
        options, problem = self.options, self._problem
        self.lines = BatchJoiner() if options.profiling_log is not None else None
        self.jsonl = JsonlWriter(options.profiling_log, problem) if options.profiling_log is not None else None
        self.tables = SchedulerTables(self.t0, self.wall_offset_ns) if options.log_dir is not None else None
        self.csv = CsvTablesWriter(options.log_dir, COLUMNS, problem) if options.log_dir is not None else None
        self.csv_written_at = time.monotonic()
        self.csv_iterations = 0

    def after_fork_in_child(self) -> None:
        # The parent's records and files are the parent's; this process starts its own.
        self._start_process()

    def _problem(self, message: str) -> None:
        try:
            self.runtime.problem(f"front door: {message}")
        except Exception:
            pass

    # -- record.RecordSink (engine threads) ---------------------------------------------------------

    def domain_enabled(self, domain: str) -> bool:
        runtime = self.runtime
        return runtime.domain_enabled(domain) or (runtime.enabled and domain in _DOMAINS)

    def _keep(self, domain: str, name: str, start: int, end: int, attrs: Any) -> None:
        queue = self.queue
        if len(queue) < MAX_QUEUED:
            queue.append((domain, name, start, end, attrs))
        else:
            self.dropped += 1

    def span(self, domain: str, name: str, start_ns: int, end_ns: int, tid: int, attrs: Any) -> None:
        runtime = self.runtime
        if runtime.domain_enabled(domain):
            runtime.span(domain, name, start_ns, end_ns, tid, attrs)
        if name in _NAMES:
            self._keep(domain, name, start_ns, end_ns, attrs)

    def event(self, domain: str, name: str, ts_ns: int, tid: int, attrs: Any) -> None:
        runtime = self.runtime
        if runtime.domain_enabled(domain):
            runtime.event(domain, name, ts_ns, tid, attrs)
        if name in _NAMES:
            self._keep(domain, name, ts_ns, ts_ns, attrs)

    def counter(self, domain: str, name: str, ts_ns: int, values: Mapping[str, float]) -> None:
        runtime = self.runtime
        if runtime.domain_enabled(domain):
            runtime.counter(domain, name, ts_ns, values)

    def meta(self, key: str, value: object) -> None:
        if key == "kv_block_bytes" and isinstance(value, int):
            self.block_bytes = value
        self.runtime.meta(key, value)

    def flush_final(self, reason: str) -> None:
        """`record.process_ending` (the engine's own shutdown): the runtime's final flush, which drains
        this tap too (`on_flush(final=True)`), before a supervisor can cut the teardown short."""
        self.runtime.flush_final(reason)

    # -- recorder flush hook (writer thread) --------------------------------------------------------

    def on_flush(self, final: bool) -> None:
        with self.lock:
            self._drain(final)

    def _drain(self, final: bool) -> None:
        queue, lines, tables = self.queue, self.lines, self.tables
        if tables is not None:
            tables.block_bytes = self.block_bytes
        for _ in range(len(queue)):
            domain, name, start, end, attrs = queue.popleft()
            if not isinstance(attrs, dict):
                continue
            if tables is not None:
                tables.feed(domain, name, start, end, attrs)
            if lines is not None and name in _LINE_PARTS and (domain, name) in WANTED:
                getattr(lines, _LINE_PARTS[name])(start, end, attrs)
        if lines is not None and self.jsonl is not None:
            released = lines.release(final)
            if released:
                self.jsonl.write([encode(batch_line(b, self.wall_offset_ns)) for b in released], released[0].dp_rank)
        # Only the engine process writes the CSVs: one that never scheduled (the API server) must not
        # replace them with empty tables when it exits.
        if tables is not None and self.csv is not None and tables.dp_rank is not None:
            tables.release(final)
            now = time.monotonic()
            # due once another hundred iterations is complete since the last write: the file then holds
            # every whole hundred at each flush, however many steps one flush interval saw
            due = tables.iterations_released // CSV_FLUSH_ITERATIONS > self.csv_iterations // CSV_FLUSH_ITERATIONS
            if final or due or now - self.csv_written_at >= CSV_FLUSH_INTERVAL_S:
                rows = tables.take()
                if final or any(rows.values()):
                    self.csv.write(rows, tables.dp_rank)
                self.csv_iterations = tables.iterations_released
                self.csv_written_at = now
        if final:
            self._report_losses()

    def _report_losses(self) -> None:
        if self.dropped:
            self._problem(f"{self.dropped} scheduler records were not kept (more than {MAX_QUEUED} between two "
                          "flushes); the front-door files miss the steps they belonged to")
        for writer in (self.jsonl, self.csv):
            if writer is not None and writer.lost:
                self._problem(f"{writer.what}: {writer.lost} rows could not be written")


def install(runtime: Any, options: FrontDoorOptions) -> FrontDoorTap:
    """Put the tap in front of a started runtime (after `Runtime.start`, which installs the runtime as the
    record sink)."""
    tap = FrontDoorTap(runtime, options)
    record.set_sink(tap)
    runtime.recorder.flush_hooks.append(tap.on_flush)
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=tap.after_fork_in_child)
    return tap
