"""profiler.db and the CSVs made from its tables, written by one process beside the rest of analyze.

Large runs (raw files above STREAM_ABOVE_BYTES): the process is forked before the run is read, so its
heap stays small. It first writes SQLite's raw tables straight from the raw files
(`sqlite_export.write_raw_db`, a stream), then waits. Once analyze has built its batch and request
tables it writes them, in parts, and the batches' entries (`sqlite_export.core_messages`, a chunk of
batches at a time) into a spool file of pickles (`start_hand_over`), and the other tables once they
are built (`hand_over`); this process reads the spool as it is written (`tail_spool`). It builds the
per-request rows of the entries (`entries.build_chunk`), inserts it all, writes
per_iteration_requests.csv from the same entry chunks, batch.csv from the batch table's parts and the
entries, and the CSVs made from one of those tables alone (`csv_export.TABLE_CSVS`: request, events,
state transitions), builds the indexes and views, and moves profiler.db into place. Meanwhile analyze
writes the trace and the other CSVs.

Writing the spool costs analyze a fraction of the inserts and CSV formatting it hands over (pickling
a row is ~10x cheaper than binding it into SQLite or formatting it), and a file rather than a pipe
never blocks analyze on the slower consumer.

Small runs: the process is forked at `hand_over`, after the read, and inherits the records and
tables: no second parse of the raw files, no spool (`sqlite_export.write_raw_db_from`). analyze then
writes every CSV itself (it passes no `csv_dir`): it has the time, and the database is done sooner. The pages
analyze then touches are copied (copy-on-write), which is a few MB here and would be the whole run on
a large one. Where the platform cannot fork (or SERVICE_PROFILER_NO_FORK is set) the same steps run
in-process at `hand_over`.

Failures: the raw tables failing costs profiler.db alone (reported as such); a CSV that fails here (or
is never reached) is left to analyze, which then writes that file itself (it is not in `csv_written`).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from service_profiler.outputs import private_dir, remove_private_dir
from service_profiler.rawdata.rawfile import RunData

from . import sqlite_export
from .csv_export import (
    BATCH_CSV,
    TABLE_CSVS,
    BatchCsvFormat,
    BatchCsvWriter,
    FedCsv,
    PerIterationWriter,
    TableCsvWriter,
)
from .sqlite_export import (
    EntryBuilder,
    Message,
    SqliteExport,
    analysis_messages,
    core_messages,
    stored_messages,
)
from .steps import Outcome, merge, run_step, start_forked
from .tables import AnalysisTables

PER_ITERATION_CSV = "per_iteration_requests.csv"

RAW_LABEL, DB_LABEL = "SQLite raw tables", "SQLite"
_PICKLE_PROTOCOL = 5
# Raw files above this are streamed by a process forked before the read; at or below it the process
# is forked after the read (~50k records: a second parse would cost more than the copied pages).
STREAM_ABOVE_BYTES = 32 * 2**20


_SPOOL_COMPLETE = "spool complete"  # analyze's word on the pipe once the spool holds every message
_LENGTH_BYTES = 8


def write_spool_message(fh: BinaryIO, message: Message) -> None:
    """One message as a length-prefixed pickle, flushed: the database process reads it at once."""
    data = pickle.dumps(message, protocol=_PICKLE_PROTOCOL)
    fh.write(len(data).to_bytes(_LENGTH_BYTES, "little"))
    fh.write(data)
    fh.flush()


def tail_spool(path: Path, conn: Any, poll_s: float = 0.01) -> Iterator[Message]:
    """The spool's messages while analyze is still writing it: at the end of what is written so far,
    wait for more, until analyze says on `conn` that the spool is complete and all of it is read.
    EOFError when analyze is gone before that (its end of the pipe closed)."""
    complete = False
    with path.open("rb") as fh:

        def read(n: int) -> bytes | None:
            nonlocal complete
            data = b""
            while len(data) < n:
                more = fh.read(n - len(data))
                if more:
                    data += more
                elif complete:
                    if data:
                        raise EOFError(f"{path}: the spool ends inside a message")
                    return None
                elif conn.poll(poll_s) and conn.recv() == _SPOOL_COMPLETE:  # recv: EOFError if analyze is gone
                    complete = True
            return data

        while (head := read(_LENGTH_BYTES)) is not None:
            data = read(int.from_bytes(head, "little"))
            if data is None:
                raise EOFError(f"{path}: the spool ends inside a message")
            yield pickle.loads(data)


def _pids(run: RunData) -> list[int]:
    return [p.pid for p in run.processes]


class DatabaseProcess:
    """Owns profiler.db for one analysis: `__init__` starts streaming the raw tables on a large run,
    `hand_over` gives it the analysis tables, `collect` waits for it and merges what it produced."""

    def __init__(self, progress: Callable[[str], None], paths: Sequence[Path], raw_files: Sequence[Path],
                 out_dir: Path) -> None:
        """`paths`: analyze's input paths; `raw_files`: the raw files found under them."""
        self.progress, self.paths, self.out_dir = progress, list(paths), out_dir
        self.db_path = out_dir / "profiler.db"
        # Its working files (the raw tables' file, the database being completed, the spool of pickles
        # it reads back) are in a directory only this user can enter: nothing another user planted (a
        # link, a crafted spool) is ever written through or unpickled. profiler.db is moved into place.
        out_dir.mkdir(parents=True, exist_ok=True)
        self.work_dir: Path | None = private_dir(out_dir, "profiler.db")
        self.raw_db = self.work_dir / "profiler.db.raw.tmp"
        self.spool = self.work_dir / "profiler.db.spool.tmp"
        self.csv_written: list[Path] = []  # the CSVs this process wrote (analyze writes the others)
        self.proc: Any = None
        self.conn: Any = None
        self.streaming = False  # forked before the read, streaming the raw files (else: at hand_over)
        self.handed_over = False  # the process was told what to do after the raw tables
        self.sent_tables = False  # ... and that was to complete the database
        self.spool_fh: BinaryIO | None = None  # the spool, while analyze writes it
        self.start_error: Exception | None = None  # what failed in `start_hand_over`
        self.outcomes: list[Outcome] = []  # in-process mode: the steps' outcomes as they ran
        size = 0
        for path in raw_files:
            try:
                size += path.stat().st_size
            except OSError:  # the reader reports it
                pass
        if size > STREAM_ABOVE_BYTES and self._fork(self._streaming_child, ()):
            self.streaming = True

    def _fork(self, target: Callable[..., None], args: tuple[Any, ...]) -> bool:
        """Start `target(conn, *args)` in a forked process; False where that cannot be."""
        started = start_forked("analyze-db", target, args)
        if started is None:  # everything then runs in-process at hand_over
            return False
        self.proc, self.conn = started
        return True

    # -- the steps, wherever they run -------------------------------------------------------------

    def _write_raw(self, run: RunData | None = None) -> str:
        """From the raw files as a stream, or from `run` when it has been read already."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if run is None:
            sqlite_export.write_raw_db(self.paths, self.raw_db)
        else:
            sqlite_export.write_raw_db_from(run, self.raw_db)
        return "SQLite raw tables written"

    def _complete(self, messages: Iterator[Message], labels: list[str], pids: list[int], csv_dir: Path | None
                  ) -> tuple[Outcome, list[Path]]:
        """Insert the messages into the raw tables' file; with `csv_dir`, write per_iteration_requests.csv
        from the entry chunks, batch.csv from the batch table's parts and the entries, and TABLE_CSVS
        from their tables there. (The SQLite step's outcome, the CSVs written.) Without the raw tables the
        database fails but the CSVs are still written. `labels`, `pids`: each process's, by index."""
        # the CSVs are written in the working directory until complete: a process killed mid-way leaves
        # nothing in the output directory (analyze removes the working directory)
        work = self.work_dir
        per_iteration = PerIterationWriter(labels, csv_dir / PER_ITERATION_CSV, work) if csv_dir is not None else None
        table_csvs = {table_name: (name, make_format) for name, (table_name, make_format) in TABLE_CSVS.items()}
        writers: dict[str, FedCsv] = {}  # table name -> its CSV, while its parts pass
        written: list[Path] = []

        def finished(writer: FedCsv) -> None:
            writer.close()
            if writer.complete:
                written.append(writer.path)

        def start(table: str, columns: list[str]) -> FedCsv | None:
            """The CSV that starts with this table's first part, if any: batch.csv (fed the batch table's
            parts and the entries), or one of TABLE_CSVS (fed its table's parts)."""
            assert csv_dir is not None
            if table == "batch":
                return BatchCsvWriter(csv_dir / BATCH_CSV, BatchCsvFormat(labels, pids, columns), work)
            if table in table_csvs:
                name, make_format = table_csvs[table]
                return TableCsvWriter(csv_dir / name, make_format(labels, columns), work)
            return None

        def tap(messages: Iterator[Message]) -> Iterator[Message]:
            """The messages, each CSV written a part at a time as they pass (no table is held)."""
            for message in messages:
                if csv_dir is not None:
                    kind, item = message
                    table = "batch" if kind == "entries" else item.name
                    if kind == "table" and item.start == 0:
                        try:
                            writer = start(table, item.columns)
                        except Exception:  # analyze writes it instead, and reports what fails there
                            writer = None
                        if writer is not None:
                            writers[table] = writer
                    writer = writers.get(table)
                    if writer is not None and not writer.fh.closed:
                        writer.feed(message)
                        if writer.done:
                            finished(writer)
                yield message

        export: list[SqliteExport] = []

        def database() -> Path:
            export.append(SqliteExport(self.db_path, self.raw_db).start())
            export[0].apply(tap(messages), per_iteration.feed if per_iteration is not None else None)
            return export[0].finish()

        try:
            outcome = run_step(DB_LABEL, database, self.progress)
            if not export:  # the database could not start: the CSVs alone
                builder = EntryBuilder()
                for message in tap(messages):
                    if message[0] == "entries" and per_iteration is not None:
                        per_iteration.feed(builder.chunk(message[1])[0])
        except BaseException:
            if per_iteration is not None:
                per_iteration.close(complete=False)
            raise
        finally:
            self.raw_db.unlink(missing_ok=True)
            for writer in writers.values():  # the tables the database never got to the end of
                if not writer.fh.closed:
                    writer.close(complete=False)
        if per_iteration is not None:
            # complete when every chunk reached it: a database failing mid-way stopped the feeding
            per_iteration.close(complete=not outcome[2] or not export)
            if per_iteration.complete:
                written.append(per_iteration.path)
        return outcome, written

    # -- the forked process -----------------------------------------------------------------------

    def _late_child(self, conn: Any, run: RunData, tables: AnalysisTables, labels: list[str],
                    csv_dir: Path | None) -> None:
        """Forked after the read: the records and tables are this process's (copy-on-write) own."""
        outcomes = [run_step(RAW_LABEL, lambda: self._write_raw(run), self.progress)]
        outcome, written = self._complete(analysis_messages(tables), labels, _pids(run), csv_dir)
        try:
            conn.send(([*outcomes, outcome], written))
        except OSError:  # analyze is gone
            pass
        conn.close()

    def _streaming_child(self, conn: Any) -> None:
        """Forked before the read: the raw tables from the files, then the analysis from the spool."""
        outcomes = [run_step(RAW_LABEL, self._write_raw, self.progress)]
        try:
            order = conn.recv()
        except EOFError:  # analyze is gone
            order = None
        written: list[Path] = []
        if order is not None:
            spool, labels, pids, csv_dir = order
            try:
                outcome, written = self._complete(tail_spool(spool, conn), labels, pids, csv_dir)
            finally:
                spool.unlink(missing_ok=True)
            outcomes.append(outcome)
        try:
            conn.send((outcomes, written))
        except OSError:  # analyze is gone
            pass
        conn.close()

    # -- analyze's side ---------------------------------------------------------------------------

    def start_hand_over(self, run: RunData, tables: AnalysisTables, labels: list[str], csv_dir: Path | None
                        ) -> None:
        """Streaming: start the spool with what `tables` holds so far, the request and batch tables and the
        batches' entries (`sqlite_export.core_messages`), while analyze builds the others; `hand_over`
        writes the rest. The process thus starts on the largest part of its work ~1 s sooner. Elsewhere
        it does nothing. A failure here is `hand_over`'s to raise (the analysis itself goes on)."""
        if not self.streaming or self.handed_over:
            return
        self.handed_over = True
        try:
            self.spool_fh = self.spool.open("wb")
            self.sent_tables = True
            # the process reads the spool while it is written (it may still be on its raw tables)
            if self._tell((self.spool, labels, _pids(run), csv_dir)):
                for message in core_messages(tables):
                    write_spool_message(self.spool_fh, message)
            else:
                self.spool_fh.close()  # the process is gone: collect reports how it ended
        except Exception as exc:
            self._abandon_spool()
            self.start_error = exc

    def _abandon_spool(self) -> None:
        if self.spool_fh is not None:
            self.spool_fh.close()
        self.spool.unlink(missing_ok=True)
        self.abandon()

    def hand_over(self, run: RunData, tables: AnalysisTables, labels: list[str], csv_dir: Path | None) -> str:
        """Give the process the analysis tables (and, with `csv_dir`, batch.csv, per_iteration_requests.csv
        and TABLE_CSVS to write there). Streaming: spooled (what `start_hand_over` did not spool yet);
        small runs: a process forked now; in either case this returns at once. Without fork: everything
        runs now."""
        if self.streaming:
            self.start_hand_over(run, tables, labels, csv_dir)
            if self.start_error is not None:
                raise self.start_error
            fh = self.spool_fh
            try:
                if fh is not None and not fh.closed:
                    for message in stored_messages(tables):
                        write_spool_message(fh, message)
                    fh.close()
                    self._tell(_SPOOL_COMPLETE)
            except BaseException:
                self._abandon_spool()
                raise
            return "SQLite tables handed to the database process"
        self.handed_over = True
        if self._fork(self._late_child, (run, tables, labels, csv_dir)):
            self.sent_tables = True
            return "SQLite handed to the database process"
        self.outcomes.append(run_step(RAW_LABEL, lambda: self._write_raw(run), self.progress))
        outcome, self.csv_written = self._complete(analysis_messages(tables), labels, _pids(run), csv_dir)
        self.outcomes.append(outcome)
        return "SQLite written"

    def _tell(self, message: Any) -> bool:
        """Send the process a message; False when it is gone (`collect` reports how it ended)."""
        try:
            self.conn.send(message)
        except OSError:
            return False
        return True

    def collect(self, produced: list[Path], notes: list[str], failures: list[str]) -> None:
        """Wait for the process (when there is one) and merge what its steps produced."""
        outcomes = self.outcomes
        if self.proc is not None:
            if not self.handed_over:
                self.cancel()
            try:
                outcomes, self.csv_written = self.conn.recv()
            except (EOFError, OSError):
                outcomes = []
            self.conn.close()
            self.proc.join()
            labels = [RAW_LABEL, DB_LABEL] if self.sent_tables else [RAW_LABEL]
            outcomes += [([], [], [f"{label}: the exporter process died (exit code {self.proc.exitcode})"])
                         for label in labels[len(outcomes):]]
            self.proc = None
        self._remove_leftovers()  # what a process that died left, and the working directory
        for outcome in outcomes:
            merge(outcome, produced, notes, failures)

    def cancel(self) -> None:
        """Let a streaming process finish its raw tables and exit without a database (no analysis)."""
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
        remove_private_dir(self.work_dir)
        self.work_dir = None
