"""A strict validator for Chrome trace-event JSON: `validate_trace(obj) -> list[str]`.

Stricter than the viewers on purpose: Perfetto and chrome://tracing silently drop or mis-draw what
they cannot place (partial overlaps, unbalanced B/E, unnamed tracks, dangling flows), so a trace that
"loads" can still be wrong. Every problem names the event index, its phase and what was expected.
Timestamps are compared in integer nanoseconds (`round(µs * 1000)`), so float noise in `ts + dur` never
reads as an overlap.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, TypeGuard

MAX_PROBLEMS = 200
KNOWN_PHASES = frozenset("XBEiIC" "sft" "ben" "M" "NOD" "PRc" "vV")
METADATA_NAMES = {
    "process_name": "name",
    "thread_name": "name",
    "process_labels": "labels",
    "process_sort_index": "sort_index",
    "thread_sort_index": "sort_index",
}
# Phases drawn on a thread track: they need a tid and a thread_name.
THREAD_PHASES = frozenset("XBEsft")


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _ns(us: float) -> int:
    return round(us * 1000)


class _Checker:
    def __init__(self) -> None:
        self.problems: list[str] = []
        self.overflow = 0
        self.process_names: set[int] = set()
        self.thread_names: set[tuple[int, int]] = set()
        self.used_pids: dict[int, int] = {}  # pid -> first event index
        self.used_threads: dict[tuple[int, int], int] = {}
        self.slices: dict[tuple[int, int], list[tuple[int, int, int]]] = defaultdict(list)
        self.open_b: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
        self.flows: dict[tuple[str, Any], list[tuple[str, int, int]]] = defaultdict(list)
        self.asyncs: dict[tuple[int, str, Any], int] = defaultdict(int)

    def add(self, msg: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(msg)
        else:
            self.overflow += 1

    def event(self, i: int, ev: Any) -> None:
        if not isinstance(ev, dict):
            self.add(f"event {i}: expected an object, got {type(ev).__name__}")
            return
        ph = ev.get("ph")
        where = f"event {i} (ph={ph!r}, name={ev.get('name')!r})"
        if not isinstance(ph, str) or ph not in KNOWN_PHASES:
            self.add(f"{where}: unknown phase; expected one of {''.join(sorted(KNOWN_PHASES))}")
            return
        pid, tid = ev.get("pid"), ev.get("tid", 0)
        if not _is_int(pid):
            self.add(f"{where}: pid must be an integer, got {pid!r}")
            return
        needs_tid = ph in THREAD_PHASES or (ph in "iI" and ev.get("s", "t") == "t") or (
            ph == "M" and str(ev.get("name", "")).startswith("thread_"))
        if (needs_tid or "tid" in ev) and not _is_int(tid):
            self.add(f"{where}: tid must be an integer, got {tid!r}")
            return
        if ph == "M":
            self.metadata(where, ev, pid, tid)
            return
        ts = ev.get("ts")
        if not _is_num(ts) or ts < 0:
            self.add(f"{where}: ts must be a finite number >= 0, got {ts!r}")
            return
        if not isinstance(ev.get("name"), str) and ph not in "Ef":
            self.add(f"{where}: name must be a string")
        self.used_pids.setdefault(pid, i)
        if needs_tid:
            self.used_threads.setdefault((pid, tid), i)
        if "args" in ev and not isinstance(ev["args"], dict):
            self.add(f"{where}: args must be an object")
        getattr(self, f"phase_{ph}", self.phase_other)(where, ev, i, pid, tid, _ns(ts))

    def metadata(self, where: str, ev: dict[str, Any], pid: int, tid: Any) -> None:
        name = ev.get("name")
        key = METADATA_NAMES.get(name) if isinstance(name, str) else None
        args = ev.get("args")
        if key is None:
            self.add(f"{where}: unknown metadata name; expected one of {sorted(METADATA_NAMES)}")
        elif not isinstance(args, dict) or key not in args:
            self.add(f"{where}: metadata needs args.{key}")
        elif key == "sort_index" and not _is_int(args[key]):
            self.add(f"{where}: args.sort_index must be an integer")
        elif key != "sort_index" and not isinstance(args[key], str):
            self.add(f"{where}: args.{key} must be a string")
        elif name == "process_name":
            self.process_names.add(pid)
        elif name == "thread_name":
            self.thread_names.add((pid, tid))

    def phase_X(self, where: str, ev: dict[str, Any], i: int, pid: int, tid: int, ts: int) -> None:
        dur = ev.get("dur")
        if not _is_num(dur) or dur < 0:
            self.add(f"{where}: X needs dur, a finite number >= 0, got {dur!r}")
            return
        self.slices[(pid, tid)].append((ts, ts + _ns(dur), i))

    def phase_B(self, where: str, ev: dict[str, Any], i: int, pid: int, tid: int, ts: int) -> None:
        self.open_b[(pid, tid)].append((ts, i))

    def phase_E(self, where: str, ev: dict[str, Any], i: int, pid: int, tid: int, ts: int) -> None:
        stack = self.open_b[(pid, tid)]
        if not stack:
            self.add(f"{where}: E without an open B on pid {pid} tid {tid}")
            return
        begin, _ = stack.pop()
        if ts < begin:
            self.add(f"{where}: E before its B")

    def phase_i(self, where: str, ev: dict[str, Any], i: int, pid: int, tid: int, ts: int) -> None:
        if ev.get("s", "t") not in ("g", "p", "t"):
            self.add(f"{where}: instant scope s must be g, p or t, got {ev.get('s')!r}")

    phase_I = phase_i

    def phase_C(self, where: str, ev: dict[str, Any], i: int, pid: int, tid: int, ts: int) -> None:
        args = ev.get("args")
        if not isinstance(args, dict) or not args:
            self.add(f"{where}: counter needs a non-empty args object")
        elif bad := [k for k, v in args.items() if not _is_num(v)]:
            self.add(f"{where}: counter series must be finite numbers: {bad}")

    def _flow(self, where: str, ev: dict[str, Any], ph: str, i: int, ts: int) -> None:
        fid, cat = ev.get("id"), ev.get("cat")
        if fid is None or isinstance(fid, bool) or not isinstance(fid, (int, str)):
            self.add(f"{where}: flow needs an id (integer or string)")
            return
        if not isinstance(cat, str):
            self.add(f"{where}: flow needs a cat string (s/t/f are matched on cat + id)")
            return
        if "bp" in ev and (ph != "f" or ev["bp"] != "e"):
            self.add(f"{where}: bp is only allowed on f, as \"e\"")
        self.flows[(cat, fid)].append((ph, ts, i))

    def phase_s(self, where: str, ev: dict[str, Any], i: int, pid: int, tid: int, ts: int) -> None:
        self._flow(where, ev, "s", i, ts)

    def phase_t(self, where: str, ev: dict[str, Any], i: int, pid: int, tid: int, ts: int) -> None:
        self._flow(where, ev, "t", i, ts)

    def phase_f(self, where: str, ev: dict[str, Any], i: int, pid: int, tid: int, ts: int) -> None:
        self._flow(where, ev, "f", i, ts)

    def _async(self, where: str, ev: dict[str, Any], delta: int) -> None:
        aid = ev.get("id", ev.get("id2"))
        if aid is None or not isinstance(ev.get("cat"), str):
            self.add(f"{where}: async events need id and cat")
            return
        self.asyncs[(ev["pid"], ev["cat"], str(aid))] += delta

    def phase_b(self, where: str, ev: dict[str, Any], i: int, pid: int, tid: int, ts: int) -> None:
        self._async(where, ev, 1)

    def phase_e(self, where: str, ev: dict[str, Any], i: int, pid: int, tid: int, ts: int) -> None:
        self._async(where, ev, -1)

    def phase_n(self, where: str, ev: dict[str, Any], i: int, pid: int, tid: int, ts: int) -> None:
        self._async(where, ev, 0)

    def phase_other(self, where: str, ev: dict[str, Any], i: int, pid: int, tid: int, ts: int) -> None:
        """Object, sample, mark and memory-dump events: the common fields above are all we check."""

    def finish(self) -> None:
        for (pid, tid), slices in self.slices.items():
            slices.sort(key=lambda s: (s[0], -s[1]))
            stack: list[tuple[int, int, int]] = []
            for start, end, i in slices:
                while stack and stack[-1][1] <= start:
                    stack.pop()
                if stack and end > stack[-1][1]:
                    top = stack[-1]
                    self.add(f"event {i}: X [{start}, {end}] ns partially overlaps event {top[2]} "
                             f"[{top[0]}, {top[1]}] ns on pid {pid} tid {tid}")
                    continue
                stack.append((start, end, i))
        for (pid, tid), opened in self.open_b.items():
            for _, i in opened:
                self.add(f"event {i}: B without a matching E on pid {pid} tid {tid}")
        for (cat, fid), steps in self.flows.items():
            phases = [p for p, _, _ in sorted(steps, key=lambda s: (s[1], "stf".index(s[0])))]
            if phases.count("s") != 1 or phases.count("f") > 1 or phases[0] != "s":
                self.add(f"flow cat={cat!r} id={fid!r}: expected one s first and at most one f, got {phases}")
            elif phases[-1] != "f":
                self.add(f"flow cat={cat!r} id={fid!r}: never finished (no f)")
        for (pid, cat, aid), depth in self.asyncs.items():
            if depth:
                self.add(f"async pid={pid} cat={cat!r} id={aid}: {depth:+d} unbalanced b/e")
        for pid, i in self.used_pids.items():
            if pid not in self.process_names:
                self.add(f"event {i}: pid {pid} has no process_name metadata")
        for (pid, tid), i in self.used_threads.items():
            if (pid, tid) not in self.thread_names:
                self.add(f"event {i}: pid {pid} tid {tid} has no thread_name metadata")


def validate_trace(obj: Any) -> list[str]:
    """Problems with a parsed trace-event JSON object; an empty list means valid.

    At most MAX_PROBLEMS are listed, then one line with how many more were found.
    """
    if not isinstance(obj, dict):
        return [f"top level must be an object with traceEvents, got {type(obj).__name__}"]
    events = obj.get("traceEvents")
    if not isinstance(events, list):
        return ["traceEvents must be a list"]
    checker = _Checker()
    unit = obj.get("displayTimeUnit", "ms")
    if unit not in ("ms", "ns"):
        checker.add(f"displayTimeUnit must be \"ms\" or \"ns\", got {unit!r}")
    for i, ev in enumerate(events):
        checker.event(i, ev)
    checker.finish()
    if checker.overflow:
        checker.problems.append(f"... and {checker.overflow} more problems")
    return checker.problems
