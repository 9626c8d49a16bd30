"""Writers of the front doors' files: never raise into the engine, never follow a symlink they did not
create, count what they could not write.

Files are created (replacing an earlier run's) by the first write of the engine process, so processes
that never schedule (the API server, workers) leave nothing behind. A second data-parallel engine writes
its own files (`<stem>.dp<N>.jsonl`, `<dir>/dp<N>/`).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

Problem = Callable[[str], None]

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def open_new(path: Path) -> TextIO:
    """Open `path` for writing from scratch; a symlink there is refused (O_NOFOLLOW), not followed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, _FLAGS, 0o644)
    return os.fdopen(fd, "w", encoding="utf-8", newline="")


def dp_path(path: Path, dp_rank: int | None) -> Path:
    return path if not dp_rank else path.with_name(f"{path.stem}.dp{dp_rank}{path.suffix}")


class _Writer:
    def __init__(self, what: str, problem: Problem) -> None:
        self.what = what
        self.problem = problem
        self.lost = 0
        self.failed = False

    def _fail(self, count: int, exc: BaseException) -> None:
        self.lost += count
        if not self.failed:
            self.failed = True
            self.problem(f"{self.what}: cannot write ({exc}); its rows are counted as lost from now on")


class JsonlWriter(_Writer):
    """The scheduler-profiling JSONL: lines appended and flushed at every write."""

    def __init__(self, path: Path, problem: Problem) -> None:
        super().__init__(str(path), problem)
        self.path = path
        self.file: TextIO | None = None

    def write(self, lines: Sequence[str], dp_rank: int | None) -> None:
        if not lines:
            return
        if self.failed:
            self.lost += len(lines)
            return
        try:
            if self.file is None:
                self.path = dp_path(self.path, dp_rank)
                self.what = str(self.path)
                self.file = open_new(self.path)
            self.file.write("\n".join(lines) + "\n")
            self.file.flush()
        except (OSError, ValueError) as exc:
            self._fail(len(lines), exc)

    def close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass
            self.file = None


class CsvTablesWriter(_Writer):
    """The scheduler-logging CSVs: a header when a file is created, rows appended at every write."""

    def __init__(self, directory: Path, columns: Mapping[str, Sequence[str]], problem: Problem) -> None:
        super().__init__(str(directory), problem)
        self.directory = directory
        self.columns = columns
        self.files: dict[str, tuple[TextIO, Any]] = {}
        self.paths: list[Path] = []

    def write(self, rows: Mapping[str, Sequence[Sequence[Any]]], dp_rank: int | None) -> None:
        count = sum(len(r) for r in rows.values())
        if self.failed:
            self.lost += count
            return
        try:
            if not self.files:
                directory = self.directory / f"dp{dp_rank}" if dp_rank else self.directory
                self.what = str(directory)
                for name, columns in self.columns.items():
                    handle = open_new(directory / name)
                    self.paths.append(directory / name)
                    writer = csv.writer(handle, lineterminator="\n")
                    writer.writerow(columns)
                    self.files[name] = (handle, writer)
            for name, (handle, writer) in self.files.items():
                writer.writerows(rows.get(name, ()))
                handle.flush()
        except (OSError, ValueError, csv.Error) as exc:
            self._fail(count, exc)

    def close(self) -> None:
        for handle, _ in self.files.values():
            try:
                handle.close()
            except OSError:
                pass
        self.files = {}
