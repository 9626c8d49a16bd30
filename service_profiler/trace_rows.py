"""Reading JSONL trace files: one JSON object a line, every error naming `file:line`.

One reader for every trace the project reads: the twin's trace (`twin.trace.read_trace`), public JSONL
traces (`twin.formats.read_mooncake`) and the workload generator's replay (`workload.requests.read_requests`).
Each caller validates the rows' fields itself and passes the error class it raises, so its callers catch
what they always caught. Standard library only: the workload generator imports it without the twin.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TRACE_FORMAT = "service-profiler-trace"
TRACE_VERSION = 1


def trace_header() -> dict[str, Any]:
    """The first line of a trace file in the project's format."""
    return {"format": TRACE_FORMAT, "version": TRACE_VERSION}


def jsonl_rows(path: str | Path, error: type[ValueError]) -> Iterator[tuple[str, dict[str, Any]]]:
    """("file:line", row) for each non-blank line; raises `error` for a file that cannot be read, a line
    that is not JSON or not a JSON object."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{p}: no such trace file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{p}: cannot read the trace ({exc})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{p}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{where}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise error(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield where, row


def trace_rows(path: str | Path, error: type[ValueError]) -> Iterator[tuple[str, dict[str, Any]]]:
    """`jsonl_rows` of a file in the project's trace format: the header line (`{"format": ..., "version":
    ...}`, optional) is checked and skipped; a header of another format or version raises `error`."""
    for where, row in jsonl_rows(path, error):
        if "format" in row and "rid" not in row:
            if row.get("format") != TRACE_FORMAT or row.get("version") != TRACE_VERSION:
                raise error(f"{where}: unsupported header {row!r}; expected format {TRACE_FORMAT!r} "
                            f"version {TRACE_VERSION}")
            continue
        yield where, row
