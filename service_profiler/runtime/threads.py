"""Background threads of the profiler, named so that `top -H`, py-spy and /proc show whose CPU it is.

Python (before 3.14) does not pass a thread's name to the OS, so every thread of an engine process
looks alike there; these threads set their kernel name (15 characters, Linux prctl) when they start.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

_PR_SET_NAME = 15


def _name_this_thread(name: str) -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except Exception:  # naming is a nicety: never a reason to fail
        pass


def start_daemon(target: Callable[[], Any], name: str) -> threading.Thread:
    """Start a daemon thread called `name` (Python) and `sprof-<name>` (kernel, as far as it fits)."""

    def run() -> None:
        _name_this_thread(f"sprof-{name}")
        target()

    thread = threading.Thread(target=run, name=f"service-profiler-{name}", daemon=True)
    thread.start()
    return thread
