"""What a raw file's control lines say about its process (docs/DESIGN.md "Raw file format"), read the same
way by both readers: `rawfile.py` (inspect, the front doors) and `columnar/raw.py` (analyze).

A line that does not hold what its type needs is a problem naming the file and line, and costs only
itself. The lines:
- `chan`: a channel's id (an integer in [0, 2^31)), kind (span, event, counter), domain and name;
- `meta`: a text key and any value; the last one of a key wins;
- `patch`: the probes' patch report (lists of symbol names or {symbol, reason} objects);
- `state`: collection switched on or off at `ts`;
- `dropped`: records the bounded buffer dropped since the previous flush;
- `warn`: a warning, written when it first happens and again with its running total: the last total wins;
- `flushed`, `close`, `lost`: the file's completeness (losses.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .losses import LOSS_LINES, LossReader, ProcessLoss
from .rawcheck import MAX_TS, non_finite_spelled, patch_items, valid_ts

RECORD_KINDS = ("span", "event", "counter")
_PATCH_FIELDS = ("applied", "pending", "skipped", "failed")
# a channel id is stored as a 32-bit integer by the analysis
_MAX_CHANNEL_ID = 2**31


def channel(obj: dict[str, Any]) -> tuple[int, str, str, str] | None:
    """(id, kind, domain, name) of a valid `chan` line; None when its id, kind, domain or name is not
    valid (a domain or name that is not a text: the line is corrupt)."""
    chan_id, kind = obj.get("id"), obj.get("kind")
    domain, name = obj.get("domain", ""), obj.get("name", "")
    if (chan_id.__class__ is not int or not 0 <= chan_id < _MAX_CHANNEL_ID or kind not in RECORD_KINDS
            or domain.__class__ is not str or name.__class__ is not str):
        return None
    return chan_id, kind, domain, name


def redeclared_problem(path: Path | str, lineno: int, declared: tuple[int, str, str, str]) -> str:
    """A `chan` line giving an id declared before another meaning: the writer declares each id once, so
    it is corrupt, and it must not change what the records of that channel are (the first declaration
    is kept)."""
    chan_id, kind, domain, name = declared
    return (f"{path}:{lineno}: channel {chan_id} declared again, as {kind} {domain}/{name}; skipped, the first "
            "declaration is kept")


def channel_problem(path: Path | str, lineno: int) -> str:
    return (f"{path}:{lineno}: channel line without a valid id (an integer), kind (span, event or counter), "
            "domain and name (texts); skipped, its records counted as malformed")


class ControlReader:
    """One file's control lines other than `chan`, applied in order (`line`): what they say is in `meta`,
    `patch`, `warnings` (message -> "message (xN)", the last total), `dropped`, `states` (proc, epoch
    ns, enabled, reason) and `loss`; what is wrong with them is appended to `problems`."""

    def __init__(self, proc_index: int, offset: int, loss: ProcessLoss, meta: dict[str, Any],
                 states: list[tuple[int, int, bool, str]], problems: list[str]) -> None:
        self.proc_index, self.offset = proc_index, offset
        self.meta, self.states, self.problems = meta, states, problems
        self.losses = LossReader(loss, offset, problems)
        self.patch: dict[str, Any] | None = None
        self.warnings: dict[str, str] = {}
        self.dropped = 0

    def line(self, kind: str, obj: dict[str, Any], path: Path, lineno: int) -> None:
        where = f"{path}:{lineno}"
        if kind == "meta":
            if isinstance(obj.get("key"), str):
                self.meta[obj["key"]] = non_finite_spelled(obj.get("value"))
            else:
                self.problems.append(f"{where}: meta line without a text key; skipped")
        elif kind == "patch":
            self.patch = {k: patch_items(obj.get(k)) for k in _PATCH_FIELDS}
            odd = [k for k in _PATCH_FIELDS if obj.get(k) is not None and (not isinstance(obj[k], list) or any(
                not isinstance(v, str | dict) for v in obj[k]))]
            if odd:
                self.problems.append(f"{where}: patch line: {', '.join(odd)} not a list of symbol names or "
                                     "{symbol, reason} objects; read as text")
        elif kind == "state":
            ts = valid_ts(obj.get("ts"))
            if ts is None:
                self.problems.append(f"{where}: state line without a valid ts; skipped")
            else:
                self.states.append((self.proc_index, ts + self.offset, bool(obj.get("enabled")),
                                    str(obj.get("reason", ""))))
        elif kind == "dropped":
            count = obj.get("count")
            if count.__class__ is int and 0 <= count < MAX_TS:
                self.dropped += count
                if count:
                    self.losses.dropped(count, obj.get("ts"))
            else:
                self.problems.append(f"{where}: dropped line without a valid count; skipped")
        elif kind in LOSS_LINES:
            self.losses.line(kind, obj, path, lineno)
        elif kind == "warn":
            msg, count = str(obj.get("msg", "")), obj.get("count", 1)
            if count.__class__ is not int:
                count = "?"
            self.warnings[msg] = f"{msg} (x{count})" if count != 1 else msg
        elif kind == "header":
            self.problems.append(f"{where}: second header line ignored")
        else:
            self.problems.append(f"{where}: unknown line type {kind!r}; skipped")
