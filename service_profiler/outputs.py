"""Safe creation of output files (analyze, model fit): never through a link someone planted.

An output directory may be shared (e.g. under /tmp), so whatever already sits at an output's name
(a symlink to another user's file, a file of anyone's) is never opened for writing. Every output is
written to a fresh file of its own in the same directory, created with O_CREAT|O_EXCL|O_NOFOLLOW
(nothing can be there before it, and no link is followed), and moved onto its name with
`os.replace`, which replaces a link at that name rather than writing through it. A failed write
leaves no half-written output: the temporary file is removed. Scratch files that the writer reads
back live in a private directory (`scratch_dir`, mode 0700, made by mkdtemp), so no
other user can put or change anything there.

`OutputPathError` carries a message that names the path, what is wrong and how to fix it; commands
print it and exit 2 (`check_output_dir` finds the common cases before any work is done).
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


class OutputPathError(Exception):
    """An output path that cannot be used, with what is wrong and the fix."""


def describe_os_error(path: Path | str, exc: OSError, what: str = "output directory") -> OutputPathError:
    """An OSError on an output path as a message naming the path, the cause and a fix."""
    why = exc.strerror or str(exc)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "choose a directory you can write to (--output-path)"
    elif exc.errno in (errno.ENOTDIR, errno.EEXIST):
        fix = "give a directory path (an existing file cannot hold the outputs), or remove that file"
    elif exc.errno == errno.ENOSPC:
        fix = "free some space or choose another file system"
    else:
        fix = "choose another --output-path"
    where = exc.filename if exc.filename and str(exc.filename) != str(path) else None
    detail = f" ({where}: {why})" if where else f" ({why})"
    return OutputPathError(f"{what} {path}: cannot be used{detail}; {fix}")


def check_output_dir(path: Path) -> None:
    """Create `path` (and its parents) if needed and check that files can be created in it; raise
    OutputPathError otherwise (a file at that path or above it, no permission, read-only, ...)."""
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"output directory {path}: is a file, not a directory; give a directory "
                              "path (it is created if missing), or move that file away")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise describe_os_error(path, exc) from None
    try:
        probe = create_temp(path, ".write-check")
    except OSError as exc:
        raise describe_os_error(path, exc) from None
    os.close(probe[0])
    os.unlink(probe[1])


def output_dir(path: Path) -> Path:
    """A directory for outputs (e.g. plots/ in the output directory), created if missing. A symlink
    found at that name is removed first: outputs are never written into a directory it points to."""
    if path.is_symlink():
        path.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


def create_temp(directory: Path, name: str, mode: int = 0o666) -> tuple[int, Path]:
    """A new file in `directory` (fd, path) that nobody else created: a random name next to `name`,
    O_EXCL|O_NOFOLLOW. `mode` is narrowed by the umask, like any file the user creates."""
    for _ in range(100):
        path = directory / f".{name}.{secrets.token_hex(6)}.part"
        try:
            return os.open(path, _CREATE_FLAGS, mode), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(directory / name))


class OutputFile:
    """One output being written: `fh` writes a private temporary file; `commit()` moves it onto
    `path` (replacing whatever is there, a link included, never writing through it); `discard()`
    removes it. Used as a context manager it commits on success and discards on an exception."""

    def __init__(self, path: Path | str, mode: str = "w", **open_kwargs: Any) -> None:
        self.path = Path(path)
        fd, self.temp = create_temp(self.path.parent, self.path.name)
        try:
            self.fh: IO[Any] = os.fdopen(fd, mode, **open_kwargs)
        except BaseException:
            os.close(fd)
            self.temp.unlink(missing_ok=True)
            raise
        self.done = False

    def commit(self) -> Path:
        if not self.done:
            self.done = True
            try:
                self.fh.close()
                os.replace(self.temp, self.path)
            except BaseException:
                self.temp.unlink(missing_ok=True)
                raise
        return self.path

    def discard(self) -> None:
        if not self.done:
            self.done = True
            try:
                self.fh.close()
            finally:
                self.temp.unlink(missing_ok=True)

    def __enter__(self) -> IO[Any]:
        return self.fh

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


@contextmanager
def open_output(path: Path | str, mode: str = "w", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """`with open_output(path, "w", encoding=...) as fh:` the file appears at `path` when the block
    ends without an exception (see OutputFile)."""
    out = OutputFile(path, mode, **open_kwargs)
    with out as fh:
        yield fh


def write_output_text(path: Path | str, text: str) -> Path:
    with open_output(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)
    return Path(path)


@contextmanager
def scratch_dir(directory: Path, prefix: str) -> Iterator[Path]:
    """A new directory in `directory` only this user can enter (mkdtemp: 0700) for files another program
    (e.g. DuckDB's COPY) writes by name, then moved onto their output path with `os.replace` (which
    replaces a link there, never writing through it); removed at the end of the block."""
    path = Path(tempfile.mkdtemp(prefix=f".{prefix}.", dir=directory))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
