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
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .threads import start_daemon

FORMAT_VERSION = 1
_MAX_STR = 4096
# One "rec" line per this many records: each is encoded in one C call that holds the GIL (~0.1-0.5 ms
# for 256 scheduler records), so an engine thread never waits behind a whole second's worth of encoding.
_RECORDS_PER_LINE = 256
_GIL_BREAK_S = 50e-6

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


_encode = json.JSONEncoder(separators=(",", ":"), default=_json_default, ensure_ascii=False).encode


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
        flush_interval_s: float = 1.0,
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
        self._channels: dict[tuple[str, str, str], int] = {}
        self._channel_lines: list[str] = []  # every declaration, re-written into a child's new file
        self._pending_lines: list[str] = []
        self._lock = threading.Lock()
        # Serialises whole flushes (open, encode, write): the writer thread and close() at exit may both
        # flush, and two first flushes would each open the file and write a header.
        self._io_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        self._closed = False  # for good: a fork no longer restarts the writer in the child
        self._thread: threading.Thread | None = None
        self._file: Any = None
        self._path: Path | None = None
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
        chan = self._channels.get(key)
        if chan is not None:
            return chan
        with self._lock:
            chan = self._channels.get(key)
            if chan is None:
                chan = len(self._channels)
                decl: dict[str, object] = {"t": "chan", "id": chan, "kind": kind, "domain": domain, "name": name}
                if symbol:
                    decl["symbol"] = symbol
                self._channel_lines.append(_encode(decl))
                self._channels[key] = chan
                self._has_content = True
        return chan

    def control(self, line: dict[str, object], substantive: bool = True) -> None:
        """Queue a non-record line (meta, patch, state, warn) for the next flush.

        `substantive=False` lines (collection on/off) do not by themselves create the process's file.
        """
        encoded = _encode(line)
        with self._lock:
            self._pending_lines.append(encoded)
            self._has_content = self._has_content or substantive

    # -- writer -----------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self.run_dir / f"{socket.gethostname()}-{os.getpid()}.sprof.jsonl"

    def _open(self) -> Any:
        if self._file is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._path = self.path
            self._file = open(self._path, "a", encoding="utf-8")  # noqa: SIM115 - lives until close()
            self._role = guess_role(sys.argv)
            header = {
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
            }
            self._file.write(_encode(header) + "\n")
        return self._file

    def flush(self, final: bool = False) -> None:
        """Write everything buffered so far. Safe to call from any thread; never raises.

        `final`: the process is ending (exit, SIGTERM); passed on to `flush_hooks`."""
        for hook in self.flush_hooks:
            try:
                hook(final)
            except Exception as exc:
                _warn_once(f"service-profiler: flush hook {hook!r} failed: {exc!r}")
        try:
            self._flush()
        except Exception as exc:  # the host comes first: a full disk must not crash the engine
            _warn_once(f"service-profiler: could not write records to {self.run_dir}: {exc}")

    def _flush(self) -> None:
        with self._io_lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        with self._lock:
            if self._file is None and not self._has_content and not self.buffer:
                return
            count = len(self.buffer)
            batch = self.buffer[:count]
            # Appends racing with this slice land after index `count` and survive the delete.
            del self.buffer[:count]
            channel_lines = self._channel_lines[self._declared_upto :]
            self._declared_upto = len(self._channel_lines)
            pending, self._pending_lines = self._pending_lines, []
            # Each flush consumes one value of the counter: subtract those reads to get the drops.
            dropped_total = next(self._dropped) - self._dropped_reads
            self._dropped_reads += 1
        dropped_new = dropped_total - self._dropped_written
        if not (batch or channel_lines or pending or dropped_new):
            return
        out = self._open()
        parts = [*channel_lines, *pending]
        role = guess_role(sys.argv)
        if role != self._role:
            self._role = role
            parts.append(_encode({"t": "meta", "key": "role", "value": role}))
        if dropped_new:
            self._dropped_written = dropped_total
            parts.append(_encode({"t": "dropped", "count": dropped_new, "ts": time.perf_counter_ns()}))
        for start in range(0, len(batch), _RECORDS_PER_LINE):
            if start:
                # The C encoder holds the GIL for a whole call: between chunks, let the engine's threads
                # in (a bare sleep(0) would usually win the GIL straight back).
                time.sleep(_GIL_BREAK_S)
            parts.append(_encode({"t": "rec", "r": batch[start : start + _RECORDS_PER_LINE]}))
        out.write("\n".join(parts) + "\n")
        out.flush()

    def _run(self) -> None:
        while not self._stopped:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            self.flush()

    def start(self) -> None:
        """Start the writer thread and register exit / SIGTERM / fork hooks (once per process)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._thread = start_daemon(self._run, "writer")

    def close(self) -> None:
        self._stopped = True
        self._closed = True
        self._wake.set()
        self.flush(final=True)
        if self._file is not None:
            try:
                self._file.close()
            except Exception:
                pass
            self._file = None

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
        self._lock = threading.Lock()
        self._io_lock = threading.Lock()
        self.buffer.clear()
        self._pending_lines = []
        self._declared_upto = 0
        self._dropped = itertools.count()
        self._dropped_reads = 0
        self._dropped_written = 0
        self._file = None
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
    if message not in _warned:
        _warned.add(message)
        print(message, file=sys.stderr)


def install_sigterm_flush(flush: Callable[[], None]) -> bool:
    """Flush on SIGTERM, where the process would otherwise die without running atexit.

    Installed only when SIGTERM still has its default action and only from the main thread; the
    handler flushes, restores the default action and re-sends the signal, so the process ends exactly
    as it would have (same signal, same exit status). Engines that install their own handler exit
    through atexit, which flushes too.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return False

        def _on_sigterm(signum: int, frame: object) -> None:
            try:
                flush()
            finally:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)

        signal.signal(signal.SIGTERM, _on_sigterm)
        return True
    except (ValueError, OSError):
        return False


def _boot_id() -> str | None:
    """This boot of this host (Linux): processes with the same hostname and boot id share one
    monotonic clock, so the reader lines them up with one anchor. None where it cannot be read."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            return handle.read(64).strip() or None
    except OSError:
        return None
