"""The table CSVs, written by DuckDB's COPY (minimal quoting, NULL as an empty cell).

`request.csv`, `batch.csv` and `kvcache.csv` start with msserviceprofiler's columns in its exact order,
followed by ours (see docs/COLUMNAR.md); the msserviceprofiler columns that are exactly one of ours are not
repeated. Our column names carry their unit (`_ms`, `_ns` = epoch ns); timestamps also appear as UTC
ISO datetimes; `proc` is shown as `process` (host:pid).
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from service_profiler.outputs import scratch_dir

from .breakdown import BREAKDOWN_COLUMNS
from .completeness import COMPLETE_COLUMNS
from .iterations import ITERATION_COLUMNS
from .run import AnalysisRun


def iso(column: str) -> str:
    """Epoch ns -> 'YYYY-MM-DDTHH:MM:SS.ffffffZ' (UTC, microseconds, truncated); NULL stays NULL."""
    return f"strftime(make_timestamp({column} // 1000), '%Y-%m-%dT%H:%M:%S.%fZ')"


def _list_text(column: str) -> str:
    """A list of numbers as '[1,2,3]' (DuckDB's own text puts a space after each comma)."""
    return f"'[' || array_to_string({column}, ',') || ']'"


REQUEST_REF = {  # reference column -> expression over the request table `r`
    "http_rid": "coalesce(nullif(r.api_rid, ''), r.rid)", "start_datetime": iso("r.arrival_ns"),
    "recv_token_size": "r.input_tokens", "reply_token_size": "r.output_tokens",
    "execution_time(ms)": "r.e2e_ms", "queue_wait_time(ms)": "r.queue_ms",
    "first_token_latency(ms)": "r.ttft_ms", "cache_hit_rate": "r.cache_hit_rate",
}
REQUEST_OURS = [
    "rid", "api_rid", "arrival_ns", "engine_arrival_ns", "first_scheduled_ns", "first_token_ns", "completion_ns",
    "queue_ms", "prefill_ms", "decode_ms", "ttft_ms", "tpot_ms", "e2e_ms", "input_tokens", "output_tokens",
    "preemptions", "prefix_hit_tokens", "kv_blocks", "finish_reason", "num_iterations", "first_batch_id",
    "dp_rank", "process", "timing_source",
]
BATCH_REF = {
    "name": "'batchFrameworkProcessing'", "res_list": "coalesce(s.res_list, '[]')",
    "start_time": iso("b.start_ns"), "end_time": iso("b.end_ns"), "during_time(ms)": "b.schedule_ms",
    "batch_type": "b.batch_type", "prof_id": "p.pid", "total_batch_size": "b.batch_size",
    "total_blocks": "b.kv_total_blocks", "used_blocks": "b.kv_used_blocks", "free_blocks": "b.kv_free_blocks",
    "blocks_allocated": "b.blocks_allocated", "blocks_freed": "b.blocks_freed", "kvcache_usage_rate": "b.kv_usage",
    "Prefill_batch_size": "b.num_prefill_reqs", "Decode_batch_size": "b.num_decode_reqs",
    "Prefill_scheduled_tokens": "b.prefill_tokens", "Decode_scheduled_tokens": "b.decode_tokens",
    "total_scheduled_tokens": "b.total_scheduled_tokens", "dp_rank": "b.dp_rank",
}
BATCH_OURS = [
    "batch_id", "process", "start_ns", "end_ns", "model_run_ms", "step_ms", "prefill_chunk_sizes",
    "decode_chunk_sizes", "avg_prefill_chunk", "min_prefill_chunk", "max_prefill_chunk", "avg_decode_chunk",
    "running", "waiting", "num_preempted", "num_finished", "model_start_ns", "model_end_ns", "update_ms",
    "update_end_ns", "num_resumed",
]
# the HTTP breakdown and completeness columns at the end (a bool as the current analysis writes it: True/False)
REQUEST_TAIL = {**{c: f"r.{c}" for c in BREAKDOWN_COLUMNS}, **{c: f"r.{c}" for c in COMPLETE_COLUMNS},
                "stream": "CASE WHEN r.stream THEN 'True' WHEN NOT r.stream THEN 'False' END",
}
BATCH_TAIL = {"complete": "b.complete", "incomplete_reason": "b.incomplete_reason"}
KVCACHE_COLUMNS = {
    "domain": "k.domain", "name": "k.name", "start_time": iso("k.ts_ns"), "total_blocks": "k.total_blocks",
    "used_blocks": "k.used_blocks", "free_blocks": "k.free_blocks", "blocks_allocated": "k.blocks_allocated",
    "blocks_freed": "k.blocks_freed", "kvcache_usage_rate": "k.usage", "ts_ns": "k.ts_ns", "rid": "k.rid",
    "dp_rank": "k.dp_rank", "process": "p.key",
}
EVENT_COLUMNS = {
    "ts_ns": "e.ts_ns", "ts_datetime": iso("e.ts_ns"), "event_type": "e.event_type", "rid": "e.rid",
    "process": "p.key", "batch_id": "e.batch_id", "detail": "e.detail",
}
STATE_COLUMNS = {
    "rid": "t.rid", "seq": "t.seq", "ts_ns": "t.ts_ns", "ts_datetime": iso("t.ts_ns"),
    "from_state": "t.from_state", "to_state": "t.to_state", "batch_id": "t.batch_id", "process": "p.key",
    "time_in_from_state_ms": "t.time_in_from_state_ms", "source": "t.source",
}

ITERATION_CSV = {("process" if name == "proc" else name): ("p.key" if name == "proc" else f"i.{name}")
                 for name in ITERATION_COLUMNS}


def _ours(alias: str, names: list[str], lists: tuple[str, ...] = ()) -> dict[str, str]:
    return {name: "p.key" if name == "process" else _list_text(f"{alias}.{name}") if name in lists
            else f"{alias}.{name}" for name in names}


def copy_csv(run: AnalysisRun, columns: dict[str, str], source: str, path: Path,
             force_quote: tuple[str, ...] = ()) -> Path:
    """`SELECT columns FROM source` (its FROM ... ORDER BY clause) into the CSV file `path`, as the current
    analysis writes it: an empty text is an empty cell like NULL (DuckDB would quote it: `""`), and the
    `force_quote` columns are always quoted. DuckDB writes into a private directory; the file is then
    moved onto `path` (a link planted there is replaced, never written through)."""
    select = ", ".join(f'{expr} AS "{name}"' for name, expr in columns.items())
    types = [row[1] for row in run.con.execute(f"DESCRIBE SELECT {select} {source}").fetchall()]
    exprs = [f"nullif({expr}, '')" if kind == "VARCHAR" else expr
             for expr, kind in zip(columns.values(), types, strict=True)]
    select = ", ".join(f'{expr} AS "{name}"' for name, expr in zip(columns, exprs, strict=True))
    with scratch_dir(path.parent, path.name) as scratch:
        if not force_quote:
            run.con.execute(f"COPY (SELECT {select} {source}) TO '{_quoted(scratch / path.name)}' "
                            f"(FORMAT csv, HEADER, QUOTE '\"', NULLSTR '')")
            os.replace(scratch / path.name, path)
            return path
        # FORCE_QUOTE quotes the header's names too: the header is written as csv.writer writes it, as the
        # file's PREFIX (writing the rows to a file of their own and copying them after the header wrote
        # and read them twice). With a PREFIX, DuckDB puts the newline between rows and requires a SUFFIX:
        # the last row's newline, which leaves a file without rows with one newline too many.
        header = io.StringIO()
        csv.writer(header, lineterminator="\n").writerow(columns)
        quoted = ", ".join(f'"{name}"' for name in force_quote)
        rows = run.con.execute(f"COPY (SELECT {select} {source}) TO '{_quoted(scratch / path.name)}' "
                               f"(FORMAT csv, HEADER false, QUOTE '\"', NULLSTR '', FORCE_QUOTE ({quoted}), "
                               f"PREFIX '{header.getvalue().replace(chr(39), chr(39) * 2)}', SUFFIX '\n')"
                               ).fetchone()
        if not (rows and rows[0]):
            os.truncate(scratch / path.name, len(header.getvalue().encode()))
        os.replace(scratch / path.name, path)
    return path


def _quoted(path: Path) -> str:
    return str(path).replace("'", "''")


# file -> (its columns: name -> expression, the FROM ... ORDER BY clause)
TABLE_QUERIES: dict[str, tuple[dict[str, str], str]] = {
    "request.csv": ({**REQUEST_REF, **_ours("r", REQUEST_OURS), **REQUEST_TAIL},
                    "FROM request r LEFT JOIN process p ON p.proc = r.proc ORDER BY r.row_no"),
    "batch.csv": ({**BATCH_REF, **_ours("b", BATCH_OURS, ("prefill_chunk_sizes", "decode_chunk_sizes")), **BATCH_TAIL},
                  "FROM batch b JOIN batch_span s USING (batch_row) LEFT JOIN process p ON p.proc = b.proc "
                  "ORDER BY b.batch_row"),
    "kvcache.csv": (KVCACHE_COLUMNS, "FROM kvcache k LEFT JOIN process p ON p.proc = k.proc ORDER BY k.row_no"),
    "events.csv": (EVENT_COLUMNS, "FROM lifecycle_event e LEFT JOIN process p ON p.proc = e.proc ORDER BY e.row_no"),
    "per_iteration_requests.csv": (ITERATION_CSV, "FROM iteration i LEFT JOIN process p ON p.proc = i.proc "
                                                  "ORDER BY i.batch_row, i.kind, i.pos"),
    "state_transitions.csv": (STATE_COLUMNS, "FROM state_transition t LEFT JOIN process p ON p.proc = t.proc "
                                             "ORDER BY t.row_no"),
}
# the current analysis always quotes res_list (a JSON list: `"[]"` for a step that scheduled nothing)
FORCE_QUOTE = {"batch.csv": ("res_list",)}


class CsvExporter:
    """batch.csv, request.csv, kvcache.csv, events.csv, per_iteration_requests.csv, state_transitions.csv."""

    name = "csv"

    def export(self, run: AnalysisRun, out_dir: Path) -> list[Path]:
        return [copy_csv(run, columns, source, out_dir / name, FORCE_QUOTE.get(name, ()))
                for name, (columns, source) in TABLE_QUERIES.items()]
