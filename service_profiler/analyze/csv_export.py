"""CSV outputs.

`request.csv`, `batch.csv` and `kvcache.csv` start with msserviceprofiler's columns in its exact order
so existing scripts keep working, followed by ours. Those columns mean:

- request.csv: http_rid = the API server's id (else the engine rid); start_datetime = arrival at the
  API server (UTC ISO); recv_token_size / reply_token_size = input / output tokens;
  execution_time(ms) = e2e (arrival → completion); queue_wait_time(ms) = engine arrival → first
  scheduled; first_token_latency(ms) = TTFT; cache_hit_rate = prefix-cache hit tokens / query tokens.
- batch.csv: one row per scheduler step, name = batchFrameworkProcessing; res_list = JSON list of
  [rid, type (0 prefill / 1 decode), num_scheduled_tokens, num_computed_tokens (before the step),
  num_prompt_tokens, resumed 0/1] (the raw entries; each request's iteration index is in
  per_iteration_requests.csv); start_time / end_time = the schedule span (UTC ISO);
  during_time(ms) = schedule time (model_run_ms / step_ms are in our columns); prof_id = the engine pid.
  Reference columns that are exactly one of ours (BATCH_ALIASES) are not repeated among ours.
- kvcache.csv: one row per allocate / free event and per `kvcache` status sample; status columns carry
  the latest status of that process, so they are never zeroed by a mix of event kinds.

Our column names carry their unit (`_ms`, `_ns` = epoch ns); every timestamp also has a UTC ISO
datetime. Missing values are empty cells. Summaries: see `summary` (percentile method there).
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Callable, Iterable, Sequence
from itertools import chain, repeat
from operator import itemgetter
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from service_profiler.outputs import OutputFile, open_output
from service_profiler.rawdata.fastjson import json_text
from service_profiler.rawdata.rawfile import RunData

from . import lifecycle
from .entries import EntryChunk
from .summary import batch_metrics, describe, request_metrics, service_metrics
from .tables import STORED_TABLES, AnalysisTables

REQUEST_REF_COLUMNS = ["http_rid", "start_datetime", "recv_token_size", "reply_token_size", "execution_time(ms)",
                       "queue_wait_time(ms)", "first_token_latency(ms)", "cache_hit_rate"]
BATCH_REF_COLUMNS = ["name", "res_list", "start_time", "end_time", "during_time(ms)", "batch_type", "prof_id",
                     "total_batch_size", "total_blocks", "used_blocks", "free_blocks", "blocks_allocated",
                     "blocks_freed", "kvcache_usage_rate", "Prefill_batch_size", "Decode_batch_size",
                     "Prefill_scheduled_tokens", "Decode_scheduled_tokens", "total_scheduled_tokens", "dp_rank"]
KVCACHE_REF_COLUMNS = ["domain", "name", "start_time", "total_blocks", "used_blocks", "free_blocks",
                       "blocks_allocated", "blocks_freed", "kvcache_usage_rate"]
SUMMARY_COLUMNS = ["Metric", "Average", "Max", "Min", "P50", "P90", "P99"]
SERVICE_COLUMNS = ["Metric", "Value"]

_NAT = np.iinfo(np.int64).min
BATCH_CSV = "batch.csv"
_BATCH_CSV_BLOCK = 8192  # batch.csv rows formatted at a time
_CSV_BLOCK = 16_384  # rows of the other CSVs formatted at a time
_NUMBERS = frozenset({int, float, bool})
_SCALARS = _NUMBERS | {str, type(None)}


def _csv_writer_quotes(char: str) -> bool:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([f"a{char}b", "c"])
    return buf.getvalue().startswith('"')


# The characters for which csv.writer's minimal quoting quotes a field: the delimiter, the quote, and line
# ends (which ones depends on the Python version: 3.11 leaves a lone "\r" unquoted), asked of csv itself.
_NEEDS_QUOTES = re.compile("[" + re.escape("".join(c for c in ',"\r\n' if _csv_writer_quotes(c))) + "]")


def iso_utc(values: Sequence[Any]) -> list[str]:
    """Epoch ns -> 'YYYY-MM-DDTHH:MM:SS.ffffffZ' (UTC), vectorised; None -> ''."""
    arr = np.fromiter((_NAT if v is None else v for v in values), dtype=np.int64, count=len(values))
    out = np.datetime_as_string(arr.view("datetime64[ns]"), unit="us", timezone="UTC")
    return ["" if s == "NaT" else s for s in out.tolist()]


def _cell(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return ""
    if isinstance(v, tuple | list):
        return json_text(v)
    return v


def csv_text(rows: Sequence[Sequence[Any]]) -> str:
    """`rows` as CSV lines, exactly as `csv.writer(lineterminator="\\n")` writes them, formatted a column
    at a time (`csv_columns_text`)."""
    if not rows:
        return ""
    try:
        columns = list(zip(*rows, strict=True))
    except ValueError:  # rows of unequal length
        return _csv_writer_text(rows)
    return csv_columns_text(columns)


def csv_columns_text(columns: Sequence[Sequence[Any]]) -> str:
    """The rows that `columns` (equally long) make, as CSV lines exactly as `csv.writer(lineterminator=
    "\\n")` writes them, but formatted a column at a time: a column's distinct strings are quoted once
    where they need it and None becomes empty (both by one C-level `map`), then each line is one `%`
    format. csv.writer formats cell by cell, ~3 µs a row of a dozen cells. Columns holding anything but
    scalars take csv.writer."""
    try:
        if len(columns) < 2:  # csv.writer writes a lone empty field as ""
            raise TypeError("one column")
        cells: list[Sequence[Any]] = []
        for column in columns:
            kinds = set(map(type, column))
            if kinds <= _NUMBERS:
                cells.append(column)
                continue
            if not kinds <= _SCALARS:
                raise TypeError("not scalars")
            subst: dict[Any, str] = {None: ""}
            if str in kinds:
                for v in dict.fromkeys(column):
                    if v.__class__ is str and _NEEDS_QUOTES.search(v):
                        subst[v] = _csv_line([v])[:-1]  # csv.writer's own quoting, once per distinct string
            cells.append(list(map(subst.get, column, column)))
    except (TypeError, ValueError):  # unhashable or odd cells
        return _csv_writer_text(list(zip(*columns, strict=True)))
    line = ",".join(["%s"] * len(columns)) + "\n"
    return "".join(map(line.__mod__, zip(*cells, strict=True)))


def _csv_writer_text(rows: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _column(rows: Sequence[tuple[Any, ...]], i: int) -> list[Any]:
    return list(map(itemgetter(i), rows))


def _write(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    with open_output(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh, lineterminator="\n").writerow(header)
        block: list[Sequence[Any]] = []
        for row in rows:
            block.append(row)
            if len(block) >= _CSV_BLOCK:
                fh.write(csv_text(block))
                block.clear()
        fh.write(csv_text(block))
    return path


def process_labels(run: RunData) -> list[str]:
    """How the CSVs name each process (`host:pid`), by process index."""
    return [p.key for p in run.processes]


def _extra(columns: Sequence[str], skip: set[str]) -> tuple[list[str], list[int]]:
    """Our columns after msserviceprofiler's: the table's columns, `proc` shown as `process` (host:pid)."""
    names, idx = [], []
    for i, c in enumerate(columns):
        if c not in skip:
            names.append("process" if c == "proc" else c)
            idx.append(i)
    return names, idx


def request_format(labels: Sequence[str], columns: Sequence[str]) -> CsvFormat:
    """request.csv from request table rows: msserviceprofiler's columns, then ours (`_extra`)."""
    c = {n: i for i, n in enumerate(columns)}
    names, idx = _extra(columns, set(REQUEST_REF_COLUMNS))
    ext_pi = idx.index(c["proc"])
    api_rid, rid, arrival = c["api_rid"], c["rid"], c["arrival_ns"]
    ref = [c[n] for n in ("input_tokens", "output_tokens", "e2e_ms", "queue_ms", "ttft_ms", "cache_hit_rate")]

    def make(part: Sequence[tuple[Any, ...]]) -> list[Sequence[Any]]:
        # request cells are scalars or None
        ext = [_column(part, i) for i in idx]
        ext[ext_pi] = _labelled(labels, ext[ext_pi])
        return [[a or b for a, b in zip(_column(part, api_rid), _column(part, rid), strict=True)],
                iso_utc(_column(part, arrival)), *[_column(part, i) for i in ref], *ext]

    return CsvFormat(REQUEST_REF_COLUMNS + names, make)


