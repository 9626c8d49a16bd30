"""Checks of what a raw file holds that the reader cannot take as it is (rawfile.py): header fields,
timestamps, patch reports, escaped lone surrogates. Each bad value is read as unknown (or as text) and
reported; nothing here raises on bad data."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1

# A \uD800-\uDFFF escape that is not half of a pair: text no UTF-8 file, CSV or database can hold
_LONE_SURROGATE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
                             rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}")


def lone_surrogates_replaced(line: bytes) -> bytes:
    """The line with each lone surrogate escape replaced by U+FFFD."""
    # one byte first: memchr, where a two-byte search runs at a tenth of its speed (most lines have no escape)
    return _LONE_SURROGATE.sub(rb"\\ufffd", line) if b"\\" in line and b"\\u" in line else line


def non_finite_spelled(value: Any) -> Any:
    """`value` with each NaN or infinite float as the text "NaN", "Infinity" or "-Infinity": the writer
    writes them as JavaScript does, and JSON has no such number (a strict parser, a browser's, rejects a
    file holding one). A number read from such a text is the same float again. A value nested deeper
    than this walk can go (hundreds of levels: no writer's) is returned as it is."""
    try:
        return _spelled(value)
    except RecursionError:
        return value


def _spelled(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, list):
        return [_spelled(v) for v in value]
    if isinstance(value, dict):
        return {k: _spelled(v) for k, v in value.items()}
    return value


_fast_loads: Callable[[bytes], Any] | None
try:
    from orjson import JSONDecodeError as _FastDecodeError
    from orjson import loads as _fast_loads
except ImportError:  # the standard library alone: every line takes the checked path
    _fast_loads = None


def parse_line(line: bytes) -> Any:
    """One raw line as JSON: by orjson where installed; a line it rejects (a lone surrogate escape,
    NaN / Infinity, nesting past its limit) by the standard library, lone surrogates replaced first
    (text no UTF-8 CSV or database can hold). Raises ValueError / RecursionError on a corrupt line."""
    if _fast_loads is not None:
        try:
            return _fast_loads(line)
        except _FastDecodeError:
            pass
    return json.loads(lone_surrogates_replaced(line))


MAX_TS = 2**62  # timestamps (ns) and clock anchors are in [0, MAX_TS): epoch ns stay within int64


def int_or_none(value: Any) -> int | None:
    return value if value.__class__ is int else None


def clock_anchor(header: dict[str, Any]) -> tuple[int, int] | None:
    """The header's (wall_ns, mono_ns) anchor, None when missing or malformed."""
    clock = header.get("clock")
    if not isinstance(clock, dict):
        return None
    wall, mono = int_or_none(clock.get("wall_ns")), int_or_none(clock.get("mono_ns"))
    if wall is None or mono is None or not (0 <= wall < MAX_TS and 0 <= mono < MAX_TS):
        return None
    return wall, mono


def process_identity(header: dict[str, Any]) -> tuple[Any, ...]:
    """What makes two raw files copies of one process's file: host, pid and clock anchor (hashable
    whatever the header holds)."""
    host, pid = header.get("hostname"), header.get("pid")
    return (host if isinstance(host, str) else repr(host), pid if isinstance(pid, int) else repr(pid),
            clock_anchor(header) or repr(header.get("clock")))


def header_problems(path: Path, header: dict[str, Any]) -> list[str]:
    """What is wrong with a header's fields (each is then read as unknown, the file still is read)."""
    out = []
    for key, kind, what in (("hostname", str, "a string"), ("pid", int, "an integer"), ("ppid", int, "an integer"),
                            ("role", str, "a string"), ("profiler_version", str, "a string")):
        value = header.get(key)
        if value is not None and (value.__class__ is not kind):
            out.append(f"{path}:1: header {key} {short_text(value)} is not {what}; read as unknown")
    if header.get("format") != FORMAT_VERSION:
        out.append(f"{path}:1: format {short_text(header.get('format'))} is not {FORMAT_VERSION}; read as version 1")
    if clock_anchor(header) is None:
        out.append(f"{path}:1: header has no valid clock anchor (clock.wall_ns, clock.mono_ns: integers in "
                   f"[0, 2^62)); timestamps left unaligned")
    return out


def short_text(value: Any, limit: int = 60) -> str:
    text = ascii(value) if not isinstance(value, list | dict) else ascii(value)[:limit]
    return text if len(text) <= limit else text[:limit] + "..."


def valid_ts(value: Any) -> int | None:
    return value if value.__class__ is int and 0 <= value < MAX_TS else None


def patch_items(value: Any) -> list[Any]:
    """A patch report's list: symbol names, or {symbol, reason} objects; anything else as its text."""
    if not isinstance(value, list):
        return [] if value is None else [short_text(value)]
    out: list[Any] = []
    for item in value:
        if isinstance(item, dict):
            out.append({"symbol": str(item.get("symbol", "?")), "reason": str(item.get("reason", ""))})
        else:
            out.append(item if isinstance(item, str) else short_text(item))
    return out


SAME_CLOCK_NS = 1_000_000_000  # processes of one host whose anchors agree this well share one clock


def same_host_offsets(headers: list[dict[str, Any]]) -> dict[str, int]:
    """hostname -> the one wall-minus-monotonic offset for all of that host's processes.

    Processes of one machine share CLOCK_MONOTONIC, but each anchors it to the wall clock when it
    starts: a wall-clock adjustment between two starts (NTP) would shift one process's records against
    the other's by that much (tens of ms seen), putting a first token before its scheduling. So the
    processes of a host are aligned with one offset, the most recent anchor's. Only when their offsets
    agree within SAME_CLOCK_NS: machines that merely share a hostname (containers on different nodes)
    have unrelated monotonic clocks, whose offsets differ by far more."""
    by_host: dict[str, list[tuple[int, int]]] = {}
    for header in headers:
        host, clock = header.get("hostname"), clock_anchor(header)
        if isinstance(host, str) and clock is not None:
            by_host.setdefault(host, []).append((clock[1], clock[0] - clock[1]))
    out = {}
    for host, anchors in by_host.items():
        offsets = [off for _, off in anchors]
        if max(offsets) - min(offsets) <= SAME_CLOCK_NS:
            out[host] = max(anchors)[1]
    return out
