"""Charge py-spy samples to the profiler or to the engine (shared by the benchmarks that use py-spy).

A py-spy raw (collapsed) file has one line per distinct stack: `thread (TID)[: NAME];frame;...;frame N`,
with `process PID:"cmdline"` frames in front when `--subprocesses` was given. Only CPU-busy samples are
in it (py-spy leaves out threads the OS reports idle), apart from a few waits it does not recognise,
which are dropped here.

A sample is the profiler's when its innermost profiler frame (a file under `service_profiler/`) is the
leaf, or calls something other than the wrapped original: time below a probe's call of the original is
the engine's own work.

One exception: a probe's frame that is the leaf on the line where it calls the original. CPython (3.11.1
on) unlinks a returning function's frame before it frees the function's locals, so py-spy charges that
freeing to the caller, on the line of the call (`pyspy_idle_check.py --teardown`: a loop calling a
function that returns after building a 200,000-element list shows its caller as the leaf in a fifth of
the samples). Below a probe, those locals are the engine's: its scheduler output, its model outputs. With
`original_calls` (the lines that call the original, `original_call_lines`) such samples are the
engine's. The call's own set-up (packing the arguments) goes with them: in a `--native` run of
`bench_engine_share.py`, most such samples were inside the C wrapper's call of the original, below any
line of the handler. Without `original_calls` (None) they are the profiler's, as the rule stood before.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

# A file of the profiler: under service_profiler/ (py-spy shortens installed paths; a source tree on
# PYTHONPATH shows its full path), or handlers/ (the old package name).
_PROFILER_FRAME = re.compile(r"\((?:[^()]*/)?service_profiler/|\(handlers/")
# Frames through which a probe calls the engine's own function: time below them is the engine's. A
# handler (every handler is named `*_handler`) calls the original through the C wrapper's `original_func`,
# which has no Python frame: the engine's function is then right below the handler's frame. (The C
# wrapper's own time, a few tens of ns per call, is charged to the engine's frame that called it.)
_CALLS_ORIGINAL = ("OriginalCall.__call__", ".timer", ".timer_with_attributes", ".timer_with_caller_filter",
                   ".async_timer", ".generator_timer", ".async_generator_timer", ".with_handler",
                   ".with_async_handler", "_handler")
_WAITING = ("Event.wait (threading.py", "Condition.wait (threading.py", "wait (threading.py")
_THREAD = re.compile(r"thread \((?:0x)?([0-9a-fA-F]+)\)")
# A probe's call of the original: `original_func(this, ...)` in a handler, `fn(*args, **kwargs)` in a timer.
_ORIGINAL_CALL = re.compile(r"(?<![\w.])(?:original_func|fn)\(")
_FRAME_LINE = re.compile(r"\((?:[^()]*/)?(service_profiler/[^():]+):(\d+)\)")


def original_call_lines(package_dir: Path) -> frozenset[str]:
    """`service_profiler/<file>:<line>` of every line of the package at `package_dir` (the directory named
    service_profiler) that calls a probe's original."""
    lines: set[str] = set()
    for path in package_dir.rglob("*.py"):
        relative = "service_profiler/" + path.relative_to(package_dir).as_posix()
        for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if _ORIGINAL_CALL.search(text.split("#", 1)[0]):
                lines.add(f"{relative}:{number}")
    return frozenset(lines)


@dataclass
class Sample:
    """One line of a raw file: `count` samples of one stack."""

    process: str
    thread_id: str
    frames: list[str]
    count: int

    def in_profiler(self, original_calls: frozenset[str] | None = None) -> bool:
        inner = [i for i, frame in enumerate(self.frames) if _PROFILER_FRAME.search(frame)]
        if not inner:
            return False
        i = inner[-1]
        calls_engine = self.frames[i].split(" (")[0].endswith(_CALLS_ORIGINAL)
        if i + 1 < len(self.frames):
            return not calls_engine
        if calls_engine and original_calls is not None:  # freeing the original's locals (module docstring)
            line = _FRAME_LINE.search(self.frames[i])
            return not (line and f"{line.group(1)}:{line.group(2)}" in original_calls)
        return True

    def innermost_profiler_frame(self) -> str | None:
        mine = [frame for frame in self.frames if _PROFILER_FRAME.search(frame)]
        return mine[-1] if mine else None


def busy_samples(raw_path: Path) -> Iterator[Sample]:
    """The busy stacks of a py-spy raw file, waits py-spy did not recognise as idle left out."""
    for line in raw_path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not stack or frames[-1].startswith(_WAITING):
            continue
        processes = [f for f in frames if f.startswith("process ")]
        process = processes[-1].split(":", 1)[1].strip('"')[:40] if processes else "?"
        thread = next((match.group(1) for f in frames if (match := _THREAD.match(f))), "?")
        yield Sample(process, thread, [f for f in frames if not f.startswith(("process ", "thread ("))],
                     int(count))


@dataclass
class Share:
    """Busy samples per group and how many of them were the profiler's."""

    total: collections.Counter[str] = field(default_factory=collections.Counter)
    profiler: collections.Counter[str] = field(default_factory=collections.Counter)

    def percent(self, group: str) -> float:
        return 100 * self.profiler[group] / self.total[group] if self.total[group] else 0.0

    @property
    def all_samples(self) -> int:
        return sum(self.total.values())

    def percent_of_all(self, group: str) -> float:
        """The group's profiler samples as a share of every busy sample (the groups' figures add up)."""
        return 100 * self.profiler[group] / self.all_samples if self.all_samples else 0.0


def share_by(raw_path: Path, group_of: Callable[[Sample], str],
             original_calls: frozenset[str] | None = None) -> Share:
    share = Share()
    for sample in busy_samples(raw_path):
        group = group_of(sample)
        share.total[group] += sample.count
        if sample.in_profiler(original_calls):
            share.profiler[group] += sample.count
    return share


def profiler_share(raw_path: Path, original_calls: frozenset[str] | None = None) -> dict[str, tuple[int, float]]:
    """Per process: (busy samples, % of them spent in profiler code)."""
    share = share_by(raw_path, lambda sample: sample.process, original_calls)
    return {name: (count, share.percent(name)) for name, count in share.total.items()}


def hot_profiler_frames(raw_path: Path, group_of: Callable[[Sample], str], top: int = 15,
                        original_calls: frozenset[str] | None = None) -> dict[str, list[tuple[str, int]]]:
    """Per group, the profiler's samples by their innermost profiler frame, most first: where its
    time goes."""
    by_group: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for sample in busy_samples(raw_path):
        if sample.in_profiler(original_calls):
            frame = sample.innermost_profiler_frame() or "?"
            # The leaf says which library call the profiler frame is waiting on (json, str, ...).
            leaf = sample.frames[-1] if sample.frames[-1] != frame else ""
            by_group[group_of(sample)][f"{frame}  <- {leaf}" if leaf else frame] += sample.count
    return {group: counts.most_common(top) for group, counts in by_group.items()}