def _labelled(labels: Sequence[str], procs: Sequence[Any]) -> list[Any]:
    """Process indexes as their labels (None stays None)."""
    return [None if p is None else labels[p] for p in procs]


# batch.csv's reference columns that are exactly one of our batch-table columns: not repeated after them
BATCH_ALIASES = {
    "during_time(ms)": "schedule_ms", "total_batch_size": "batch_size", "total_blocks": "kv_total_blocks",
    "used_blocks": "kv_used_blocks", "free_blocks": "kv_free_blocks", "kvcache_usage_rate": "kv_usage",
    "Prefill_batch_size": "num_prefill_reqs", "Decode_batch_size": "num_decode_reqs",
    "Prefill_scheduled_tokens": "prefill_tokens", "Decode_scheduled_tokens": "decode_tokens",
}


class BatchCsvFormat:
    """batch.csv: its header, and the text of any run of batch table rows given each one's entries (the
    `reqs` of its schedule span), so the whole table (`write_batch_csv`) or the parts the database
    process is handed (`BatchCsvWriter`) make the same file. The msserviceprofiler columns that alias one of
    ours (BATCH_ALIASES) are not repeated among our columns. res_list is quoted here (one str.replace)
    and spliced into the line: csv.writer's character-by-character quoting of it was half the cost of
    the file."""

    def __init__(self, labels: Sequence[str], pids: Sequence[int], columns: Sequence[str]) -> None:
        """`labels`, `pids`: each process's label (`process_labels`) and pid, by process index."""
        self.labels, self.pids = labels, pids
        c = {n: i for i, n in enumerate(columns)}
        names, self.idx = _extra(columns, set(BATCH_REF_COLUMNS) | set(BATCH_ALIASES.values()))
        self.header = BATCH_REF_COLUMNS + names
        self.start, self.end, self.pi = c["start_ns"], c["end_ns"], c["proc"]
        self.ext_pi = self.idx.index(self.pi)
        self.list_cols = [self.idx.index(c[n]) for n in ("prefill_chunk_sizes", "decode_chunk_sizes")]
        self.ref_idx = [c[n] for n in ("schedule_ms", "batch_type")]
        self.mid_idx = [c[n] for n in (
            "batch_size", "kv_total_blocks", "kv_used_blocks", "kv_free_blocks", "blocks_allocated", "blocks_freed",
            "kv_usage", "num_prefill_reqs", "num_decode_reqs", "prefill_tokens", "decode_tokens",
            "total_scheduled_tokens", "dp_rank")]
        self.texts: dict[Any, str] = {}  # chunk size lists repeat (a decode step's is (1, ..., 1)): each formatted once

    def _list_text(self, sizes: Any) -> str:
        try:
            return self.texts[sizes]
        except KeyError:
            text = self.texts[sizes] = "[" + ",".join(map(str, sizes)) + "]"
            return text
        except TypeError:  # unhashable (a list inside)
            return "[" + ",".join(map(str, sizes)) + "]"

    def text(self, rows: Sequence[tuple[Any, ...]], reqs: Sequence[Any]) -> str:
        """The CSV lines of `rows`; `reqs`: each row's entries (or None / [])."""
        if not rows:
            return ""
        procs = _column(rows, self.pi)
        ext = [_column(rows, i) for i in self.idx]
        ext[self.ext_pi] = list(map(self.labels.__getitem__, procs))
        for i in self.list_cols:
            ext[i] = list(map(self._list_text, ext[i]))
        # every column after res_list; no field holds a newline: datetimes, numbers, names, "[..]" lists
        rest = csv_columns_text([
            iso_utc(_column(rows, self.start)), iso_utc(_column(rows, self.end)),
            *[_column(rows, i) for i in self.ref_idx], list(map(self.pids.__getitem__, procs)),
            *[_column(rows, i) for i in self.mid_idx], *ext]).split("\n")
        return "".join(['batchFrameworkProcessing,"' + json_text(r or []).replace('"', '""') + '",' + line + "\n"
                        for r, line in zip(reqs, rest, strict=False)])  # (rest ends with an empty string)


