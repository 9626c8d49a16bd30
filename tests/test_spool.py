"""The database process reads the spool while analyze writes it (`db_process.tail_spool`)."""

from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from service_profiler.analyze import db_process


class _Collect:
    """A file-like sink: write_spool_message's bytes, to be written to the spool in two halves."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.parts.append(data)

    def flush(self) -> None:
        pass


def _write_slowly(path: Path, conn: Any, messages: list[Any], complete: bool = True) -> None:
    """Like analyze: the order first, then message after message, some in two halves with a pause
    between (the reader meets the end of the file mid-message), then the word that it is complete."""
    with path.open("wb") as fh:
        for k, message in enumerate(messages):
            if k % 3 == 0:  # the length and half the pickle, a pause, then the rest
                halves = _Collect()
                db_process.write_spool_message(halves, message)  # type: ignore[arg-type]
                data = b"".join(halves.parts)
                fh.write(data[: len(data) // 2])
                fh.flush()
                time.sleep(0.03)
                fh.write(data[len(data) // 2:])
                fh.flush()
            else:
                db_process.write_spool_message(fh, message)
            time.sleep(0.01)
    if complete:
        conn.send(db_process._SPOOL_COMPLETE)
    else:
        conn.close()  # analyze died


def test_messages_are_read_as_they_are_written(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    path.write_bytes(b"")
    reader_end, writer_end = multiprocessing.Pipe(duplex=True)
    messages = [("table", {"rows": list(range(k * 1000))}) for k in range(8)] + [("entries", "x" * 100_000)]
    writer = threading.Thread(target=_write_slowly, args=(path, writer_end, messages))
    started = time.monotonic()
    writer.start()
    got, first_at = [], None
    for message in db_process.tail_spool(path, reader_end):
        first_at = first_at if first_at is not None else time.monotonic() - started
        got.append(message)
    writer.join()
    assert got == messages
    assert first_at is not None and first_at < 0.2  # the first message long before the writer was done


def test_analyze_gone_mid_spool_is_an_error_not_a_hang(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    path.write_bytes(b"")
    reader_end, writer_end = multiprocessing.Pipe(duplex=True)
    writer = threading.Thread(target=_write_slowly, args=(path, writer_end, [("a", 1), ("b", 2)], False))
    writer.start()
    got = []
    with pytest.raises(EOFError):
        for message in db_process.tail_spool(path, reader_end):
            got.append(message)
    writer.join()
    assert got == [("a", 1), ("b", 2)]


def test_a_spool_cut_inside_a_message_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    with path.open("wb") as fh:
        db_process.write_spool_message(fh, ("a", 1))
        db_process.write_spool_message(fh, ("b", list(range(100))))
    path.write_bytes(path.read_bytes()[:-5])
    reader_end, writer_end = multiprocessing.Pipe(duplex=True)
    writer_end.send(db_process._SPOOL_COMPLETE)
    got = []
    with pytest.raises(EOFError, match="ends inside a message"):
        for message in db_process.tail_spool(path, reader_end):
            got.append(message)
    assert got == [("a", 1)]
