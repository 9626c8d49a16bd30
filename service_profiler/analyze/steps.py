"""Running analyze's exporters: each one's failure is reported, never raised, and a step run in
another process comes back as an `Outcome` (what it produced, notes, failures)."""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

Outcome = tuple[list[Path], list[str], list[str]]  # produced, notes, failures


def receive_outcomes(conn: Any, proc: Any, labels: list[str]) -> list[Outcome]:
    """The outcomes an exporter child sent, one per step; steps it never reported (it died) become
    failures naming its exit code."""
    try:
        outcomes: list[Outcome] = conn.recv()
    except (EOFError, OSError):
        outcomes = []
    conn.close()
    proc.join()
    return outcomes + [([], [], [f"{label}: the exporter process died (exit code {proc.exitcode})"])
                       for label in labels[len(outcomes):]]


def receive_forked(recv: Any, pid: int | None, label: str) -> list[Outcome]:
    """The outcome of a step run in a process forked with os.fork (`command._Feeder._fork_step`); a
    failure naming the step when it died."""
    if recv is None or pid is None:
        return [([], [], [f"{label}: could not start its process (fork failed)"])]
    try:
        outcome: Outcome = recv.recv()
    except (EOFError, OSError):
        outcome = ([], [], [f"{label}: the exporter process died"])
    recv.close()
    os.waitpid(pid, 0)
    return [outcome]


def run_step(label: str, fn: Callable[[], Any], progress: Callable[[str], None]) -> Outcome:
    """Run one exporter; its failure is reported, never raised (it must not cost the other outputs)."""
    produced: list[Path] = []
    notes: list[str] = []
    try:
        result = fn()
    except Exception as exc:  # an exporter's bug must not cost the user the other outputs
        progress(f"{label}: FAILED ({type(exc).__name__}: {exc})")
        return [], [], [f"{label}: {type(exc).__name__}: {exc}"]
    if isinstance(result, str):
        if "skipped" in result:
            notes.append(result)
        progress(result)
        return [], notes, []
    if isinstance(result, Path):
        produced.append(result)
    elif isinstance(result, list):
        produced.extend(p for p in result if isinstance(p, Path))
    progress(f"{label} done")
    return produced, notes, []


def merge(outcome: Outcome, produced: list[Path], notes: list[str], failures: list[str]) -> None:
    produced.extend(outcome[0])
    notes.extend(outcome[1])
    failures.extend(outcome[2])


def fork_context() -> Any:
    """multiprocessing's fork context where the platform has one (Linux), else None (run in-process)."""
    if os.environ.get("SERVICE_PROFILER_NO_FORK") or "fork" not in multiprocessing.get_all_start_methods():
        return None
    return multiprocessing.get_context("fork")


def start_forked(name: str, target: Callable[..., None], args: tuple[Any, ...] = ()) -> tuple[Any, Any] | None:
    """Start `target(conn, *args)` in a forked daemon process joined to this one by a duplex pipe;
    (the process, this process's end of the pipe), or None where fork is unavailable or fails (out of
    processes or memory): the caller then runs the work in-process."""
    ctx = fork_context()
    if ctx is None:
        return None
    for stream in (sys.stdout, sys.stderr):  # else the child flushes the parent's pending text again
        stream.flush()
    parent_end, child_end = ctx.Pipe(duplex=True)
    proc = ctx.Process(target=_forked, args=(target, child_end, parent_end, args), name=name, daemon=True)
    try:
        proc.start()
    except OSError:
        parent_end.close()
        child_end.close()
        return None
    child_end.close()
    return proc, parent_end


def _forked(target: Callable[..., None], conn: Any, parent_end: Any, args: tuple[Any, ...]) -> None:
    parent_end.close()  # the child's copy: EOF on `conn` must mean the parent is gone
    target(conn, *args)
