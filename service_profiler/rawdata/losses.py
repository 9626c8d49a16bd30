"""What each raw file says about its own completeness (docs/DESIGN.md "Raw file format"):

- `{"t":"flushed","until":ns}` after each successful flush: every record ending at or before `until`
  is in the file, unless counted in a `lost` / `dropped` line;
- `{"t":"close","ts":ns,"reason":...}` as the last line of a process that flushed at its end; a file
  without it ended without a final flush, so what came after its last `flushed.until` is uncertain;
- `{"t":"lost","count":N,"reason":...,"from_ts":ns,"to_ts":ns,"msg":...}`: records that could not be
  written in that time range; `{"t":"dropped","count":N,"ts":ns}`: records the bounded buffer dropped
  since the previous flush.

Files written before these markers existed have none: their completeness is unknown (said once).
`ProcessLoss.gaps` lists the time ranges (epoch ns) in which a process's records are missing or may
be: the analysis marks the requests and batches that overlap one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .rawcheck import MAX_TS

LOSS_LINES = frozenset({"flushed", "close", "lost"})
OPEN_END = 2**63 - 1  # the end of an uncertain range that runs to the end of the run


def _ts(value: Any) -> int | None:
    return value if value.__class__ is int and 0 <= value < MAX_TS else None


@dataclass
class Gap:
    """Records of one process missing (or possibly missing) between start_ns and end_ns (epoch ns)."""

    start_ns: int
    end_ns: int
    reason: str  # "lost:write_error", "dropped", "not closed" ...
    count: int | None = None  # records known to be missing, when the file says

    def as_dict(self) -> dict[str, Any]:
        return {"start_ns": self.start_ns, "end_ns": None if self.end_ns == OPEN_END else self.end_ns,
                "reason": self.reason, "count": self.count}


@dataclass
class ProcessLoss:
    markers: bool = False  # the file has flushed / close lines: its completeness can be told
    closed: bool = False
    close_reason: str = ""
    flushed_until_ns: int | None = None
    gaps: list[Gap] = field(default_factory=list)  # lost and dropped ranges (the open tail: `all_gaps`)

    @property
    def status(self) -> str:
        """"closed" (flushed at its end), "not closed" (ended without a final flush), "unknown" (no markers)."""
        if not self.markers:
            return "unknown"
        return "closed" if self.closed else "not closed"

    def all_gaps(self) -> list[Gap]:
        """Every range with missing or uncertain records, the tail after the last flush included."""
        if not self.markers or self.closed:
            return list(self.gaps)
        start = self.flushed_until_ns if self.flushed_until_ns is not None else 0
        return [*self.gaps, Gap(start, OPEN_END, "not closed: no final flush")]


class LossReader:
    """Reads one file's flushed / close / lost / dropped lines into its `ProcessLoss`."""

    def __init__(self, loss: ProcessLoss, offset: int, problems: list[str]) -> None:
        self.loss, self.offset, self.problems = loss, offset, problems
        self.last_flush: int | None = None  # mono ns of the last flush point seen (drops are after it)

    def line(self, kind: str, obj: dict[str, Any], path: Path, lineno: int) -> None:
        loss, off = self.loss, self.offset
        if kind == "flushed":
            until = _ts(obj.get("until"))
            if until is None:
                self.problems.append(f"{path}:{lineno}: flushed line without a valid until; skipped")
                return
            loss.markers = True
            self.last_flush = until
            if loss.flushed_until_ns is None or until + off > loss.flushed_until_ns:
                loss.flushed_until_ns = until + off
        elif kind == "close":
            loss.markers = loss.closed = True
            loss.close_reason = str(obj.get("reason", ""))
        else:  # lost
            start, end, count = _ts(obj.get("from_ts")), _ts(obj.get("to_ts")), obj.get("count")
            if start is None or end is None or end < start or count.__class__ is not int or count < 0:
                self.problems.append(f"{path}:{lineno}: lost line without a valid count, from_ts and to_ts; "
                                     "its records are counted as lost at an unknown time")
                start, end = 0, MAX_TS
                count = count if count.__class__ is int and count >= 0 else None
            loss.gaps.append(Gap(start + off, end + off, f"lost:{obj.get('reason', '')}", count))

    def dropped(self, count: int, ts: Any) -> None:
        """Records the bounded buffer dropped, between the previous flush and `ts` (when it says)."""
        end = _ts(ts)
        start = self.last_flush if self.last_flush is not None else 0
        if end is None or end < start:
            end = MAX_TS
        self.loss.gaps.append(Gap(start + self.offset, end + self.offset, "dropped", count))
