"""`convert`: one host's raw files -> Parquet beside them (`RUN_DIR/sprof-parquet/`, parquet_format.py).

The raw files are read by the analysis's own reader (`raw.load_raw`), so the Parquet holds exactly what
`analyze` would have read; DuckDB streams the record table into `record.parquet` (COPY ... TO, memory
bounded by its limit, the rest spilled). The conversion is written into a fresh private directory
beside the target and renamed into place when complete: a reader sees the old conversion or the new
one, never half of one. A target that is a symbolic link, or anything this program did not write, is
never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from service_profiler import __version__
from service_profiler.rawdata.rawcheck import clock_anchor
from service_profiler.rawdata.rawfile import discover_files

from .parquet_format import FORMAT_NAME, FORMAT_VERSION, MANIFEST, PARQUET_DIR, is_conversion, table_path
from .raw import Process, RawRun, load_raw
from .run import DEFAULT_MEMORY_LIMIT, connect
from .workdir import make_work_dir

_PROCESS_COLUMNS = (
    "process VARCHAR, idx INTEGER, key VARCHAR, hostname VARCHAR, pid BIGINT, ppid BIGINT, role VARCHAR, "
    "dp_rank INTEGER, wall_offset_ns BIGINT, path VARCHAR, size BIGINT, mtime_ns BIGINT, rec_lines BIGINT, "
    "dropped BIGINT, profiler_version VARCHAR, argv JSON, engine JSON, meta JSON, warnings JSON, patch JSON, "
    "loss_status VARCHAR, close_reason VARCHAR, flushed_until_ns BIGINT, gaps JSON, header JSON")
_LINE_COLUMNS = "process VARCHAR, lineno BIGINT, line BLOB, rec_problem VARCHAR"
_ROWS_PER_INSERT = 500


class ConvertError(Exception):
    """A conversion refused or failed; the message names the path and the fix."""


@dataclass
class Converted:
    parquet_dir: Path
    processes: int
    records: int
    bytes: int
    seconds: float
    problems: list[str]


def process_id(proc: Process) -> str:
    """A process's key across hosts and runs: host:pid and its clock anchor (a pid reused later differs)."""
    anchor = clock_anchor(proc.header)
    return f"{proc.key}:{anchor[0] if anchor else 0}"


def convert(run_dir: Path, *, memory_limit: str = DEFAULT_MEMORY_LIMIT, threads: int | None = None,
            temp_root: Path | None = None, report: Callable[[str], None] | None = None) -> Converted:
    """Convert the raw files under `run_dir` into `run_dir/sprof-parquet/` (replacing an older conversion);
    `report` is told of work directories left by killed processes and removed on the way."""
    t0 = time.perf_counter()
    target = _checked_target(run_dir)
    sources = _sources(run_dir)  # before reading: a file growing meanwhile reads as changed later
    work = make_work_dir("sprof-convert-", temp_root, report)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{PARQUET_DIR}-", dir=run_dir))
    except BaseException:
        work.remove()
        raise
    try:
        con = connect(work.path, memory_limit, threads, in_memory=True)
        try:
            kept_lines: dict[int, list[tuple[int, bytes | None, str | None]]] = {}
            raw = load_raw(con, [run_dir], kept_lines, scratch_root=work.path)
            if not raw.processes:
                raise ConvertError(f"{run_dir}: no readable raw files (*.sprof.jsonl) to convert"
                                   + "".join(f"\n  {p}" for p in raw.problems))
            records = _write_tables(con, raw, kept_lines, sources, staging)
        finally:
            con.close()
        # readable as the run directory is, never writable by others
        os.chmod(staging, stat.S_IMODE(run_dir.stat().st_mode) & 0o755)
        _replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        work.remove()
    size = sum(f.stat().st_size for f in target.iterdir())
    return Converted(target, len(raw.processes), records, size, time.perf_counter() - t0, raw.problems)


def _checked_target(run_dir: Path) -> Path:
    if run_dir.is_symlink():
        raise ConvertError(f"{run_dir} is a symbolic link (never followed); give the real run directory")
    if not run_dir.is_dir():
        raise ConvertError(f"{run_dir}: not a directory; give the run directory that holds the raw files")
    target = run_dir / PARQUET_DIR
    if target.is_symlink():
        raise ConvertError(f"{target} is a symbolic link (never followed); remove it and convert again")
    if target.exists() and not (target.is_dir() and is_conversion(target)):
        raise ConvertError(f"{target} exists and was not written by `service-profiler convert`; "
                           "move it away and convert again")
    return target


