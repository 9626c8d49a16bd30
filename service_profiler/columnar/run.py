"""One analysis: a DuckDB database holding the run's records and its analysis tables.

DuckDB keeps at most `memory_limit` of the database in memory and spills the rest to a fresh private
directory (`work_dir`, removed by `close`), so memory is bounded by that setting, not by the run.
Exporters read the tables through `con` (one at a time), or (`shared`), in a process pool, by opening the
database file read-only once this process has closed it (`reopen_read_only`).

The database is in memory (spilling to `work_dir`) unless it is `shared`: then it is a file there, which
the pool's workers open. Writing a table into a database file costs about twice the CPU of building it
(DuckDB compresses it at each checkpoint), so a file is made only when another process needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from .batch import build_batches, malformed_entry_problems
from .completeness import load_losses
from .iterations import build_iterations
from .kvcache import build_kvcache
from .lifecycle import build_lifecycle
from .parquet_in import load_input
from .raw import Process
from .requests import build_requests
from .workdir import WorkDir, make_work_dir

DEFAULT_MEMORY_LIMIT = "1GB"
SMALL_RUN_RECORDS = 100_000
"""A run of fewer records has its tables built on one DuckDB thread, unless `threads` says otherwise:
there a second thread saved no time (the figure process starts on the other core meanwhile) and cost
CPU (benchmarks/README.md)."""
DB_NAME = "analysis.duckdb"


@dataclass
class AnalysisRun:
    con: duckdb.DuckDBPyConnection
    work_dir: Path
    processes: list[Process] = field(default_factory=list)
    states: list[tuple[int, int, bool, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    memory_limit: str = DEFAULT_MEMORY_LIMIT
    threads: int | None = None
    shared: bool = False  # a database file other processes can open (`reopen_read_only`)
    owner: WorkDir | None = None  # the work directory's lock, held by the process that made it (workdir.py)

    def __getstate__(self) -> dict[str, object]:
        """Everything but the connection (a pool's worker opens its own, `reopen_read_only`) and the
        work directory's lock (its maker's)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("con", "owner")}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)

    def count(self, table: str) -> int:
        row = self.con.execute(f"SELECT count(*) FROM {table}").fetchone()
        return int(row[0]) if row else 0

    def dicts(self, query: str) -> list[dict[str, Any]]:
        """The rows of `query`, as dicts by column name."""
        cursor = self.con.execute(query)
        names = [d[0] for d in cursor.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def close(self) -> None:
        """Close the database and remove the work directory (a worker's `reopen_read_only` run leaves it
        to the run that made it)."""
        self.con.close()
        if self.owner is not None:
            self.owner.remove()

    def reopen_read_only(self) -> AnalysisRun:
        """This run's tables through a read-only connection (in a pool's worker process)."""
        if not self.shared:
            raise ValueError("this analysis's database is in memory: make it with analyze_run(shared=True)")
        con = connect(self.work_dir, self.memory_limit, self.threads, read_only=True)
        return AnalysisRun(con, self.work_dir, self.processes, self.states, self.problems, self.memory_limit,
                           self.threads, shared=True)


def connect(work_dir: Path, memory_limit: str, threads: int | None, read_only: bool = False, in_memory: bool = False
            ) -> duckdb.DuckDBPyConnection:
    # DuckDB's allocator keeps freed memory for reuse, which its memory limit does not count; its background
    # thread hands that back to the system as it ages (less memory at the same speed: benchmarks/README.md)
    config: dict[str, str | bool | int | float | list[str]] = {
        "memory_limit": memory_limit, "temp_directory": str(work_dir / "spill"), "preserve_insertion_order": False,
        "allocator_background_threads": True,
        # The one extension loaded, SQLite's for profiler.db, is checked as this process's own code is
        # (sqlite_out._load_sqlite_extension) instead of by its signature: verifying that took about a tenth
        # of a second of CPU on every run, a few percent of a small run's analysis. Every other extension
        # used is built in: none is installed or loaded behind our back.
        "allow_unsigned_extensions": True, "autoinstall_known_extensions": False,
        "autoload_known_extensions": False}
    if threads:
        config["threads"] = threads
    return duckdb.connect(":memory:" if in_memory else str(work_dir / DB_NAME), read_only=read_only, config=config)


def duckdb_threads(con: duckdb.DuckDBPyConnection) -> int:
    row = con.execute("SELECT current_setting('threads')").fetchone()
    return int(row[0]) if row else 1


def set_threads(con: duckdb.DuckDBPyConnection, threads: int) -> int:
    """DuckDB's threads from now on (at least one); the number it had."""
    previous = duckdb_threads(con)
    con.execute(f"SET threads = {max(int(threads), 1)}")
    return previous


BatchesBuilt = Callable[[AnalysisRun], Callable[[], object]]
"""Called once the batch and request tables exist, before the others are built. It may start work that
reads them (each on a cursor of its own); it returns what waits for that work to end, which is called
before the run is closed should building the other tables fail."""


def analyze_run(paths: Sequence[Path | str], *, memory_limit: str = DEFAULT_MEMORY_LIMIT, threads: int | None = None,
                temp_root: Path | None = None, progress: Callable[[str], None] | None = None,
                shared: bool = False, batches_built: BatchesBuilt | None = None) -> AnalysisRun:
    """Read the raw files under `paths` (or their Parquet conversions) and build every analysis table
    (`shared`: in a database file that a process pool's workers can open)."""
    owner = make_work_dir("sprof-analysis-", temp_root, progress)
    try:
        con = connect(owner.path, memory_limit, threads, in_memory=not shared)
    except BaseException:
        owner.remove()
        raise
    run = AnalysisRun(con, owner.path, memory_limit=memory_limit, threads=threads, shared=shared, owner=owner)
    started: Callable[[], object] | None = None
    try:
        # the raw files, or their Parquet conversions (parquet_in.py)
        raw = load_input(con, paths, progress, scratch_root=owner.path)
        run.processes, run.states, run.problems = raw.processes, raw.states, raw.problems
        records = run.count("record")
        if progress:
            progress(f"read {len(raw.processes)} process file(s), {records:,} records")
        all_threads = set_threads(con, 1) if threads is None and records < SMALL_RUN_RECORDS else None
        load_losses(con, raw.processes, raw.states)
        build_batches(con)
        build_requests(con)
        run.problems += malformed_entry_problems(con, raw.processes)
        if progress:
            progress(f"tables: {run.count('request'):,} requests, {run.count('batch'):,} batches")
        if batches_built is not None:
            started = batches_built(run)
        build_kvcache(con)
        build_lifecycle(con)
        build_iterations(con)
        if all_threads is not None:
            set_threads(con, all_threads)
        if shared:
            con.execute("CHECKPOINT")
    except BaseException:
        if started is not None:
            started()
        run.close()
        raise
    return run