def write_batch_csv(run: RunData, tables: AnalysisTables, path: Path) -> Path:
    """batch.csv of the whole batch table (`BatchCsvFormat`)."""
    t, spans = tables.batches, tables.batch_spans
    fmt = BatchCsvFormat(process_labels(run), [p.pid for p in run.processes], t.columns)
    with open_output(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(",".join(fmt.header) + "\n")
        # a block of rows at a time: the text of a whole long run's file at once would be ~100 MB more
        # memory at analyze's peak
        for lo in range(0, len(t.rows), _BATCH_CSV_BLOCK):
            hi = min(lo + _BATCH_CSV_BLOCK, len(t.rows))
            fh.write(fmt.text(t.rows[lo:hi], [(spans[k].attrs or {}).get("reqs") for k in range(lo, hi)]))
    return path


class CsvFormat(NamedTuple):
    """How one table becomes a CSV: the header, and the CSV's columns for any run of its rows (a whole
    table, or the parts the database process is handed one after another), for `csv_columns_text`:
    built a column at a time from the table's rows, with no row in between."""

    header: list[str]
    columns: Callable[[Sequence[tuple[Any, ...]]], list[Sequence[Any]]]


def kvcache_format(labels: Sequence[str], columns: Sequence[str]) -> CsvFormat:
    """kvcache.csv from kvcache table rows; `labels`: `process_labels` of the run."""
    c = {n: i for i, n in enumerate(columns)}
    ts, ref = c["ts_ns"], [c[n] for n in ("total_blocks", "used_blocks", "free_blocks", "blocks_allocated",
                                           "blocks_freed", "usage")]
    domain, name, rid, dp, proc = c["domain"], c["name"], c["rid"], c["dp_rank"], c["proc"]

    def make(part: Sequence[tuple[Any, ...]]) -> list[Sequence[Any]]:
        times = _column(part, ts)
        return [_column(part, domain), _column(part, name), iso_utc(times), *[_column(part, i) for i in ref],
                times, _column(part, rid), _column(part, dp), list(map(labels.__getitem__, _column(part, proc)))]

    return CsvFormat([*KVCACHE_REF_COLUMNS, "ts_ns", "rid", "dp_rank", "process"], make)


def _stat_rows(metrics: list[tuple[str, np.ndarray]]) -> list[list[Any]]:
    rows = []
    for name, values in metrics:
        s = describe(values)
        rows.append([name] + [_cell(v) for v in (s.mean, s.max, s.min, s.p50, s.p90, s.p99)])
    return rows


def write_summaries(run: RunData, tables: AnalysisTables, out_dir: Path) -> list[Path]:
    """request_summary.csv, batch_summary.csv (Metric,Average,Max,Min,P50,P90,P99; times in ms) and
    service_summary.csv (Metric,Value; speeds in token/s)."""
    return [
        _write(out_dir / "request_summary.csv", SUMMARY_COLUMNS, _stat_rows(request_metrics(tables))),
        _write(out_dir / "batch_summary.csv", SUMMARY_COLUMNS, _stat_rows(batch_metrics(tables))),
        _write(out_dir / "service_summary.csv", SERVICE_COLUMNS,
               [[k, _cell(v)] for k, v in service_metrics(run, tables)]),
    ]


def timed_format(labels: Sequence[str], columns: Sequence[str], ts_col: str = "ts_ns") -> CsvFormat:
    """A lifecycle table with a UTC datetime column after its `_ns` timestamp and `process` labels."""
    ti, pi = columns.index(ts_col), columns.index("proc")
    header: list[str] = []
    for i, name in enumerate(columns):
        header.append("process" if i == pi else name)
        if i == ti:
            header.append(ts_col.removesuffix("_ns") + "_datetime")

    def make(part: Sequence[tuple[Any, ...]]) -> list[Sequence[Any]]:
        # lifecycle cells are scalars or None (no NaN, no lists): no per-cell conversion needed
        out: list[Sequence[Any]] = [_column(part, i) for i in range(len(columns))]
        out[pi] = _labelled(labels, out[pi])
        out.insert(ti + 1, iso_utc(out[ti]))
        return out

    return CsvFormat(header, make)


def _csv_line(row: Sequence[Any]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([_cell(v) for v in row])
    return buf.getvalue()


class FedCsv:
    """A CSV written a part at a time by another exporter's loop (`feed`): a failure here only stops this
    file (which analyze then writes itself), never the exporter feeding it. `done`: it has been fed all
    it expects (where it can tell); `complete` after `close`: every part was written, and the file is
    in place (an incomplete one is removed: see outputs.OutputFile)."""

    def __init__(self, path: Path, header: Sequence[str], temp_dir: Path | None = None) -> None:
        """`temp_dir`: see outputs.OutputFile."""
        self.path = path
        self.complete = self.failed = self.done = False
        self.error: OSError | None = None
        self.out = OutputFile(path, "w", temp_dir, newline="", encoding="utf-8")
        self.fh = self.out.fh
        csv.writer(self.fh, lineterminator="\n").writerow(header)

    def write_chunk(self, part: Any) -> None:
        raise NotImplementedError

    def feed(self, part: Any) -> None:
        if self.failed:
            return
        try:
            self.write_chunk(part)
        except Exception:
            self.failed = True

    def close(self, complete: bool = True) -> None:
        self.complete = complete and not self.failed
        if self.complete:
            try:
                self.out.commit()
            except OSError as exc:  # the caller learns it from `complete` (and `error`)
                self.complete, self.failed, self.error = False, True, exc
        else:
            self.out.discard()


class TableCsvWriter(FedCsv):
    """One of TABLE_FORMATS, fed the ("table", part) messages of its table (`sqlite_export.TablePart`),
    or written rows at a time (`write_rows`)."""

    def __init__(self, path: Path, fmt: CsvFormat, temp_dir: Path | None = None) -> None:
        super().__init__(path, fmt.header, temp_dir)
        self.columns = fmt.columns

    def write_rows(self, rows: Sequence[tuple[Any, ...]]) -> None:
        self.fh.write(csv_columns_text(self.columns(rows)))

    def write_chunk(self, message: Any) -> None:
        part = message[1]
        self.write_rows(part.rows)
        self.done = part.last


class BatchCsvWriter(FedCsv):
    """batch.csv, fed the messages of `sqlite_export.analysis_messages`: the batch table's parts, and the
    entry sources that follow them (each one's `reqs` are res_list). A part is held until the entries of
    all its batches have passed; `done` once the last part's have."""

    def __init__(self, path: Path, fmt: BatchCsvFormat, temp_dir: Path | None = None) -> None:
        super().__init__(path, fmt.header, temp_dir)
        self.fmt = fmt
        self.rows: list[tuple[Any, ...]] = []  # the batch rows received and not yet written
        self.first = 0  # the batch row of rows[0]
        self.last_part = False

    def write_chunk(self, message: Any) -> None:
        kind, item = message
        if kind == "table":
            self.rows += item.rows
            self.last_part = item.last
        else:
            lo, n = item.first_batch - self.first, len(item.batches)
            if lo != 0 or n > len(self.rows):
                raise ValueError(f"batch.csv: entries of batches {item.first_batch}+{n} do not follow the rows sent")
            self.fh.write(self.fmt.text(self.rows[:n], item.reqs))
            del self.rows[:n]
            self.first += n
        self.done = self.last_part and not self.rows


class PerIterationWriter(FedCsv):
    """per_iteration_requests.csv, written chunk by chunk (`entries.EntryChunk`), so the SQLite export can
    feed it the chunks it receives for batch_req instead of both building them. Each chunk of rows is
    formatted by `map(format % row, zip(columns))`, all in C; only request ids needing quotes (once per
    id), missing values and preempted rows take the csv.writer path."""

    def __init__(self, labels: Sequence[str], path: Path, temp_dir: Path | None = None) -> None:
        """`labels`: each process's label (`process_labels`), by process index."""
        super().__init__(path, [("process" if c == "proc" else c) for c in lifecycle.ITERATION_COLUMNS], temp_dir)
        self.labels = [_csv_line([lbl]).rstrip("\n") for lbl in labels]
        # the batch's four columns (batch_id, dp_rank, process, start_ns) are formatted once per batch
        self.batch_fmt = "%s,%s,%s,%s,"
        self.fmt = "%s" + ",".join(["%s"] * (len(lifecycle.ITERATION_COLUMNS) - 4)) + "\n"
        self.escaped: dict[Any, str] = {}

    def write_chunk(self, chunk: EntryChunk) -> None:
        escaped, labels = self.escaped, self.labels
        for rid in dict.fromkeys(chunk.rid):
            if rid not in escaped:
                escaped[rid] = _csv_line([rid]).rstrip("\n") if rid is not None else ""
        computed, prompt = chunk.computed, chunk.prompt
        if None in computed or None in prompt:
            computed, prompt = [_blank(v) for v in computed], [_blank(v) for v in prompt]
        last_entries = [end for _, end in chunk.batch_ends]
        firsts = [start for start, end in zip([0, *last_entries[:-1]], last_entries, strict=True) if end > start]
        lengths = [end - start for start, end in zip(firsts, [*firsts[1:], len(chunk)], strict=True)]
        batch_text = map(self.batch_fmt.__mod__, zip(
            map(chunk.batch_id.__getitem__, firsts), map(chunk.dp_rank.__getitem__, firsts),
            map(labels.__getitem__, map(chunk.proc.__getitem__, firsts)), map(chunk.start_ns.__getitem__, firsts),
            strict=True))
        lines = list(map(self.fmt.__mod__, zip(
            chain.from_iterable(map(repeat, batch_text, lengths)),
            map(escaped.__getitem__, chunk.rid), chunk.state, chunk.phase_names(), chunk.scheduled, computed,
            prompt, chunk.resumed, chunk.iteration, chunk.generated_before, chunk.time_in_state_ms, strict=True)))
        if chunk.preempted:
            ends = dict(chunk.batch_ends)
            for inserted, (batch_row, row) in enumerate(chunk.preempted):
                out = list(row)
                out[2] = labels[row[2]]
                lines.insert(ends[batch_row] + inserted, _csv_line(out))
        self.fh.write("".join(lines))


def write_per_iteration(run: RunData, tables: AnalysisTables, path: Path) -> Path:
    """per_iteration_requests.csv: one row per (batch, request), so millions on long runs (see
    `PerIterationWriter`). The batch's datetime is in batch.csv (join on dp_rank, batch_id)."""
    from .entries import iter_entry_chunks

    writer = PerIterationWriter(process_labels(run), path)
    try:
        for chunk in iter_entry_chunks(tables):
            writer.write_chunk(chunk)
    except BaseException:
        writer.close(complete=False)
        raise
    writer.close()
    if writer.error is not None:
        raise writer.error
    return path


def _blank(v: Any) -> Any:
    return "" if v is None else v


# The CSVs made from one analysis table alone (no records, no other table): file name -> (table's name in
# `sqlite_export.analysis_messages`, its CsvFormat(labels, columns)).
TABLE_FORMATS: dict[str, tuple[str, Callable[[Sequence[str], Sequence[str]], CsvFormat]]] = {
    "request.csv": ("request", request_format),
    "kvcache.csv": ("kvcache", kvcache_format),
    "events.csv": ("lifecycle_event", timed_format),
    "state_transitions.csv": ("state_transition", timed_format),
}
# Those the database process writes on large runs, from the parts of their tables it is handed (with
# batch.csv and per_iteration_requests.csv); analyze writes the others itself: kvcache.csv, the largest,
# evens out the two processes' work (~12 s each on a million records).
TABLE_CSVS = {name: TABLE_FORMATS[name] for name in ("request.csv", "events.csv", "state_transitions.csv")}


def write_table_csv(run: RunData, tables: AnalysisTables, out_dir: Path, name: str) -> Path:
    """One of TABLE_FORMATS, from this run's tables."""
    table_name, make_format = TABLE_FORMATS[name]
    table = getattr(tables, {**STORED_TABLES, "request": "requests"}[table_name])
    writer = TableCsvWriter(out_dir / name, make_format(process_labels(run), table.columns))
    try:
        for lo in range(0, len(table.rows), _CSV_BLOCK):
            writer.write_rows(table.rows[lo:lo + _CSV_BLOCK])
    except BaseException:
        writer.close(complete=False)
        raise
    writer.close()
    if writer.error is not None:
        raise writer.error
    return writer.path


def write_csvs(run: RunData, tables: AnalysisTables, out_dir: Path, delegated: bool = False) -> list[Path]:
    """Every CSV output; returns the paths written. `delegated`: not batch.csv, per_iteration_requests.csv
    nor TABLE_CSVS (analyze has the database process write them)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = write_summaries(run, tables, out_dir)
    paths += [write_table_csv(run, tables, out_dir, name) for name in TABLE_FORMATS if name not in TABLE_CSVS]
    if not delegated:
        paths.append(write_batch_csv(run, tables, out_dir / BATCH_CSV))
        paths.append(write_per_iteration(run, tables, out_dir / "per_iteration_requests.csv"))
        paths += [write_table_csv(run, tables, out_dir, name) for name in TABLE_CSVS]
    return paths
