"""Private work directories (DuckDB's database and spill) that do not outlive their process for long.

A process killed outright (SIGKILL, the kernel's out-of-memory killer) cannot remove its work directory,
and the spill in it can be gigabytes (about 1 GB per million records). So each work directory holds a
lock file that its process keeps locked (`flock`) for as long as it lives; the kernel releases that lock
when the process ends, however it ends. Making a work directory first removes the ones beside it whose
lock is free: their processes are gone.

Only directories of this user, named by one of `PREFIXES`, holding the lock file, are looked at; a
symbolic link is never followed; a directory without the lock file (made by an older version, or being
made right now) is left alone. The lock file appears under its name only once locked (made under another
name, locked, then renamed), so a directory being made is never taken for an abandoned one.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PREFIXES = ("sprof-analysis-", "sprof-convert-")
LOCK_NAME = "owner.lock"


class WorkDirError(Exception):
    """No work directory could be made where asked; the message names the place, the cause and the fix."""


@dataclass
class WorkDir:
    path: Path
    lock_fd: int | None

    def remove(self) -> None:
        """Remove the directory, then let go of its lock."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


@dataclass(frozen=True)
class Removed:
    path: Path
    size: int  # bytes


def make_work_dir(prefix: str, root: Path | None, report: Callable[[str], None] | None = None) -> WorkDir:
    """A new private directory under `root` (default: the system's temporary directory), locked for as
    long as this process lives or until `WorkDir.remove`. The abandoned ones beside it are removed first,
    and `report` is told in one line (`describe`) when there were any."""
    base = Path(root) if root is not None else Path(tempfile.gettempdir())
    removed = remove_abandoned(base)
    if removed and report is not None:
        report(describe(removed))
    try:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    except OSError as exc:
        raise WorkDirError(f"cannot make a work directory in {base} ({exc.strerror or exc}); give --temp-dir an "
                           "existing directory you can write to, on a file system with room for the spill") from None
    try:
        return WorkDir(path, _lock(path))
    except OSError:  # a file system without flock: the directory works, it is only not swept if abandoned
        return WorkDir(path, None)


def _lock(path: Path) -> int:
    making = path / (LOCK_NAME + ".new")
    fd = os.open(making, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(making, path / LOCK_NAME)
    except OSError:
        os.close(fd)
        raise
    return fd


def remove_abandoned(base: Path) -> list[Removed]:
    """Remove the work directories in `base` whose process has ended (their lock is free)."""
    try:
        entries = list(os.scandir(base))
    except OSError:
        return []
    removed: list[Removed] = []
    for entry in entries:
        if not entry.name.startswith(PREFIXES):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
                continue
            fd = os.open(os.path.join(entry.path, LOCK_NAME), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held: its process is alive
                continue
            size = _size(entry.path)
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Removed(Path(entry.path), size))
        finally:
            os.close(fd)
    return removed


def _size(path: str) -> int:
    total = 0
    for folder, _, files in os.walk(path):  # os.walk does not follow links to directories
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                continue
    return total


def describe(removed: list[Removed]) -> str:
    """One line for the console: what was removed and what it freed."""
    size = sum(r.size for r in removed)
    return (f"removed {len(removed)} work director{'y' if len(removed) == 1 else 'ies'} left by an analyze or "
            f"convert that ended without cleaning up ({size / 1e9:.2f} GB freed): "
            + ", ".join(str(r.path) for r in removed))
