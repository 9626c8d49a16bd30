"""The in-process record buffer and the raw file writer (format: docs/DESIGN.md, "Raw file format").

The hot path only appends a tuple to `Recorder.buffer`; everything else (JSON encoding, file I/O,
channel declarations) happens on a background writer thread at least every `flush_interval_s`, at
interpreter exit and on SIGTERM. The buffer is bounded: past `max_buffered` records new ones are
dropped and counted, and the count is written to the file — never unbounded growth, never hidden loss.
"""

from __future__ import annotations

import atexit
import itertools
import json
import multiprocessing
import multiprocessing.util as mp_util
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .rawwriter import UNENCODABLE, LostRecords, RawFile, encode_records
from .signalsafe import GuardedLock, install_sigterm_flush, reset_after_fork
from .speedups import encode_rec_line
from .threads import start_daemon

__all__ = ["COUNTER", "EVENT", "SPAN", "Recorder", "guess_role", "install_sigterm_flush"]

FORMAT_VERSION = 1
_MAX_STR = 4096
# One "rec" line per this many records: each is encoded in one C call that holds the GIL (~0.1-0.5 ms
# for 256 scheduler records), so an engine thread never waits behind a whole second's worth of encoding.
_RECORDS_PER_LINE = 256
_GIL_BREAK_S = 50e-6
# The writer looks at the buffer this often, and flushes before the interval is up once it holds this
# many records (a burst is on disk sooner, and encoding it stays short).
_WRITER_TICK_S = 0.1
_EARLY_FLUSH_RECORDS = 20_000
# An idle process still says every so often that its file is complete up to now.
_IDLE_FLUSHED_EVERY_NS = 10_000_000_000

SPAN, EVENT, COUNTER = "span", "event", "counter"


def _json_default(value: object) -> object:
    # Attribute values are whatever an expression or handler produced; anything JSON cannot encode
    # natively is written as its (bounded) string form rather than failing the whole batch.
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    try:
        text = str(value)
    except Exception:
        text = f"<unprintable {type(value).__name__}>"
    return text[:_MAX_STR]


# No circular-reference check: it keeps a dict of every container being encoded, a fifth of the
# encoder's time on scheduler records. A cycle still fails (RecursionError at the encoder's depth limit)
# and costs only its own record (`encode_records`).
_encode = json.JSONEncoder(separators=(",", ":"), default=_json_default, ensure_ascii=False,
                           check_circular=False).encode


def guess_role(argv: list[str]) -> str:
    """A first guess of the process role; handlers refine it with `record.meta("role", ...)`."""
    name = multiprocessing.current_process().name
    if name != "MainProcess":
        return name
    joined = " ".join(argv)
    if "serve" in argv or "api_server" in joined:
        return "APIServer"
    return "main"


