"""Writing raw lines so that nothing is lost without a count and no line is ever torn.

- `encode_records`: a record whose value the JSON encoder cannot write (dict keys that are tuples,
  nesting deeper than the encoder's recursion limit, a cycle) costs only its own attributes: they are
  replaced by a marker and the record is counted, instead of the whole flush failing.
- `RawFile`: appends whole lines; a write that fails (disk full, I/O error) is cut back to the last
  complete line, so the next successful write starts on a clean line.

Runs inside engine processes: standard library only.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

UNENCODABLE = "unencodable"
"""The key of the marker that replaces attributes the encoder could not write:
`{"unencodable": "<exception type>: <message>"}`."""


@dataclass
class EncodeProblems:
    replaced: int = 0
    """Records written with their attributes replaced by the marker."""
    lost: int = 0
    """Records that could not be written even so."""
    from_ts: int | None = None
    to_ts: int | None = None
    first_error: str = ""

    def note(self, record: Sequence[Any], exc: BaseException) -> None:
        if not self.first_error:
            self.first_error = f"{type(exc).__name__}: {exc}"[:300]
        self.from_ts, self.to_ts = widen(self.from_ts, self.to_ts, record)


def widen(low: int | None, high: int | None, record: Sequence[Any]) -> tuple[int | None, int | None]:
    """Extend [low, high] by a record's timestamps (span: start and end; event, counter: ts)."""
    try:
        stamps = [value for value in record[1:3] if type(value) is int]
    except Exception:
        return low, high
    if not stamps:
        return low, high
    return (min(stamps) if low is None else min(low, *stamps)), (max(stamps) if high is None else max(high, *stamps))


def encode_records(batch: list[tuple[Any, ...]], per_line: int, encode: Callable[[object], str],
                   pause: Callable[[], None], fast: Callable[[list[Any]], str | None] | None = None
                   ) -> tuple[list[str], EncodeProblems]:
    """`rec` lines of at most `per_line` records each; `pause` runs between lines (lets engine
    threads in: the C encoder holds the GIL for a whole call). `fast` (`speedups.encode_rec_line`)
    writes a line where it can, as `encode` would; None where it cannot, and `encode` does."""
    lines: list[str] = []
    problems = EncodeProblems()
    for start in range(0, len(batch), per_line):
        if start:
            pause()
        chunk = batch[start : start + per_line]
        try:
            line = fast(chunk) if fast is not None else None
            lines.append(line if line is not None else encode({"t": "rec", "r": chunk}))
        except Exception:  # RecursionError, TypeError, ValueError: find the records that fail
            kept = [_encodable(record, encode, problems) for record in chunk]
            good = [record for record in kept if record is not None]
            if good:
                try:
                    lines.append(encode({"t": "rec", "r": good}))
                except Exception as exc:  # each encoded alone: a combination failing is not expected
                    for record in good:
                        problems.note(record, exc)
                    problems.lost += len(good)
    return lines, problems


def _encodable(record: tuple[Any, ...], encode: Callable[[object], str],
               problems: EncodeProblems) -> tuple[Any, ...] | None:
    # Tried at the depth it will be written at: nesting just under the encoder's limit on its own
    # could still fail two levels down inside the line.
    try:
        encode({"t": "rec", "r": [record]})
        return record
    except Exception as exc:
        problems.note(record, exc)
        failure = exc
    try:
        # Every record kind keeps its attributes (or counter values) last.
        replaced = (*record[:-1], {UNENCODABLE: f"{type(failure).__name__}: {failure}"[:300]})
        encode({"t": "rec", "r": [replaced]})
    except Exception:
        problems.lost += 1
        return None
    problems.replaced += 1
    return replaced


class RawFile:
    """One raw file, opened for appending without following a symlink planted at its path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._good_size = 0  # the file's size after the last complete line we wrote
        self._needs_newline = False  # a failed write could not be cut back: start on a fresh line

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def open(self) -> None:
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
        self._fd = os.open(self.path, flags, 0o644)
        self._good_size = os.fstat(self._fd).st_size

    def write(self, data: bytes) -> None:
        """Append `data` (whole lines). On failure the file is cut back to its last complete line
        (or, where that fails too, the next write starts with a newline) and the OSError is raised."""
        assert self._fd is not None
        if self._needs_newline:
            data = b"\n" + data
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError:
            try:
                os.ftruncate(self._fd, self._good_size)
                self._needs_newline = False
            except OSError:
                self._needs_newline = True
            raise
        self._needs_newline = False
        self._good_size += len(data)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


class LostRecords:
    """Records that a failed write took with it, until a `lost` line can say so."""

    def __init__(self) -> None:
        self.count = 0
        self.from_ts: int | None = None
        self.to_ts: int | None = None
        self.message = ""

    def add(self, batch: list[tuple[Any, ...]], message: str) -> None:
        self.count += len(batch)
        for record in batch:
            self.from_ts, self.to_ts = widen(self.from_ts, self.to_ts, record)
        self.message = self.message or message

    def line(self, reason: str) -> dict[str, object]:
        now = time.perf_counter_ns()
        return {"t": "lost", "count": self.count, "reason": reason,
                "from_ts": self.from_ts if self.from_ts is not None else now,
                "to_ts": self.to_ts if self.to_ts is not None else now, "msg": self.message}