def _sources(run_dir: Path) -> list[dict[str, Any]]:
    """Every raw file under `run_dir` (relative path, size, mtime): what the conversion stands for."""
    out = []
    for path in discover_files([run_dir], []):
        try:
            st = path.stat()
        except OSError:
            continue  # the reader reports it
        out.append({"path": os.path.relpath(path, run_dir), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _write_tables(con: duckdb.DuckDBPyConnection, raw: RawRun,
                  kept_lines: dict[int, list[tuple[int, bytes | None, str | None]]],
                  sources: list[dict[str, Any]], staging: Path) -> int:
    ids = _unique_ids(raw.processes)
    stats = {s["path"]: s for s in sources}
    run_dir = staging.parent
    con.execute(f"CREATE TEMP TABLE p_process ({_PROCESS_COLUMNS})")
    _insert(con, "p_process", [_process_row(p, ids[p.index], stats.get(os.path.relpath(p.path, run_dir), {}))
                               for p in raw.processes])
    con.execute(f"CREATE TEMP TABLE p_line ({_LINE_COLUMNS})")
    _insert(con, "p_line", [(ids[i], lineno, line, problem) for i, lines in kept_lines.items()
                            for lineno, line, problem in lines])
    con.execute("CREATE TEMP TABLE p_state (process VARCHAR, ts_ns BIGINT, enabled BOOLEAN, reason VARCHAR)")
    _insert(con, "p_state", [(ids[proc], ts, enabled, reason) for proc, ts, enabled, reason in raw.states])
    con.execute("CREATE TEMP TABLE p_problem (seq INTEGER, problem VARCHAR)")
    _insert(con, "p_problem", list(enumerate(raw.problems)))
    con.execute("CREATE TEMP TABLE p_id (proc INTEGER, process VARCHAR)")
    _insert(con, "p_id", sorted(ids.items()))
    copies = {
        "process": "SELECT * FROM p_process ORDER BY idx",
        "line": "SELECT * FROM p_line ORDER BY process, lineno",
        "state": "SELECT * FROM p_state",
        "problem": "SELECT * FROM p_problem ORDER BY seq",
        "channel": "SELECT i.process, c.id, c.kind, c.domain, c.name FROM channel c JOIN p_id i USING (proc)",
        "record": "SELECT i.process, r.* EXCLUDE (proc) FROM record r JOIN p_id i USING (proc)",
    }
    for table, query in copies.items():
        path = str(table_path(staging, table)).replace("'", "''")
        con.execute(f"COPY ({query}) TO '{path}' (FORMAT parquet, COMPRESSION zstd)")
    row = con.execute("SELECT count(*) FROM record").fetchone()
    manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "written_by": f"service-profiler {__version__}",
                "sources": sources, "problems": raw.problems[:raw.scan_problems_from]}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return int(row[0]) if row else 0


def _unique_ids(processes: Sequence[Process]) -> dict[int, str]:
    ids: dict[int, str] = {}
    seen: set[str] = set()
    for p in processes:
        pid = process_id(p)
        if pid in seen:  # files without a clock anchor, one host and pid: told apart by position
            pid = f"{pid}#{p.index}"
        seen.add(pid)
        ids[p.index] = pid
    return ids


def _process_row(p: Process, pid: str, source: dict[str, Any]) -> tuple[Any, ...]:
    dumps = json.dumps
    gaps = [g.as_dict() for g in p.loss.all_gaps()]
    return (pid, p.index, p.key, p.hostname, p.pid, p.ppid, p.role, p.dp_rank, p.wall_offset_ns, p.path,
            source.get("size"), source.get("mtime_ns"), p.rec_lines, p.dropped, p.profiler_version, dumps(p.argv),
            dumps(p.engine), dumps(p.meta, default=str), dumps(list(p.warnings.values())), dumps(p.patch, default=str),
            p.loss.status, p.loss.close_reason, p.loss.flushed_until_ns, dumps(gaps), dumps(p.header))


def _insert(con: duckdb.DuckDBPyConnection, table: str, rows: list[tuple[Any, ...]]) -> None:
    """Rows in statements of several hundred (DuckDB's executemany runs one statement per row)."""
    if not rows:
        return
    one = "(" + ", ".join("?" * len(rows[0])) + ")"
    for start in range(0, len(rows), _ROWS_PER_INSERT):
        chunk = rows[start:start + _ROWS_PER_INSERT]
        con.execute(f"INSERT INTO {table} VALUES " + ", ".join([one] * len(chunk)), [v for r in chunk for v in r])


def _replace(staging: Path, target: Path) -> None:
    """`staging` becomes `target`; an older conversion there (checked to be ours) is removed after."""
    old: Path | None = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{PARQUET_DIR}-old-", dir=target.parent))
        os.rename(target, old / PARQUET_DIR)
    os.rename(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
