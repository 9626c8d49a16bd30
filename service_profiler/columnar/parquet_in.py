"""Read a run from its Parquet conversions (parquet_format.py) instead of its raw files: the merge.

`load_input` is what `analyze_run` reads through: input paths under which a conversion lies are read
from the Parquet of every conversion found (one per host, say, gathered into one directory), else from
the raw files as `raw.load_raw` does. The result is the same `RawRun` and the same DuckDB tables as
reading the raw files: the processes are made from the stored headers with the same code (so processes
on one clock share one anchor, `shared_wall_offsets`), their control lines are replayed through the raw
reader's `scan_lines`, and the records are loaded from `record.parquet`, shifted when the merged run
anchors a clock differently than the conversion did (a host's files split over two conversions).

Processes are numbered as the raw reader numbers them: conversion by conversion (the input paths in
order, each one's conversions in path order), each conversion's in its own order. That is the raw
reader's order whenever the conversions lie where the raw files did.

A conversion whose raw files are still beside it is checked against them: a raw file changed (size or
mtime) or added since is an error that names it and the fix (convert again); reading the Parquet then
would silently leave out records. Raw files absent (only the Parquet was copied) are not missed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from service_profiler.rawdata.rawcheck import process_identity
from service_profiler.rawdata.rawfile import discover_files

from .literals import insert_rows
from .parquet_format import PARQUET_DIR, ParquetInputError, read_manifest, reconvert_hint, table_path
from .raw import (
    RECORD_COLUMNS,
    RawRun,
    count_bad_records,
    create_record_views,
    load_process_tables,
    load_raw,
    new_processes,
    scan_lines,
)


@dataclass
class _Stored:
    """One process as a conversion stored it."""

    conversion: Path  # the sprof-parquet directory
    process: str  # its key in that conversion's tables
    path: str
    header: dict[str, Any]
    size: int
    rec_lines: int
    wall_offset_ns: int


def find_conversions(paths: Sequence[Path | str]) -> list[Path] | None:
    """The conversions under `paths`, in reading order; None when there are none (read the raw files).
    A directory holding a conversion is not searched further (the conversion covers all below it)."""
    found: list[Path] = []
    raw_only: list[Path] = []
    seen: set[str] = set()
    for given in map(Path, paths):
        under = _conversions_under(given)
        found += [c for c in under if os.path.realpath(c) not in seen]  # overlapping input paths: once
        seen.update(os.path.realpath(c) for c in under)
        if not under:
            raw_only.append(given)
    if not found:
        return None
    if raw_only:
        raise ParquetInputError(
            f"{', '.join(map(str, raw_only))}: no Parquet conversion ({PARQUET_DIR}/) here, while other input paths "
            f"have one; convert it too (`service-profiler convert --input-path {raw_only[0]}`) or give only raw runs")
    return found


def _conversions_under(path: Path) -> list[Path]:
    if path.name == PARQUET_DIR and path.is_dir() and not path.is_symlink():
        return [path]
    if not path.is_dir():
        return []
    found: list[Path] = []
    for root, dirs, _ in os.walk(path):  # never into a symbolic link (followlinks=False)
        if PARQUET_DIR in dirs:
            candidate = Path(root) / PARQUET_DIR
            if candidate.is_symlink():
                raise ParquetInputError(f"{candidate} is a symbolic link (never followed); remove it, or give the "
                                        "directory it points to")
            found.append(candidate)
            dirs.clear()
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith(f".{PARQUET_DIR}-"))
    return sorted(found)


def load_input(con: duckdb.DuckDBPyConnection, paths: Sequence[Path | str],
               progress: Callable[[str], None] | None = None, scratch_root: Path | None = None) -> RawRun:
    """The run under `paths`, from its Parquet conversions where there are some, else from the raw files
    (`scratch_root`: as for `load_raw`)."""
    conversions = find_conversions(paths)
    if conversions is None:
        return load_raw(con, paths, scratch_root=scratch_root)
    if progress:  # said, since what is read depends on what lies under the input paths
        progress(f"reading {len(conversions)} Parquet conversion(s), not the raw files: "
                 + ", ".join(map(str, conversions[:3])) + (" ..." if len(conversions) > 3 else ""))
    return load_parquet(con, conversions)


def load_parquet(con: duckdb.DuckDBPyConnection, conversions: Sequence[Path]) -> RawRun:
    problems: list[str] = []
    stored: list[_Stored] = []
    for conversion in conversions:
        manifest = read_manifest(conversion)
        _check_fresh(conversion, manifest)
        problems += [str(p) for p in manifest["problems"]]
        stored += _stored_processes(con, conversion)
    kept = _dedupe_copies(stored, problems)
    scan_problems_from = len(problems)
    processes = new_processes([(Path(s.path), s.header) for s in kept])
    chans: list[tuple[Any, ...]] = []
    states: list[tuple[int, int, bool, str]] = []
    for proc, s in zip(processes, kept, strict=True):
        proc.rec_lines = s.rec_lines
        scan_lines(proc, _stored_lines(con, s), chans, states, problems)
    states.sort(key=lambda s: s[1])
    load_process_tables(con, processes, chans)
    _load_records(con, kept, [p.wall_offset_ns for p in processes])
    create_record_views(con)
    count_bad_records(con, processes, problems)
    return RawRun(processes, states, problems, scan_problems_from)


def _check_fresh(conversion: Path, manifest: dict[str, Any]) -> None:
    """Raw files beside the conversion that changed or appeared since it was made: an error naming them."""
    run_dir = conversion.parent
    converted = {s.get("path"): s for s in manifest["sources"] if isinstance(s, dict)}
    changed = []
    for path in discover_files([run_dir], []):
        source = converted.get(os.path.relpath(path, run_dir))
        try:
            st = path.stat()
        except OSError:
            continue
        if source is None:
            changed.append(f"{path} (not converted)")
        elif (st.st_size, st.st_mtime_ns) != (source.get("size"), source.get("mtime_ns")):
            changed.append(f"{path} (size {source.get('size')} -> {st.st_size}, or modified since)")
    if changed:
        shown = "\n  ".join(changed[:10]) + (f"\n  ... and {len(changed) - 10} more" if len(changed) > 10 else "")
        raise ParquetInputError(f"{conversion} is stale: raw files changed after it was made:\n  {shown}\n"
                                f"{reconvert_hint(run_dir)}")


def _query(con: duckdb.DuckDBPyConnection, conversion: Path, table: str, query: str) -> list[tuple[Any, ...]]:
    file = table_path(conversion, table)
    try:
        return con.execute(query.replace("{file}", "'" + str(file).replace("'", "''") + "'")).fetchall()
    except duckdb.Error as exc:
        raise ParquetInputError(f"{file}: not a readable Parquet table of this format "
                                f"({str(exc).splitlines()[0]}); {reconvert_hint(conversion.parent)}") from None


def _stored_processes(con: duckdb.DuckDBPyConnection, conversion: Path) -> list[_Stored]:
    rows = _query(con, conversion, "process", "SELECT process, path, header, size, rec_lines, wall_offset_ns "
                                              "FROM read_parquet({file}) ORDER BY idx")
    out = []
    for process, path, header, size, rec_lines, offset in rows:
        try:
            parsed = json.loads(header)
        except (TypeError, ValueError):
            parsed = None
        if not isinstance(parsed, dict):
            raise ParquetInputError(f"{table_path(conversion, 'process')}: process {process}: header is not a JSON "
                                    f"object; {reconvert_hint(conversion.parent)}")
        out.append(_Stored(conversion, str(process), str(path), parsed, int(size or 0), int(rec_lines or 0),
                           int(offset or 0)))
    return out


def _dedupe_copies(stored: list[_Stored], problems: list[str]) -> list[_Stored]:
    """One copy per process across conversions, the largest, as the raw reader keeps (rawfile._dedupe_copies)."""
    best: dict[tuple[Any, ...], _Stored] = {}
    for s in stored:
        key = process_identity(s.header)
        kept = best.get(key)
        if kept is None:
            best[key] = s
        elif s.size > kept.size:
            problems.append(f"{kept.path}: duplicate copy of {s.path} (smaller); skipped")
            best[key] = s
        else:
            problems.append(f"{s.path}: duplicate copy of {kept.path}; skipped")
    return list(best.values())


def _stored_lines(con: duckdb.DuckDBPyConnection, stored: _Stored) -> list[tuple[int, bytes | None, str | None]]:
    """One process's control lines (a scan of its conversion's `line.parquet` that skips the row groups of
    other processes: the file is sorted by process)."""
    key = stored.process.replace("'", "''")
    rows = _query(con, stored.conversion, "line", "SELECT lineno, line, rec_problem FROM read_parquet({file}) "
                                                  f"WHERE process = '{key}' ORDER BY lineno")
    return [(int(lineno), line, problem) for lineno, line, problem in rows]


def _load_records(con: duckdb.DuckDBPyConnection, kept: list[_Stored], offsets: list[int]) -> None:
    """The kept processes' records into `record`, numbered and anchored as in the merged run."""
    con.execute(f"CREATE OR REPLACE TABLE record ({RECORD_COLUMNS})")
    con.execute("CREATE OR REPLACE TEMP TABLE parquet_process (file VARCHAR, process VARCHAR, proc INTEGER, "
                "shift BIGINT)")
    rows = [(str(table_path(s.conversion, "record")), s.process, i, offset - s.wall_offset_ns)
            for i, (s, offset) in enumerate(zip(kept, offsets, strict=True))]
    if not rows:
        return
    insert_rows(con, "parquet_process", rows)
    files = sorted({r[0] for r in rows})
    listed = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
    try:
        con.execute(f"""
            INSERT INTO record
            SELECT m.proc, r.kind, r.domain, r.name, r.ts_ns + m.shift, r.end_ns + m.shift, r.tid, r.attrs, r.pos,
                   r.batch_id
            FROM read_parquet([{listed}], filename=true) AS r
            JOIN parquet_process AS m ON m.file = r.filename AND m.process = r.process""")
    except duckdb.Error as exc:
        raise ParquetInputError(f"reading {', '.join(files)}: {str(exc).splitlines()[0]}; convert the run again "
                                "(`service-profiler convert --input-path RUN_DIR`)") from None
