"""The Parquet form of a run (docs/DISTRIBUTED.md): what `service-profiler convert` writes beside the
raw files and `analyze` reads instead of them.

`RUN_DIR/sprof-parquet/` holds, for the raw files under RUN_DIR:
- `manifest.json`: the format and its version, the raw files converted (path relative to RUN_DIR, size,
  mtime: a raw file changed since is told at reading), the problems found while finding them;
- `process.parquet`: one row per process file: `process` (its key across hosts: host:pid:clock anchor),
  what the header said, everything the reader made of its control lines (meta, completeness, gaps,
  warnings, patch report, dropped count...), and the header itself;
- `line.parquet`: the control lines themselves (chan, meta, state, flushed, close, lost, dropped, warn,
  patch), so that reading the Parquet replays them through the raw reader's own code;
- `record.parquet`: every record, normalized (`raw.RECORD_COLUMNS` with `process` for `proc`): epoch
  times, its channel's kind/domain/name, attrs as JSON;
- `state.parquet`, `channel.parquet`, `problem.parquet`: the same facts as tables, for other SQL engines.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

PARQUET_DIR = "sprof-parquet"
MANIFEST = "manifest.json"
FORMAT_NAME = "service-profiler-parquet"
FORMAT_VERSION = 1
TABLES = ("process", "line", "record", "state", "channel", "problem")


class ParquetInputError(Exception):
    """A Parquet conversion that cannot be read as it is; the message names the file and the fix."""


def reconvert_hint(run_dir: Path) -> str:
    return (f"run `service-profiler convert --input-path {run_dir}` again, or remove {run_dir / PARQUET_DIR} "
            "to read the raw files")


def table_path(parquet_dir: Path, table: str) -> Path:
    return parquet_dir / f"{table}.parquet"


def read_manifest(parquet_dir: Path) -> dict[str, Any]:
    """The manifest of a conversion, checked; never through a symbolic link."""
    path = parquet_dir / MANIFEST
    hint = reconvert_hint(parquet_dir.parent)
    try:
        text = _read_no_follow(path)
    except OSError as exc:
        why = "is a symbolic link (never followed)" if os.path.islink(path) else f"unreadable ({exc.strerror})"
        raise ParquetInputError(f"{path}: {why}; {hint}") from None
    try:
        manifest = json.loads(text)
    except ValueError:
        raise ParquetInputError(f"{path}: not valid JSON; {hint}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ParquetInputError(f"{path}: not a {FORMAT_NAME} manifest; {hint}")
    if manifest.get("version") != FORMAT_VERSION:
        raise ParquetInputError(f"{path}: format version {manifest.get('version')!r}, this service-profiler reads "
                                f"version {FORMAT_VERSION}; {hint}")
    for key, kind in (("sources", list), ("problems", list)):
        if not isinstance(manifest.get(key), kind):
            raise ParquetInputError(f"{path}: key {key!r} missing or not a {kind.__name__}; {hint}")
    for table in TABLES:
        file = table_path(parquet_dir, table)
        try:
            mode = os.lstat(file).st_mode
        except OSError:
            raise ParquetInputError(f"{file}: missing; {hint}") from None
        if not stat.S_ISREG(mode):
            raise ParquetInputError(f"{file}: not a regular file (a symbolic link is never followed); {hint}")
    return manifest


def is_conversion(parquet_dir: Path) -> bool:
    """A directory this program wrote: a manifest naming our format (whatever its version), or nothing but
    the files a conversion writes (its manifest damaged), all regular files."""
    try:
        manifest = json.loads(_read_no_follow(parquet_dir / MANIFEST))
        if isinstance(manifest, dict) and manifest.get("format") == FORMAT_NAME:
            return True
    except (OSError, ValueError):
        pass
    ours = {MANIFEST, *(table_path(parquet_dir, t).name for t in TABLES)}
    try:
        entries = list(os.scandir(parquet_dir))
    except OSError:
        return False
    return bool(entries) and all(e.name in ours and e.is_file(follow_symlinks=False) for e in entries)


def _read_no_follow(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as fh:
        return fh.read()