class Recorder:
    """Buffers records of one process and appends them to `<run_dir>/<host>-<pid>.sprof.jsonl`."""

    def __init__(
        self,
        run_dir: Path,
        *,
        flush_interval_s: float = 0.1,
        max_buffered: int = 1_000_000,
        engine: dict[str, str] | None = None,
        profiler_version: str = "",
    ) -> None:
        self.run_dir = run_dir
        self.flush_interval_s = flush_interval_s
        self.max_buffered = max_buffered
        self.engine = engine
        self.profiler_version = profiler_version
        # The buffer object is never replaced: wrappers hold a reference to it (and to its append).
        self.buffer: list[tuple[Any, ...]] = []
        self._dropped = itertools.count()
        self._dropped_reads = 0
        self._dropped_written = 0
        # (kind, domain, name) -> channel id; read without the lock by the hot path (a dict lookup is
        # atomic under the GIL), which calls `channel()` only for a key not in it yet.
        self.channel_ids: dict[tuple[str, str, str], int] = {}
        self._channel_lines: list[str] = []  # every declaration, re-written into a child's new file
        self._pending_lines: list[str] = []
        # Guarded: the SIGTERM handler runs on the main thread and must never wait on a lock the
        # main thread holds (see signalsafe).
        self._lock = GuardedLock()
        # Serialises whole flushes (open, encode, write): the writer thread and close() at exit may both
        # flush, and two first flushes would each open the file and write a header.
        self._io_lock = GuardedLock()
        self._wake = threading.Event()
        self._stopped = False
        self._closed = False  # for good: a fork no longer restarts the writer in the child
        self._thread: threading.Thread | None = None
        self._file = RawFile(self.path)
        self._lost = LostRecords()  # records a failed write took with it, until a write works again
        self._file_started = False  # the header is written
        self._unencodable = 0  # records written with their attributes replaced by a marker
        self._unencodable_first = ""
        self._flushed_at = 0  # `until` of the last `flushed` line
        self._closed_written = False  # the last thing written is a `close` line
        self._role = ""
        self._declared_upto = 0
        # A process that never declares a channel nor reports anything writes no file at all (vLLM's
        # helper processes — resource trackers, compile workers — would otherwise leave empty files).
        self._has_content = False
        # Called with `final` at the start of every flush, on the flushing thread (e.g. the runtime
        # re-writing failure counts); each runs in its own try/except.
        self.flush_hooks: list[Callable[[bool], None]] = []
        self._init_process_state()

    # -- hot path helpers -------------------------------------------------------------------------

    def count_dropped(self) -> None:
        """Called by the hot path when the buffer is full (itertools.count is atomic under the GIL)."""
        next(self._dropped)

    # -- channels and control lines ---------------------------------------------------------------

    def channel(self, kind: str, domain: str, name: str, symbol: str | None = None) -> int:
        """Return the id of a (kind, domain, name) channel, declaring it on first use."""
        key = (kind, domain, name)
        chan = self.channel_ids.get(key)
        if chan is not None:
            return chan
        with self._lock:
            chan = self.channel_ids.get(key)
            if chan is None:
                chan = len(self.channel_ids)
                decl: dict[str, object] = {"t": "chan", "id": chan, "kind": kind, "domain": domain, "name": name}
                if symbol:
                    decl["symbol"] = symbol
                self._channel_lines.append(_encode(decl))
                self.channel_ids[key] = chan
                self._has_content = True
        return chan

    def control(self, line: dict[str, object], substantive: bool = True) -> None:
        """Queue a non-record line (meta, patch, state, warn) for the next flush.

        `substantive=False` lines (collection on/off) do not by themselves create the process's file.
        """
        try:
            encoded = _encode(line)
        except Exception as exc:  # e.g. a meta value nested too deep: keep the line, mark the value
            encoded = _encode({key: value if isinstance(value, str | int | float | bool | None)
                               else {UNENCODABLE: f"{type(exc).__name__}: {exc}"[:300]}
                               for key, value in line.items()})
        with self._lock:
            self._pending_lines.append(encoded)
            self._has_content = self._has_content or substantive

    # -- writer -----------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self.run_dir / f"{socket.gethostname()}-{os.getpid()}.sprof.jsonl"

    def _header(self) -> str:
        self._role = guess_role(sys.argv)
        return _encode({
            "t": "header",
            "format": FORMAT_VERSION,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "role": self._role,
            "argv": sys.argv[:32],
            "profiler_version": self.profiler_version,
            "engine": self.engine,
            "clock": {"wall_ns": time.time_ns(), "mono_ns": time.perf_counter_ns()},
            "boot_id": _boot_id(),
        })

    def flush(self, final: bool = False, reason: str | None = None) -> None:
        """Write everything buffered so far. Safe to call from any thread; never raises.

        `final`: the process is ending (exit, SIGTERM, the engine's shutdown); passed on to
        `flush_hooks`, and a `close` line with `reason` (default "exit") ends what is written."""
        for hook in self.flush_hooks:
            try:
                hook(final)
            except Exception as exc:
                _warn_once(f"service-profiler: flush hook {hook!r} failed: {exc!r}")
        try:
            with self._io_lock:
                self._flush_locked(final, reason or "exit")
        except Exception as exc:  # the host comes first: nothing here may crash the engine
            _warn_once(f"service-profiler: could not write records to {self.run_dir}: {exc!r}")

    def _flush_locked(self, final: bool, reason: str) -> None:
        # Every record handed over before this point and ending by it is in the file once this flush
        # succeeds: the `flushed` line says so.
        until = time.perf_counter_ns()
        with self._lock:
            if not self._file_started and not self._has_content and not self.buffer:
                return
            count = len(self.buffer)
            batch = self.buffer[:count]
            # Appends racing with this slice land after index `count` and survive the delete.
            del self.buffer[:count]
            declared_upto = len(self._channel_lines)
            channel_lines = self._channel_lines[self._declared_upto : declared_upto]
            pending, self._pending_lines = self._pending_lines, []
            # Each flush consumes one value of the counter: subtract those reads to get the drops.
            dropped_total = next(self._dropped) - self._dropped_reads
            self._dropped_reads += 1
        dropped_new = dropped_total - self._dropped_written
        idle = not (batch or channel_lines or pending or dropped_new or self._lost.count)
        # Nothing new: a final flush still closes a file that has no `close` yet, and an idle file says
        # now and then that it is complete up to now.
        must_close = final and self._file_started and not self._closed_written
        if idle and not must_close and (not self._file_started or self._closed_written
                                        or until - self._flushed_at < _IDLE_FLUSHED_EVERY_NS):
            return
        try:
            parts = [] if self._file_started else [self._header()]
            parts += [*channel_lines, *pending]
            role = guess_role(sys.argv)
            if role != self._role:
                self._role = role
                parts.append(_encode({"t": "meta", "key": "role", "value": role}))
            if dropped_new:
                parts.append(_encode({"t": "dropped", "count": dropped_new, "ts": time.perf_counter_ns()}))
            records, problems = encode_records(batch, _RECORDS_PER_LINE, _encode, _GilBreaks(), encode_rec_line)
            parts += records
            if problems.replaced:
                self._unencodable += problems.replaced
                self._unencodable_first = self._unencodable_first or problems.first_error
                parts.append(_encode({"t": "warn", "count": self._unencodable, "msg": (
                    f"records whose attributes the encoder cannot write (first: {self._unencodable_first}) are "
                    f'written with {{"{UNENCODABLE}": "<why>"}} as their attributes')}))
            if problems.lost:
                parts.append(_encode({"t": "lost", "count": problems.lost, "reason": "encode_error",
                                      "from_ts": problems.from_ts, "to_ts": problems.to_ts,
                                      "msg": problems.first_error}))
            if self._lost.count:
                parts.append(_encode(self._lost.line("write_error")))
            parts.append(_encode({"t": "flushed", "until": until}))
            if final:
                parts.append(_encode({"t": "close", "ts": time.perf_counter_ns(), "reason": reason}))
            data = ("\n".join(parts) + "\n").encode("utf-8", "backslashreplace")  # lone surrogates
            self._file.open()
            self._file.write(data)
        except Exception as exc:  # OSError: disk full, I/O error; anything else: the batch is counted too
            # Channel declarations and control lines are written again next time; the records are
            # counted, and said to be lost as soon as a write works again.
            with self._lock:
                self._pending_lines[:0] = pending
            self._lost.add(batch, f"{type(exc).__name__}: {exc}")
            _warn_once(f"service-profiler: cannot write to {self._file.path} ({exc}); records are counted as "
                       "lost until writing works again")
            return
        self._declared_upto = declared_upto
        self._dropped_written = dropped_total
        if self._lost.count:
            self._lost = LostRecords()
        self._file_started = True
        self._flushed_at = until
        self._closed_written = final

    def _run(self) -> None:
        # Wakes often but flushes only every `flush_interval_s`, or sooner once the buffer holds
        # `_EARLY_FLUSH_RECORDS`: a process killed outright (SIGKILL) loses at most about one interval.
        last = time.monotonic()
        while not self._stopped:
            self._wake.wait(min(_WRITER_TICK_S, self.flush_interval_s))
            woken = self._wake.is_set()
            self._wake.clear()
            now = time.monotonic()
            if woken or now - last >= self.flush_interval_s or len(self.buffer) >= _EARLY_FLUSH_RECORDS:
                last = now
                self.flush()

    def start(self) -> None:
        """Start the writer thread and register exit / SIGTERM / fork hooks (once per process)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._thread = start_daemon(self._run, "writer")

    def close(self, reason: str = "exit") -> None:
        self._stopped = True
        self._closed = True
        self._wake.set()
        self.flush(final=True, reason=reason)
        with self._io_lock:
            self._file.close()  # a later flush (a second close, atexit after close) re-opens it

    # -- process lifecycle ------------------------------------------------------------------------

    def _init_process_state(self) -> None:
        atexit.register(self.close)
        # multiprocessing's fork children leave through os._exit(), skipping atexit: flush from its
        # exit finalizers instead (registered in the child, after multiprocessing clears them).
        mp_util.register_after_fork(self, Recorder._register_exit_flush)
        if hasattr(os, "register_at_fork"):
            # Lambdas, not bound methods: the child replaces self._lock, and a later fork in the child
            # must take the child's lock, not the parent's copy that stays held forever.
            os.register_at_fork(
                before=lambda: self._lock.acquire(),
                after_in_parent=lambda: self._lock.release(),
                after_in_child=self._after_fork_in_child,
            )

    def _register_exit_flush(self) -> None:
        mp_util.Finalize(None, self.close, exitpriority=-1000)

    def _after_fork_in_child(self) -> None:
        # Threads do not survive fork and the parent's records belong to the parent's file: start a
        # fresh file for this pid, re-declare every channel in it and restart the writer.
        reset_after_fork()
        self._lock = GuardedLock()
        self._io_lock = GuardedLock()
        self.buffer.clear()
        self._pending_lines = []
        self._declared_upto = 0
        self._dropped = itertools.count()
        self._dropped_reads = 0
        self._dropped_written = 0
        self._file = RawFile(self.path)  # the parent's descriptor stays the parent's (not closed here)
        self._lost = LostRecords()
        self._file_started = False
        self._unencodable = 0
        self._unencodable_first = ""
        self._flushed_at = 0
        self._closed_written = False
        # The parent's channels are re-declared in this file only once the child records something:
        # a forked helper that never does (a pool worker, a resource tracker) leaves no file behind.
        self._has_content = False
        self._thread = None
        self._stopped = False
        self._wake = threading.Event()
        if not self._closed:
            self.start()


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """Say it once in the process's log (stderr); never raises, also inside a signal handler."""
    if message not in _warned:
        _warned.add(message)
        try:
            print(message, file=sys.stderr)
        except Exception:
            pass


class _GilBreaks:
    """Called between two encoded lines of one flush: once the writer has held the GIL for the
    interpreter's switch interval it lets the engine's threads in (a bare sleep(0) would usually win the
    GIL straight back). An engine thread then waits behind the encoding no longer than Python's own
    thread switching would make it wait, and the GIL changes hands as seldom as that allows: each
    hand-over wakes both threads, which on a busy host costs more than the encoding in between."""

    __slots__ = ("_hold_s", "_since")

    def __init__(self) -> None:
        self._hold_s = sys.getswitchinterval()
        self._since = time.perf_counter()

    def __call__(self) -> None:
        if time.perf_counter() - self._since >= self._hold_s:
            time.sleep(_GIL_BREAK_S)
            self._since = time.perf_counter()


def _boot_id() -> str | None:
    """This boot of this host (Linux): processes with the same hostname and boot id share one
    monotonic clock, so the reader lines them up with one anchor. None where it cannot be read."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            return handle.read(64).strip() or None
    except OSError:
        return None
