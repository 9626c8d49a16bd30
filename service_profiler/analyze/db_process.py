"""profiler.db and per_iteration_requests.csv, written by one process beside the rest of analyze.

The process is forked before the run is read, so its heap stays small. It first writes SQLite's raw
tables straight from the raw files (`sqlite_export.write_raw_db`, a stream), then waits. Once analyze
has built its tables it writes the analysis tables and the per-request batch entries
(`sqlite_export.analysis_messages`, built a chunk at a time) into a spool file of pickles and hands it
over. This process then inserts them, writes per_iteration_requests.csv from the same entry chunks,
builds the indexes and views, and moves profiler.db into place. Meanwhile analyze writes the trace and
the other CSVs.

Writing the spool costs analyze a fraction of the inserts and CSV formatting it hands over (pickling
a row is ~10x cheaper than binding it into SQLite or formatting it), and a file rather than a pipe
never blocks analyze on the slower consumer. Where the platform cannot fork (or
SERVICE_PROFILER_NO_FORK is set) the same steps run in-process at `hand_over`, in the same order.

Failures: the raw tables failing costs profiler.db alone (reported as such); the per-iteration CSV
failing here is left to analyze, which then writes that file itself (`per_iteration_written` is false).
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from . import sqlite_export
from .csv_export import PerIterationWriter
from .sqlite_export import Message, SqliteExport, analysis_messages
from .steps import Outcome, fork_context, run_step
from .tables import AnalysisTables

RAW_LABEL, DB_LABEL = "SQLite raw tables", "SQLite"
_PICKLE_PROTOCOL = 5


def _spool_messages(path: Path) -> Iterator[Message]:
    with path.open("rb") as fh:
        while True:
            try:
                yield pickle.load(fh)
            except EOFError:
                return


class DatabaseProcess:
    """Owns profiler.db for one analysis: `__init__` starts the raw tables (forked where possible),
    `hand_over` gives it the analysis tables, `collect` waits for it and merges what it produced."""

    def __init__(self, progress: Callable[[str], None], paths: Sequence[Path], out_dir: Path) -> None:
        self.progress, self.paths, self.out_dir = progress, list(paths), out_dir
        self.db_path = out_dir / "profiler.db"
        self.raw_db = out_dir / "profiler.db.raw.tmp"
        self.spool = out_dir / "profiler.db.spool.tmp"
        self.per_iteration_written = False
        self.proc: Any = None
        self.conn: Any = None
        self.handed_over = False  # the process was told what to do after the raw tables
        self.sent_tables = False  # ... and that was to complete the database
        self.outcomes: list[Outcome] = []  # in-process mode: the steps' outcomes as they ran
        ctx = fork_context()
        if ctx is None:
            return
        for stream in (sys.stdout, sys.stderr):  # else the child flushes the parent's pending text again
            stream.flush()
        parent_end, child_end = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=self._child, args=(child_end, parent_end), name="analyze-db", daemon=True)
        try:
            proc.start()
        except OSError:  # out of processes / memory: everything runs in-process at hand_over
            parent_end.close()
            child_end.close()
            return
        child_end.close()
        self.proc, self.conn = proc, parent_end

    @property
    def forked(self) -> bool:
        """Whether the steps run in a process of their own (else in-process, at hand_over)."""
        return self.proc is not None

    # -- the steps, wherever they run -------------------------------------------------------------

    def _write_raw(self) -> str:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        sqlite_export.write_raw_db(self.paths, self.raw_db)
        return "SQLite raw tables written"

    def _complete(self, messages: Iterator[Message], per_iteration: PerIterationWriter | None
                  ) -> tuple[Outcome, bool]:
        """Insert the messages into the raw tables' file and feed the per-iteration writer the entry
        chunks; (the SQLite step's outcome, whether the per-iteration CSV is complete). Without the
        raw tables the database fails but the per-iteration CSV is still written."""
        export: list[SqliteExport] = []

        def database() -> Path:
            export.append(SqliteExport(self.db_path, self.raw_db).start())
            export[0].apply(messages, per_iteration.feed if per_iteration is not None else None)
            return export[0].finish()

        try:
            outcome = run_step(DB_LABEL, database, self.progress)
            if per_iteration is not None and not export:  # the database could not start: the CSV alone
                for message in messages:
                    if message[0] == "entries":
                        per_iteration.feed(message[1])
        except BaseException:
            if per_iteration is not None:
                per_iteration.close(complete=False)
            raise
        finally:
            self.raw_db.unlink(missing_ok=True)
        if per_iteration is None:
            return outcome, False
        # complete when every chunk reached it: a database failing mid-way stopped the feeding
        per_iteration.close(complete=not outcome[2] or not export)
        return outcome, per_iteration.complete

    # -- the forked process -----------------------------------------------------------------------

    def _child(self, conn: Any, parent_end: Any) -> None:
        parent_end.close()
        outcomes = [run_step(RAW_LABEL, self._write_raw, self.progress)]
        written = False
        try:
            order = conn.recv()
        except EOFError:  # analyze is gone
            order = None
        if order is not None:
            spool, labels, per_iteration_path = order
            writer = PerIterationWriter(labels, per_iteration_path) if per_iteration_path is not None else None
            try:
                outcome, written = self._complete(_spool_messages(spool), writer)
            finally:
                spool.unlink(missing_ok=True)
            outcomes.append(outcome)
        try:
            conn.send((outcomes, written))
        except OSError:  # analyze is gone
            pass
        conn.close()

    # -- analyze's side ---------------------------------------------------------------------------

    def hand_over(self, tables: AnalysisTables, labels: list[str], per_iteration_path: Path | None) -> str:
        """Give the process the analysis tables (and, with `per_iteration_path`, the per-iteration CSV
        to write). Forked: spooled, then this returns; in-process: everything runs now."""
        self.handed_over = True
        if self.proc is None:
            self.outcomes.append(run_step(RAW_LABEL, self._write_raw, self.progress))
            writer = PerIterationWriter(labels, per_iteration_path) if per_iteration_path is not None else None
            outcome, self.per_iteration_written = self._complete(analysis_messages(tables), writer)
            self.outcomes.append(outcome)
            return "SQLite written"
        try:
            with self.spool.open("wb") as fh:
                for message in analysis_messages(tables):
                    pickle.dump(message, fh, protocol=_PICKLE_PROTOCOL)
            self.conn.send((self.spool, labels, per_iteration_path))
            self.sent_tables = True
        except BaseException:
            self.spool.unlink(missing_ok=True)
            self.abandon()
            raise
        return "SQLite tables handed to the database process"

    def collect(self, produced: list[Path], notes: list[str], failures: list[str]) -> None:
        """Wait for the process (when there is one) and merge what its steps produced."""
        outcomes = self.outcomes
        if self.proc is not None:
            if not self.handed_over:
                self.cancel()
            try:
                outcomes, self.per_iteration_written = self.conn.recv()
            except (EOFError, OSError):
                outcomes = []
            self.conn.close()
            self.proc.join()
            labels = [RAW_LABEL, DB_LABEL] if self.sent_tables else [RAW_LABEL]
            outcomes += [([], [], [f"{label}: the exporter process died (exit code {self.proc.exitcode})"])
                         for label in labels[len(outcomes):]]
            self.proc = None
            self._remove_leftovers()  # a process that died left them
        for made, said, failed in outcomes:
            produced.extend(made)
            notes.extend(said)
            failures.extend(failed)

    def cancel(self) -> None:
        """Let the process finish its raw tables and exit without a database (no analysis to add)."""
        if self.proc is not None and not self.handed_over:
            self.handed_over = True
            try:
                self.conn.send(None)
            except OSError:
                pass

    def abandon(self) -> None:
        """Stop the process at once and remove its files (the analysis failed)."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.join()
            self.conn.close()
            self.proc = None
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        for path in (self.spool, self.raw_db, self.db_path.with_name(self.db_path.name + ".tmp")):
            path.unlink(missing_ok=True)
