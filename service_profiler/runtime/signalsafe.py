"""Locks a signal handler can reason about, and the SIGTERM flush built on them.

A Python signal handler runs on the main thread, between two bytecodes of whatever the main thread was
doing. If that was inside one of the recorder's locks (the exit flush, declaring a channel, a fork
hook), a handler that waits on the same lock waits for itself forever. `GuardedLock` counts, for the
main thread only, how deep it is inside (or about to enter) any guarded lock; the SIGTERM handler then
either flushes at once (the main thread holds none: waiting on another thread is bounded) or leaves the
flush to the moment the main thread leaves its last guarded lock. Either way the process then ends as
it would have without us: default action restored, same signal re-sent.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any


class _MainThreadState:
    """Per process; only ever changed by the main thread (or in a fork child before it runs code)."""

    __slots__ = ("deferred", "inside")

    def __init__(self) -> None:
        self.inside = 0  # guarded locks the main thread holds or is waiting for
        self.deferred: Callable[[], None] | None = None  # run when `inside` drops back to 0


_state = _MainThreadState()


def _is_main() -> bool:
    return threading.get_ident() == threading.main_thread().ident


def _leave_main() -> None:
    _state.inside -= 1
    if _state.inside == 0 and _state.deferred is not None:
        action, _state.deferred = _state.deferred, None
        action()


class GuardedLock:
    """A plain (non-reentrant) lock that tells a signal handler whether the main thread is in it.

    Not for hot paths: each acquire asks which thread it is on."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def acquire(self) -> bool:
        if not _is_main():
            return self._lock.acquire()
        # Counted before waiting: a signal arriving while the main thread waits here must not wait
        # on the lock too (the main thread would take it right after the handler returns).
        _state.inside += 1
        try:
            return self._lock.acquire()
        except BaseException:  # e.g. KeyboardInterrupt raised by a SIGINT handler while waiting
            _leave_main()
            raise

    def release(self) -> None:
        self._lock.release()
        # Counted down after releasing: a signal in between sees the main thread still inside and
        # defers, and the deferred flush then runs right here.
        if _is_main():
            _leave_main()

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def reset_after_fork() -> None:
    """In a fork child: the forking thread is the child's main thread and holds no lock of ours."""
    _state.inside = 0
    _state.deferred = None


def run_when_main_thread_free(action: Callable[[], None]) -> None:
    """Run `action` now unless the main thread (which must be the caller) is inside a guarded lock;
    then run it as soon as it leaves the last one."""
    if _state.inside:
        _state.deferred = action
    else:
        action()


def install_sigterm_flush(flush: Callable[[str], None]) -> bool:
    """Flush on SIGTERM, where the process would otherwise die without running atexit.

    Installed only when SIGTERM still has its default action and only from the main thread. The
    handler calls `flush("signal:SIGTERM")` (never waiting on a guarded lock the main thread holds),
    restores the default action and re-sends the signal, so the process ends exactly as it would have
    (same signal, same exit status). Engines that install their own handler exit through atexit (and
    the engine's shutdown hooks), which flush too.
    """
    if not _is_main():
        return False
    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return False
        terminating = False

        def finish(signum: int) -> None:
            try:
                flush(f"signal:{signal.Signals(signum).name}")
            except BaseException:
                pass  # nothing may stop the process from ending as it would have
            finally:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

        def on_sigterm(signum: int, frame: object) -> None:
            nonlocal terminating
            if terminating:
                return  # a second SIGTERM while the first one's flush runs: it ends the process anyway
            terminating = True
            run_when_main_thread_free(lambda: finish(signum))

        signal.signal(signal.SIGTERM, on_sigterm)
        return True
    except (ValueError, OSError):
        return False
