"""The DuckDB pipeline (`service_profiler.columnar`, `service-profiler analyze`) on runs whose truth is
known: the synthetic generator's (requests, batches, timings, a preempting KV cache, runner timer spans),
what a simple pass over a real run's raw records gives (the in-memory reader of `inspect`), and a run
only partly observed (collection switched, a process killed, records lost, the HTTP server's exchanges
with out-of-order milestones), whose marks follow from how it was cut. The outputs of one analysis agree
with each other (CSV, profiler.db, summaries) whichever way the exporters run.
"""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest
from synthetic import SyntheticConfig, SyntheticRun, generate_run

from service_profiler.columnar.pipeline import export_all
from service_profiler.columnar.plots_out import PLOTS
from service_profiler.columnar.raw import memory_limit_bytes
from service_profiler.columnar.run import SMALL_RUN_RECORDS, analyze_run, duckdb_threads
from service_profiler.rawdata.rawfile import read_run


def _busy_config() -> SyntheticConfig:
    """Two data-parallel engines on another host's clock, a KV cache small enough to preempt."""
    return SyntheticConfig(requests=160, output_tokens=24, max_num_seqs=24, num_gpu_blocks=260, dp_size=2,
                           engine_hostname="engine-host", engine_mono_offset_ns=987_654_321_000, seed=11,
                           runner_timer_spans=True)


@pytest.fixture(scope="module")
def busy(tmp_path_factory: pytest.TempPathFactory) -> SyntheticRun:
    return generate_run(tmp_path_factory.mktemp("busy"), _busy_config())


def test_tables_match_ground_truth_with_runner_timer_spans(busy: SyntheticRun) -> None:
    """The default YAML's runnerExecute / runnerSample spans beside modelExec change nothing."""
    run = analyze_run([busy.run_dir])
    try:
        requests = {r["rid"]: r for r in run.dicts("SELECT * FROM request")}
        batches = {(b["dp_rank"], b["batch_id"]): b for b in run.dicts("SELECT * FROM batch")}
        preempted = run.count("iteration WHERE state = 'preempted'")
    finally:
        run.close()
    assert set(requests) == set(busy.requests) and len(batches) == len(busy.batches)
    for rid, truth in busy.requests.items():
        for metric in ("ttft_ms", "queue_ms", "e2e_ms", "tpot_ms"):
            assert requests[rid][metric] == pytest.approx(getattr(truth, metric), abs=1e-9), (rid, metric)
        assert requests[rid]["preemptions"] == truth.preemptions
    for truth in busy.batches:
        row = batches[(truth.dp_rank, truth.batch_id)]
        assert row["model_run_ms"] == pytest.approx(truth.model_run_ms, abs=1e-9)
        assert row["step_ms"] == pytest.approx(truth.step_ms, abs=1e-9)
        assert row["batch_size"] == truth.batch_size
    assert preempted == sum(t.preemptions for t in busy.requests.values()) > 0, "the scenario must preempt"


# a real profiled vLLM CPU run (the tiny demo model, 40 requests of 12 tokens, 8 concurrent, every third
# streamed): API server, EngineCore and worker files as the runtime wrote them
REAL_RUN = Path(__file__).parent / "data" / "vllm_cpu_run_40req"


def _expected_from_records(path: Path) -> tuple[dict[str, dict[str, Any]], dict[int, dict[str, Any]]]:
    """Request and batch figures computed straight from the raw records (the definitions of
    docs/DESIGN.md "Analysis tables": arrival = httpReq, first token = the API's first `tokens` entry with
    new tokens, completion = its finishing entry; a batch = a batchFrameworkProcessing span, its model run
    = the modelExec span of its batch_id)."""
    raw = read_run([path])
    requests: dict[str, dict[str, Any]] = {}
    for e in raw.events:
        if e.name == "httpReq":
            requests[e.attrs["rid"]] = {"arrival": e.ts_ns, "input_tokens": e.attrs["prompt_tokens"], "tokens": 0,
                                        "first": None, "done": None}
    for e in raw.events:
        if e.name == "tokens":
            for rid, new, finished, *_ in e.attrs["reqs"]:
                req = requests[rid]
                req["tokens"] += new
                if new and req["first"] is None:
                    req["first"] = e.ts_ns
                if finished and req["done"] is None:
                    req["done"] = e.ts_ns
    model = {s.attrs["batch_id"]: (s.end_ns - s.start_ns) / 1e6 for s in raw.spans if s.name == "modelExec"}
    batches = {s.attrs["batch_id"]: {"batch_size": len(s.attrs["reqs"]), "start_ns": s.start_ns,
                                     "num_prefill_reqs": sum(1 for r in s.attrs["reqs"] if r[1] == 0),
                                     "total_scheduled_tokens": sum(r[2] for r in s.attrs["reqs"]),
                                     "model_run_ms": model.get(s.attrs["batch_id"])}
               for s in raw.spans if s.name == "batchFrameworkProcessing"}
    return requests, batches


def test_tables_on_a_real_run_match_its_records() -> None:
    assert len(list(REAL_RUN.glob("*.sprof.jsonl"))) == 3
    want_requests, want_batches = _expected_from_records(REAL_RUN)
    run = analyze_run([REAL_RUN])
    try:
        requests = {r["rid"]: r for r in run.dicts("SELECT * FROM request")}
        batches = {b["batch_id"]: b for b in run.dicts("SELECT * FROM batch")}
        running = run.count("iteration WHERE state <> 'preempted'")
    finally:
        run.close()
    assert set(requests) == set(want_requests) and len(requests) == 40
    for rid, want in want_requests.items():
        row = requests[rid]
        assert row["arrival_ns"] == want["arrival"] and row["input_tokens"] == want["input_tokens"]
        assert row["output_tokens"] == want["tokens"] == 12  # the run asked for 12 tokens each
        assert row["ttft_ms"] == pytest.approx((want["first"] - want["arrival"]) / 1e6, abs=1e-6)
        assert row["e2e_ms"] == pytest.approx((want["done"] - want["arrival"]) / 1e6, abs=1e-6)
        assert row["finish_reason"] == "length" and row["complete"] == 1
    assert set(batches) == set(want_batches)
    for bid, want in want_batches.items():
        for name, value in want.items():
            assert batches[bid][name] == pytest.approx(value, abs=1e-9), (bid, name)
        assert batches[bid]["batch_size"] <= 8  # 8 requests at a time
    assert running == sum(b["batch_size"] for b in want_batches.values())


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service_profiler.cli", *args], capture_output=True, text=True,
                          timeout=300)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _write_lines(path: Path, lines: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(obj) + "\n" for obj in lines), encoding="utf-8")


def _mono_range(lines: list[dict[str, Any]]) -> tuple[int, int]:
    times = [rec[1] for obj in lines if obj.get("t") == "rec" for rec in obj["r"]]
    return min(times), max(times)


def _with_http_exchanges(lines: list[dict[str, Any]], wall_offset: int) -> list[dict[str, Any]]:
    """The API server's file with an `httpExchange` event for most requests (as engines/vllm/vllm_http.py
    writes it), vLLM's arrival_time on most `httpReq`, some requests not streamed, and milestones in and
    out of order: a first body before the hand-off (its part is then 0), a missing or malformed offset."""
    chan = next(obj["id"] for obj in lines if obj.get("t") == "chan" and obj.get("name") == "httpReq")
    exchanges: list[list[Any]] = []
    k = 0
    for obj in lines:
        for rec in obj.get("r", []) if obj.get("t") == "rec" else []:
            if rec[0] != chan:
                continue
            attrs, ts, ms = rec[3], rec[1], 1_000_000
            if k % 5:
                attrs["arrival_time"] = (ts + wall_offset - 3 * ms) / 1e9
            if k % 4 == 1:
                attrs["stream"] = False
            if k % 6 != 5:
                http: dict[str, Any] = {"rids": [attrs["rid"]], "status": 200 if k % 9 else 500,
                                        "body_received": ms, "response_start": 9 * ms,
                                        "first_body": ms if k % 3 == 0 else 300 * ms, "last_body": 2_000 * ms}
                if k % 7 == 0:
                    del http["response_start"]
                if k % 8 == 3:
                    http["body_received"] = "soon"
                exchanges.append([99, ts - 2 * ms, 1, http])
            k += 1
    chan_line = {"t": "chan", "id": 99, "kind": "event", "domain": "Request", "name": "httpExchange"}
    return [*lines[:3], chan_line, *lines[3:], {"t": "rec", "r": exchanges}]


@pytest.fixture(scope="module")
def partial(tmp_path_factory: pytest.TempPathFactory, busy: SyntheticRun) -> Path:
    """The busy run only partly observed, with the HTTP server's exchanges: the API server lost records
    (`lost`, `dropped`) and closed; engine 0 was killed half-way (flushed, never closed); engine 1
    switched collection off twice (its records then are missing) and closed."""
    out = tmp_path_factory.mktemp("partial")
    files = {p.name: p for p in busy.run_dir.iterdir()}
    api_name = next(n for n in files if "4100" in n)
    api = _lines(files[api_name])
    lo, hi = _mono_range(api)
    clock = api[0]["clock"]
    api = _with_http_exchanges(api, clock["wall_ns"] - clock["mono_ns"])
    span = hi - lo
    api += [{"t": "lost", "count": 5, "reason": "write_error", "from_ts": lo + span // 3,
             "to_ts": lo + span // 3 + span // 50, "msg": "No space left on device"},
            {"t": "flushed", "until": lo + span // 2},
            {"t": "dropped", "count": 3, "ts": lo + span // 2 + span // 40},
            {"t": "flushed", "until": hi + 1}, {"t": "close", "ts": hi + 2, "reason": "exit"}]
    _write_lines(out / api_name, api)
    engine0 = _lines(files[next(n for n in files if "4200" in n)])
    lo, hi = _mono_range(engine0)
    _write_lines(out / next(n for n in files if "4200" in n), [*engine0, {"t": "flushed", "until": (lo + hi) // 2}])
    engine1 = _lines(files[next(n for n in files if "4201" in n)])
    lo, hi = _mono_range(engine1)
    span = hi - lo
    off = [(lo + span // 5, lo + span // 5 + span // 30), (lo + 3 * span // 5, lo + 3 * span // 5 + span // 20)]
    kept: list[dict[str, Any]] = []
    for obj in engine1:
        if obj.get("t") == "rec":
            obj = {"t": "rec", "r": [r for r in obj["r"] if not any(a <= r[1] < b for a, b in off)]}
        kept.append(obj)
    for a, b in off:
        kept += [{"t": "state", "enabled": False, "ts": a, "reason": "reload"},
                 {"t": "state", "enabled": True, "ts": b, "reason": "reload"}]
    # a step that scheduled nothing (batch.csv quotes its empty res_list, its batch_type is an empty cell)
    sched = next(obj["id"] for obj in engine1
                 if obj.get("t") == "chan" and obj.get("name") == "batchFrameworkProcessing")
    kept.append({"t": "rec", "r": [[sched, hi - 10_000, hi - 9_000, 1, {"batch_id": 999_999, "dp_rank": 1, "reqs": [],
                                                                       "running": 0, "waiting": 0}]]})
    kept += [{"t": "flushed", "until": hi + 1}, {"t": "close", "ts": hi + 2, "reason": "exit"}]
    _write_lines(out / next(n for n in files if "4201" in n), kept)
    return out


def test_marks_of_a_partly_observed_run_follow_from_how_it_was_cut(partial: Path, busy: SyntheticRun) -> None:
    engine0 = next(partial.glob("*4200*"))
    until_mono = _lines(engine0)[-1]["until"]  # engine 0's last flush: killed after it
    offset = next(p.wall_offset_ns for p in read_run([engine0]).processes)
    until = until_mono + offset
    run = analyze_run([partial])
    try:
        reasons = {why for (text,) in run.con.execute("SELECT incomplete_reason FROM request UNION ALL "
                                                       "SELECT incomplete_reason FROM batch").fetchall()
                   for why in text.split(";") if why}
        # every kind of mark the scenario is meant to exercise
        assert {"collection_switched", "records_missing:not closed: no final flush",
                "records_missing:lost:write_error", "records_missing:dropped"} <= reasons, reasons
        assert any(r.startswith("negative_") for r in reasons), reasons
        assert run.count("request WHERE complete = 1") > 10
        assert run.count("request WHERE arrival_source = 'http'") > 100
        assert run.count("request WHERE NOT stream") > 20
        assert run.count("request WHERE engine_prefill_ms = 0 OR first_token_delivery_ms = 0") > 0
        assert run.count("request WHERE http_receive_ms IS NULL AND arrival_source = 'http'") > 0
        rows = {r["rid"]: r for r in run.dicts("SELECT * FROM request")}
        batches = run.dicts("SELECT * FROM batch")
    finally:
        run.close()
    assert set(rows) == set(busy.requests)
    unsure = "records_missing:not closed: no final flush"
    checked = 0
    for rid, truth in busy.requests.items():
        row = rows[rid]
        if truth.dp_rank == 0 and truth.first_scheduled_ns > until:
            assert unsure in row["incomplete_reason"].split(";"), rid  # all of its engine time is uncertain
            checked += 1
        elif truth.dp_rank == 0 and row["arrival_source"] != "http" and truth.completion_ns < until:
            assert unsure not in row["incomplete_reason"], rid  # over before the last flush
            checked += 1
        if row["complete"] and row["arrival_source"] != "http":  # whole and timed as recorded
            assert row["queue_ms"] == pytest.approx(truth.queue_ms, abs=1e-9)
            assert row["ttft_ms"] == pytest.approx(truth.ttft_ms, abs=1e-9)
            assert row["output_tokens"] == truth.output_tokens
        if row["complete"]:
            assert row["incomplete_reason"] == ""
    assert checked > 10
    late = [b for b in batches if b["dp_rank"] == 0 and b["start_ns"] > until]
    assert late and all(unsure in b["incomplete_reason"] and b["complete"] == 0 for b in late)
    empty = [b for b in batches if b["batch_id"] == 999_999]  # the step that scheduled nothing
    assert len(empty) == 1 and (empty[0]["batch_size"], empty[0]["batch_type"]) == (0, "")


@pytest.fixture(scope="module", params=["busy", "partial"])
def outputs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run, outputs) of the command line with a small memory limit and a process pool of exporters."""
    run_dir = request.getfixturevalue("busy").run_dir if request.param == "busy" else request.getfixturevalue("partial")
    out = tmp_path_factory.mktemp("out")
    done = _cli("analyze", "--input-path", str(run_dir), "--output-path", str(out), "--format", "csv", "db",
                "--quiet", "--memory-limit", "256MB", "--jobs", "2", "--processes")
    assert done.returncode == 0, done.stderr
    return run_dir, out


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _same(text: str, value: Any) -> bool:
    """A CSV cell against the value it was written from."""
    if value is None:
        return text == ""
    if isinstance(value, bool):
        return text in (str(value), str(int(value)))
    if isinstance(value, int | float):
        return math.isclose(float(text), value, rel_tol=1e-12, abs_tol=1e-9)
    if isinstance(value, list):  # a list of numbers, as JSON text
        return bool(json.loads(text) == value)
    return text == str(value)


@pytest.mark.parametrize(("name", "table", "order"), [("request.csv", "request", "row_no"),
                                                       ("batch.csv", "batch", "batch_row")])
def test_csv_rows_are_the_tables_rows(outputs: tuple[Path, Path], name: str, table: str, order: str) -> None:
    """The CSVs written by a process pool under a small memory limit hold the rows of the tables built in
    this process with the defaults: every column the CSV shares with its table, in order."""
    run_dir, out = outputs
    rows = _csv(out / name)
    run = analyze_run([run_dir])
    try:
        want = run.dicts(f"SELECT * FROM {table} ORDER BY {order}")
    finally:
        run.close()
    shared = [c for c in rows[0] if c in want[0] and c not in ("proc",)]
    assert len(shared) > 20 and "complete" in shared and "incomplete_reason" in shared
    assert len(rows) == len(want)
    for got, row in zip(rows, want, strict=True):
        bad = [c for c in shared if not _same(got[c], row[c])]
        assert not bad, (bad, got, row)


def test_summaries_follow_from_the_request_rows(outputs: tuple[Path, Path]) -> None:
    """Latency summaries over the complete requests only (linear percentiles), counts over all."""
    _, out = outputs
    requests = _csv(out / "request.csv")
    complete = [r for r in requests if r["complete"] == "1"]
    ttft = np.array([float(r["first_token_latency(ms)"]) for r in complete])
    summary = {r["Metric"]: r for r in _csv(out / "request_summary.csv")}["first_token_latency"]
    for column, value in (("Average", ttft.mean()), ("Max", ttft.max()), ("Min", ttft.min()),
                          ("P50", np.percentile(ttft, 50)), ("P90", np.percentile(ttft, 90)),
                          ("P99", np.percentile(ttft, 99))):
        assert float(summary[column]) == pytest.approx(value, rel=1e-9), column
    service = {r["Metric"]: r["Value"] for r in _csv(out / "service_summary.csv")}
    assert int(service["total_generated_token_num"]) == sum(int(r["reply_token_size"]) for r in requests)


def test_profiler_db_holds_the_csvs_rows_and_every_record(outputs: tuple[Path, Path]) -> None:
    run_dir, out = outputs
    db = sqlite3.connect(out / "profiler.db")
    requests = {r["rid"]: r for r in _csv(out / "request.csv")}
    got = db.execute("SELECT rid, ttft_ms, e2e_ms, complete, incomplete_reason FROM request").fetchall()
    assert len(got) == len(requests)
    for rid, ttft, e2e, complete, why in got:
        row = requests[rid]
        assert _same(row["ttft_ms"], ttft) and _same(row["e2e_ms"], e2e), rid
        assert (row["complete"], row["incomplete_reason"]) == (str(complete), why)
    entries = db.execute("SELECT count(*) FROM batch_req").fetchone()[0]
    iterations = _csv(out / "per_iteration_requests.csv")
    assert entries == sum(1 for r in iterations if r["state"] != "preempted") > 0
    assert db.execute("SELECT count(*) FROM state_transition").fetchone()[0] == len(_csv(out / "state_transitions.csv"))
    # every record, as the in-memory reader counts them
    records = sum(db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("span", "event", "counter"))
    assert records == read_run([run_dir]).num_records
    # the raw tables' ids number the records in time order (SQLite numbers them as they are inserted)
    for table, ts in (("span", "start_ns"), ("event", "ts_ns"), ("counter", "ts_ns")):
        rows = db.execute(f"SELECT id, {ts}, proc FROM {table} ORDER BY id").fetchall()
        assert [row[0] for row in rows] == list(range(1, len(rows) + 1))
        keys = [(row[1], row[2]) for row in rows]
        assert keys == sorted(keys), table


def test_the_sqlite_extension_is_loaded_only_from_a_file_no_other_user_can_write(tmp_path: Path) -> None:
    """DuckDB loads the SQLite extension without its signature check (run.connect): the file must be a
    regular file, not a link, owned by this user or root and writable by its owner alone."""
    from service_profiler.columnar.sqlite_out import _trusted_file

    own = tmp_path / "ext.duckdb_extension"
    own.write_bytes(b"\0" * 16)
    own.chmod(0o644)
    assert _trusted_file(own)
    link = tmp_path / "link.duckdb_extension"
    link.symlink_to(own)
    assert not _trusted_file(link)
    for mode in (0o664, 0o646):
        own.chmod(mode)
        assert not _trusted_file(own), oct(mode)
    assert not _trusted_file(tmp_path / "missing")
    assert not _trusted_file(tmp_path)  # a directory
    # the installed extension passes, and a connection made for analysis loads no other extension by itself
    run = analyze_run([generate_run(tmp_path / "run", SyntheticConfig(requests=4, output_tokens=2, seed=1)).run_dir])
    try:
        settings = dict(run.con.execute("SELECT name, value FROM duckdb_settings() WHERE name IN "
                                        "('autoload_known_extensions', 'autoinstall_known_extensions')").fetchall())
        assert settings == {"autoload_known_extensions": "false", "autoinstall_known_extensions": "false"}
        from service_profiler.columnar.sqlite_out import _load_sqlite_extension

        assert _load_sqlite_extension(run)
    finally:
        run.close()


def test_profiler_db_through_duckdb_equals_through_python(tmp_path: Path, busy: SyntheticRun) -> None:
    """profiler.db written by DuckDB's SQLite extension (the installed default) holds exactly what Python's
    sqlite3 writes (the fallback where the extension does not load): same schema, rows, order and types."""
    from service_profiler.columnar.sqlite_out import write_db

    run = analyze_run([busy.run_dir])
    try:
        fast = write_db(run, tmp_path / "fast.db", through_duckdb=True)  # raises if the extension is missing
        slow = write_db(run, tmp_path / "slow.db", through_duckdb=False)
    finally:
        run.close()
    a, b = sqlite3.connect(fast), sqlite3.connect(slow)
    schema = "SELECT type, name, sql FROM sqlite_master ORDER BY name"
    assert a.execute(schema).fetchall() == b.execute(schema).fetchall()
    rows = 0
    for (name,) in b.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
        query = f"SELECT *, {', '.join(f'typeof({c[1]!r})' for c in b.execute(f'PRAGMA table_info({name})'))} " \
                f"FROM {name}"
        want = b.execute(query).fetchall()
        assert a.execute(query).fetchall() == want, name
        rows += len(want)
    assert rows > 10_000


def test_every_output_of_a_real_run(tmp_path: Path) -> None:
    """All formats on the real run: a trace the strict validator accepts, the nine plots, the model."""
    from trace_check import validate_trace

    done = _cli("analyze", "--input-path", str(REAL_RUN), "--output-path", str(tmp_path), "--quiet")
    assert done.returncode == 0, done.stderr
    trace = json.loads((tmp_path / "chrome_tracing.json").read_text(encoding="utf-8"))
    assert validate_trace(trace) == []
    assert trace["metadata"]["events"]["request"] == 4 * 40  # each request: request, queued, prefill, decode
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {name for name, _, _ in PLOTS}
    assert all(p.stat().st_size > 10_000 for p in (tmp_path / "plots").iterdir())
    model = json.loads((tmp_path / "model" / "latency_model.json").read_text(encoding="utf-8"))
    assert model["n_train"] + model["n_test"] > 20


def test_trace_is_bounded(tmp_path: Path, busy: SyntheticRun) -> None:
    """--trace-max-per-second caps each name per process per second; --window keeps only that window."""
    from trace_check import validate_trace

    full, capped, window = tmp_path / "full", tmp_path / "capped", tmp_path / "window"
    for out, extra in ((full, []), (capped, ["--trace-max-per-second", "5"]), (window, ["--window", "1:2"])):
        done = _cli("analyze", "--input-path", str(busy.run_dir), "--output-path", str(out), "--format", "json",
                    "--quiet", *extra)
        assert done.returncode == 0, done.stderr
    traces = {out.name: json.loads((out / "chrome_tracing.json").read_text(encoding="utf-8"))
              for out in (full, capped, window)}
    for trace in traces.values():
        assert validate_trace(trace) == []
    origin = traces["full"]["metadata"]["origin_epoch_ns"]
    per_second: dict[tuple[Any, ...], int] = {}
    for e in traces["capped"]["traceEvents"]:
        if e["ph"] in "XiC" and e.get("cat") != "request":
            key = (e["pid"], e["name"], int(e["ts"] // 1e6))
            per_second[key] = per_second.get(key, 0) + 1
    assert per_second and max(per_second.values()) <= 5
    full_spans = traces["full"]["metadata"]["events"]["span"]
    assert traces["capped"]["metadata"]["events"]["span"] < full_spans
    spans = [e for e in traces["window"]["traceEvents"] if e["ph"] == "X" and e.get("cat") != "request"]
    assert spans and all(e["ts"] + e["dur"] >= 1e6 and e["ts"] <= 2e6 for e in spans)
    assert len(spans) < full_spans
    assert traces["window"]["metadata"]["origin_epoch_ns"] == origin


def test_a_trace_past_max_events_keeps_fewer_events_per_second_over_the_whole_run(tmp_path: Path,
                                                                                  busy: SyntheticRun) -> None:
    """--trace-max-events: a trace that would hold more events keeps fewer of one name per process per
    second, the same cap over the whole run, says so on the console and in its metadata; one that fits is
    written as without the bound; a bad value is refused with the option's name."""
    from trace_check import validate_trace

    def trace(out: Path, *extra: str) -> tuple[dict[str, Any], str]:
        done = _cli("analyze", "--input-path", str(busy.run_dir), "--output-path", str(out), "--format", "json",
                    *extra)
        assert done.returncode == 0, done.stderr
        return json.loads((out / "chrome_tracing.json").read_text(encoding="utf-8")), done.stderr

    unbounded, _ = trace(tmp_path / "unbounded", "--trace-max-events", "0")
    total = len(unbounded["traceEvents"])
    roomy, roomy_err = trace(tmp_path / "roomy", "--trace-max-events", str(total * 2))
    def events(trace: dict[str, Any]) -> list[str]:  # in any order: DuckDB writes its rows in parallel
        return sorted(json.dumps(e, sort_keys=True) for e in trace["traceEvents"])

    assert events(roomy) == events(unbounded) and "trace: at most" not in roomy_err
    assert roomy["metadata"]["max_events_per_name_per_second"] == 2000

    budget = total // 3
    small, small_err = trace(tmp_path / "small", "--trace-max-events", str(budget))
    assert validate_trace(small) == []
    cap = small["metadata"]["max_events_per_name_per_second"]
    assert 1 < cap < 2000 and small["metadata"]["max_events"] == budget
    assert small["metadata"]["max_events_per_name_per_second_asked"] == 2000
    assert f"trace: at most {cap:,} events of one name per process per second (not 2,000)" in small_err
    assert len(small["traceEvents"]) <= budget
    per_second: dict[tuple[Any, ...], int] = {}
    for e in small["traceEvents"]:
        if e["ph"] in "XiC" and e.get("cat") != "request":
            key = (e["pid"], e["name"], int(e["ts"] // 1e6))
            per_second[key] = per_second.get(key, 0) + 1
    assert max(per_second.values()) == cap  # the cap is reached, not only bounded
    assert sum(small["metadata"]["capped_events"].values()) > 0
    # the cap is not lower than the bound needs: the estimate counts each request at its most events
    assert len(small["traceEvents"]) > budget / 2

    refused = _cli("analyze", "--input-path", str(busy.run_dir), "--output-path", str(tmp_path / "bad"),
                   "--trace-max-events", "-1")
    assert refused.returncode == 2 and "--trace-max-events: '-1': give 0 or more" in refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.mark.parametrize("block", [1, 2, 3, 7, 64, 1 << 22])
def test_event_files_are_joined_into_one_array_across_block_boundaries(monkeypatch: pytest.MonkeyPatch,
                                                                       block: int) -> None:
    """DuckDB's newline-delimited event files, copied a block at a time, make one JSON array of every
    event in order, whichever byte a block ends on; empty files in between add nothing."""
    import io

    from service_profiler.columnar import trace_out

    monkeypatch.setattr(trace_out, "_BLOCK_BYTES", block)
    files = [[{"name": "a\nb", "ts": 1.5}, {"name": "é,}", "args": {"n": [1, 2]}}], [], [{"ph": "C"}],
             [], [{"x": i} for i in range(5)]]
    out = io.BytesIO()
    out.write(b"[")
    comma_due, counts = False, []
    for events in files:
        text = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in events).encode()
        copied, comma_due = trace_out._copy_as_elements(io.BytesIO(text), out, comma_due)
        counts.append(copied)
    out.write(b"]")
    assert json.loads(out.getvalue()) == [e for events in files for e in events]
    assert counts == [len(events) for events in files]
    assert comma_due


def test_bad_lines_cost_only_themselves(tmp_path: Path) -> None:
    synth = generate_run(tmp_path / "run", SyntheticConfig(requests=20, output_tokens=8, seed=3))
    engine = sorted(synth.run_dir.glob("*4200*"))[0]
    lines = engine.read_text(encoding="utf-8").splitlines(keepends=True)
    rec = [i for i, line in enumerate(lines) if line.startswith('{"t":"rec"')]
    # a record on an undeclared channel and one with a text timestamp inside a good line, a corrupt control
    # line, and a torn last line
    lines[rec[0]] = lines[rec[0]].replace('{"t":"rec","r":[', '{"t":"rec","r":[[999,1,2,{}],[4,"x",1,{}],', 1)
    # times at the ends of int64 (their epoch times would overflow), beyond 2^62, and a span ending before
    # it starts: malformed records, counted with the two above
    span = next(r for r in json.loads(lines[rec[0]])["r"] if len(r) == 5 and isinstance(r[1], int))
    odd = [[span[0], 2**63 - 10, 2**63 - 5, 1, None], [span[0], -(2**63) + 10, 5, 1, None],
           [span[0], 2**62, 2**62 + 5, 1, None], [span[0], 500, 400, 1, None]]
    lines.insert(rec[0] + 1, json.dumps({"t": "rec", "r": odd}) + "\n")
    lines.insert(rec[0], '{"t":"meta","key": oops}\n')
    lines.insert(rec[0], '{"t":"bogus"}\n')
    # control lines that parse but say nothing usable: each is named, none is dropped silently
    lines.insert(rec[0], '{"t":"chan","id":77,"kind":"spam","domain":"X","name":"y"}\n')
    lines.insert(rec[0], '{"t":"chan","id":true,"kind":"span","domain":"X","name":"y"}\n')
    lines.insert(rec[0], '{"t":"state","ts":"soon","enabled":true}\n')
    lines.insert(rec[0], '{"t":"meta","key":5,"value":1}\n')
    # two corrupt record lines that end as a record line ends (DuckDB's reader skips them: counted, not listed)
    lines.append('{"t":"rec","r":[[1,2,#garbage#,3]]}\n')
    lines.append('{"t":"rec","r":"x]}\n')
    lines.append('{"t":"rec","r":[]}\n')  # a line without records is not one of them
    lines.append('{"t":"rec","r":[[1,2')
    engine.write_text("".join(lines), encoding="utf-8")
    run = analyze_run([synth.run_dir])
    try:
        problems = "\n".join(run.problems)
        assert "6 malformed records" in problems
        assert "not valid JSON" in problems and "torn or corrupt record line" in problems
        assert f"{engine}: 2 record line(s) not valid JSON, their records missing" in problems
        assert "unknown line type 'bogus'" in problems
        assert problems.count("channel line without a valid id") == 2
        assert "state line without a valid ts" in problems and "meta line without a text key" in problems
        assert run.count("request") == 20  # everything else is kept
    finally:
        run.close()


def test_numbers_json_has_not_are_spelled_out_and_every_json_output_stays_strict(tmp_path: Path) -> None:
    """The writer writes a NaN or infinite float as JavaScript does (NaN, Infinity); such an attribute is
    read as the text "NaN" / "Infinity" / "-Infinity", so the trace and profiler.db's JSON stay loadable by
    a strict parser, and a number read from it is the same float again."""
    synth = generate_run(tmp_path / "run", SyntheticConfig(requests=20, output_tokens=8, seed=3))
    engine = sorted(synth.run_dir.glob("*4200*"))[0]
    data = engine.read_bytes()
    assert b'"batch_id":' in data
    header, rest = data.split(b"\n", 1)
    engine.write_bytes(header + b'\n{"t":"meta","key":"odd","value":[NaN,-Infinity]}\n'
                       + rest.replace(b'"batch_id":', b'"ratio":NaN,"peak":[1,Infinity,-Infinity],"batch_id":'))

    def strict(constant: str) -> None:
        raise ValueError(f"{constant} in JSON output")

    out = tmp_path / "out"
    run = analyze_run([synth.run_dir])
    try:
        outcomes = export_all(run, ["json", "db"], out)
        assert [o.error for o in outcomes] == [None, None]
        spelled = run.con.execute("SELECT DISTINCT attrs->>'ratio', TRY_CAST(attrs->>'ratio' AS DOUBLE), "
                                  "attrs->'peak' FROM span WHERE attrs->>'ratio' IS NOT NULL").fetchall()
        assert len(spelled) == 1 and spelled[0][0] == "NaN" and math.isnan(spelled[0][1])
        assert json.loads(spelled[0][2]) == [1, "Infinity", "-Infinity"]
    finally:
        run.close()
    json.loads((out / "chrome_tracing.json").read_text(encoding="utf-8"), parse_constant=strict)
    db = sqlite3.connect(out / "profiler.db")
    texts = [t for (t,) in db.execute("SELECT attrs FROM span WHERE attrs LIKE '%ratio%'")]
    assert texts and all(json.loads(t, parse_constant=strict)["ratio"] == "NaN" for t in texts)
    # a control line's value too, in profiler.db and in what inspect prints
    meta = [v for (v,) in db.execute("SELECT value FROM process_meta WHERE key = 'odd'")]
    assert [json.loads(v, parse_constant=strict) for v in meta] == [["NaN", "-Infinity"]]
    from service_profiler.rawdata.inspect_run import describe_run

    json.dumps(describe_run(read_run([synth.run_dir])), allow_nan=False, default=str)


def _extreme(value: Any, number: int) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return number
    if isinstance(value, float):
        return math.copysign(1e308, number)
    if isinstance(value, list):
        return [_extreme(v, number) for v in value]
    if isinstance(value, dict):
        return {k: _extreme(v, number) for k, v in value.items()}
    return value


@pytest.mark.parametrize("number", [2**63 - 1, -(2**63), 2**62 + 1])
def test_numbers_at_the_ends_of_int64_in_any_attribute_cost_no_output(tmp_path: Path, number: int) -> None:
    """Every number in the attributes of the first record of each kind in a real run set to `number` (every
    float to ±1e308): every output is still written. Sums, differences and casts of such values stopped
    the request table's query with an overflow before."""
    run_dir = tmp_path / "run"
    shutil.copytree(REAL_RUN, run_dir)
    for path in run_dir.glob("*.sprof.jsonl"):
        seen: set[int] = set()
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        for i, line in enumerate(lines):
            if line.startswith('{"t":"rec"'):
                obj = json.loads(line)
                for record in obj["r"]:
                    if record[0] not in seen:
                        seen.add(record[0])
                        record[-1] = _extreme(record[-1], number)
                lines[i] = json.dumps(obj) + "\n"
        path.write_text("".join(lines), encoding="utf-8")
    run = analyze_run([run_dir])
    try:
        formats = ["csv", "summary", "db", "json", "plots", "model"]
        outcomes = export_all(run, formats, tmp_path / "out")
    finally:
        run.close()
    assert [(o.fmt, o.error) for o in outcomes] == [(f, None) for f in formats]


def test_an_escaped_lone_surrogate_costs_no_record(tmp_path: Path) -> None:
    """The writer escapes a lone surrogate in a text as `\\udc80`: valid JSON, which DuckDB's reader rejects
    with the whole line of records. Such a line is read with the surrogate replaced by U+FFFD, as inspect
    reads it."""
    synth = generate_run(tmp_path / "run", SyntheticConfig(requests=20, output_tokens=8, seed=3))
    engine = sorted(synth.run_dir.glob("*4200*"))[0]
    lines = engine.read_bytes().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith(b'{"t":"rec"') and b'"rid":"' in line)
    lines[at] = lines[at].replace(b'"rid":"', b'"rid":"\\udc80', 1)
    engine.write_bytes(b"".join(lines))
    inspected = read_run([synth.run_dir])
    run = analyze_run([synth.run_dir])
    try:
        assert run.problems == inspected.problems == []
        read = run.con.execute("SELECT count(*) FROM record WHERE kind IS NOT NULL AND ts_ns IS NOT NULL").fetchone()
        assert read == (inspected.num_records,) == (synth.num_records,)
        mended = run.con.execute("SELECT count(*) FROM record WHERE starts_with(attrs->>'rid', '\ufffd')").fetchone()
        assert mended == (1,)
    finally:
        run.close()


def test_a_channel_is_the_files_wherever_its_line_is_and_its_first_declaration_stands(tmp_path: Path) -> None:
    """Both readers: a record line ahead of its channel's line is read; a channel line that gives a declared
    id another meaning is listed and skipped (the writer declares each id once: it is corrupt), so it
    changes no record's name; a channel line with a name that is not a text is invalid."""
    synth = generate_run(tmp_path / "run", SyntheticConfig(requests=10, output_tokens=4, seed=5))
    engine = sorted(synth.run_dir.glob("*4200*"))[0]
    whole = read_run([synth.run_dir])
    lines = engine.read_text(encoding="utf-8").splitlines(keepends=True)
    chans = [i for i, line in enumerate(lines) if line.startswith('{"t":"chan"')]
    first_rec = next(i for i, line in enumerate(lines) if line.startswith('{"t":"rec"'))
    step = next(i for i in chans if '"name":"step"' in lines[i])
    again = json.loads(lines[step]) | {"name": "renamed"}
    invalid = json.loads(lines[step]) | {"id": 99, "name": ["x"]}
    moved = lines.pop(step)
    lines.insert(first_rec, moved)  # after the first record line, which holds step spans
    lines.append(json.dumps(again) + "\n")
    lines.append(json.dumps(invalid) + "\n")
    engine.write_text("".join(lines), encoding="utf-8")
    n = len(lines)
    inspected = read_run([synth.run_dir])
    analysis = analyze_run([synth.run_dir])
    try:
        told = [f"{engine}:{n - 1}: channel {again['id']} declared again, as span EngineCore/renamed; skipped, "
                "the first declaration is kept", f"{engine}:{n}: channel line without a valid id"]
        for problems in (inspected.problems, analysis.problems):
            assert len(problems) == 2 and all(p.startswith(t) for p, t in zip(problems, told, strict=True)), problems
        steps = sorted(s.start_ns for s in whole.spans if s.name == "step")
        assert steps and sorted(s.start_ns for s in inspected.spans if s.name == "step") == steps
        assert [t for (t,) in analysis.con.execute("SELECT start_ns FROM span WHERE name = 'step' "
                                                   "ORDER BY start_ns").fetchall()] == steps
        assert analysis.count("span WHERE name = 'renamed'") == 0
    finally:
        analysis.close()


def test_both_readers_read_control_lines_alike(tmp_path: Path) -> None:
    """analyze's reader (DuckDB) and inspect's (rawfile.py) share one reading of the control lines: the same
    problem for each bad one, the same meta, warnings, patch report, dropped count and collection states."""
    synth = generate_run(tmp_path / "run", SyntheticConfig(requests=10, output_tokens=4, seed=5))
    engine = sorted(synth.run_dir.glob("*4200*"))[0]
    lines = engine.read_text(encoding="utf-8").splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith('{"t":"rec"'))
    bad = ['{"t":"meta","key":5,"value":1}', '{"t":"state","ts":-3,"enabled":true}', '{"t":"dropped","count":"x"}',
           '{"t":"chan","id":2147483648,"kind":"span","domain":"X","name":"y"}',
           '{"t":"patch","applied":["a.b"],"failed":"everything"}', '{"t":"header","v":1}', '{"t":"whatever"}']
    good = ['{"t":"meta","key":"dp_rank","value":0}', '{"t":"warn","msg":"slow","count":2}',
            '{"t":"warn","msg":"slow","count":7}', '{"t":"warn","msg":"odd","count":"many"}',
            '{"t":"dropped","count":3,"ts":5}', '{"t":"state","ts":7,"enabled":false,"reason":"signal"}']
    lines[at:at] = [line + "\n" for line in bad + good]
    engine.write_text("".join(lines), encoding="utf-8")

    def about_control(problems: list[str]) -> list[str]:
        # the problems of the inserted lines, by line number (at + 1 is the first inserted line's number)
        found = [p for p in problems if any(p.startswith(f"{engine}:{at + 1 + k}:") for k in range(len(bad)))]
        return sorted(found)

    inspected = read_run([synth.run_dir])
    analysis = analyze_run([synth.run_dir])
    try:
        assert about_control(inspected.problems) == about_control(analysis.problems)
        assert len(about_control(inspected.problems)) == len(bad)  # one problem for each bad line, none for good
        one = next(p for p in inspected.processes if p.pid == 4200)
        other = next(p for p in analysis.processes if p.pid == 4200)
        assert list(other.warnings.values()) == one.warnings[-2:] == ["slow (x7)", "odd (x?)"]
        assert one.patch == other.patch and one.patch is not None  # the file's own later patch line wins in both
        assert one.meta == other.meta and one.dropped == other.dropped >= 3
        assert [s for s in inspected.states if s[3] == "signal"] == [s for s in analysis.states if s[3] == "signal"]
    finally:
        analysis.close()


# what the analysis keeps once its tables are built: the exporters' tables and the few the loader and the
# completeness marks leave; every builder's intermediate tables are gone (they count against the memory limit)
KEPT_TABLES = {"api_proc", "bad_entry", "batch", "batch_entry", "batch_finished", "batch_span", "channel",
               "http_exchange", "http_handoff", "iteration", "kvcache", "lifecycle_event", "process", "process_gap",
               "record", "request", "run_switch", "source", "state_transition"}


def test_builders_leave_only_the_tables_the_exporters_read(busy: SyntheticRun) -> None:
    run = analyze_run([busy.run_dir])
    try:
        tables = {row[0] for row in run.con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        span_columns = {row[0] for row in run.con.execute(
            "SELECT column_name FROM duckdb_columns() WHERE table_name = 'batch_span'").fetchall()}
    finally:
        run.close()
    assert tables == KEPT_TABLES
    assert "reqs" not in span_columns and "res_list" in span_columns  # the entries live in batch_entry


def test_runs_under_a_small_memory_limit(tmp_path: Path) -> None:
    """DuckDB keeps to the limit (spilling to the work directory what does not fit; the benchmark shows it
    at 10 M records); the floor is the JSON reader's buffer, twice raw.MAX_LINE_BYTES per thread."""
    synth = generate_run(tmp_path / "run", SyntheticConfig(requests=1500, output_tokens=32, max_num_seqs=64,
                                                          seed=5))
    out = tmp_path / "out"
    done = _cli("analyze", "--input-path", str(synth.run_dir), "--output-path", str(out), "--format", "csv",
                "--memory-limit", "128MB", "--threads", "1", "--quiet")
    assert done.returncode == 0, done.stderr
    with (out / "request.csv").open() as fh:
        assert sum(1 for _ in fh) == 1500 + 1


def test_many_process_files_under_a_small_memory_limit(tmp_path: Path) -> None:
    """24 files under 128 MB: read a few files per statement (one each at this limit), every record once."""
    synth = generate_run(tmp_path / "one", SyntheticConfig(requests=40, output_tokens=8, seed=6))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for host in range(12):  # twelve hosts' copies, each with its own host name and request ids
        for path in synth.files:
            text = path.read_text(encoding="utf-8").replace('"cmpl-', f'"cmpl-h{host}-')
            text = re.sub(r'"hostname": ?"([^"]*)"', rf'"hostname": "\1-{host}"', text, count=1)
            (run_dir / f"h{host}-{path.name}").write_text(text, encoding="utf-8")
    outputs = {}
    for limit in ("128MB", "1GB"):
        out = tmp_path / limit
        done = _cli("analyze", "--input-path", str(run_dir), "--output-path", str(out), "--format", "csv",
                    "--memory-limit", limit, "--threads", "1", "--quiet")
        assert done.returncode == 0, done.stderr
        outputs[limit] = (out / "request.csv").read_text(encoding="utf-8")
    assert outputs["128MB"].count("\n") == 12 * 40 + 1
    assert outputs["128MB"] == outputs["1GB"]  # 24 statements or 3: the same requests


@pytest.mark.parametrize("max_bytes", [1, 7, 64, 10_000])
def test_a_large_file_is_read_in_pieces_of_whole_lines(tmp_path: Path, max_bytes: int) -> None:
    from service_profiler.columnar import raw

    lines = [b'{"t":"rec","r":[[1,%d,"%s"]]}\n' % (i, b"x" * (i * 37 % 300)) for i in range(200)]
    data = b"".join(lines) + b'{"t":"rec","r":[[1,2'  # a torn last line stays as it is
    (tmp_path / "big.sprof.jsonl").write_bytes(data)
    pieces = [Path(p).read_bytes() for p in raw._pieces(str(tmp_path / "big.sprof.jsonl"), max_bytes,
                                                         tmp_path / "piece")]
    assert b"".join(pieces) == data
    assert all(piece.endswith(b"\n") for piece in pieces[:-1])
    assert max(map(len, pieces)) <= 2 * max_bytes + max(map(len, lines))
    assert len(pieces) >= len(data) // (2 * max_bytes + max(map(len, lines)))


def test_tables_built_in_pieces_are_the_tables_built_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large runs are read a few files per statement (a large file a piece at a time) and their batch
    entries aggregated by ranges of batches (bounded memory); the tables are the same as when built in one
    statement each."""
    from service_profiler.columnar import batch, raw

    synth = generate_run(tmp_path / "run", SyntheticConfig(requests=120, output_tokens=12, max_num_seqs=16,
                                                          dp_size=2, seed=8))
    tables = ("record", "batch", "request", "iteration")

    def contents() -> dict[str, list[tuple[Any, ...]]]:
        run = analyze_run([synth.run_dir])
        try:
            return {t: run.con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in tables}
        finally:
            run.close()

    at_once = contents()
    statements: list[int] = []
    # statements of 20 kB: a file per statement, each file read in pieces of whole lines
    monkeypatch.setattr(raw, "_statement_bytes", lambda con: 20_000)
    read = raw._statements

    def counted_reads(files: list[tuple[int, str]], budget: int, scratch: Path, tag: str = "") -> Any:
        for group in read(files, budget, scratch, tag):
            assert len(group) == 1 and (group[0][1] in dict(files).values() or Path(group[0][1]).parent == scratch)
            pieces.append(Path(group[0][1]).stat().st_size)
            yield group

    pieces: list[int] = []
    monkeypatch.setattr(raw, "_statements", counted_reads)
    monkeypatch.setattr(batch, "_ENTRIES_PER_STATEMENT", 37)
    original = batch._batch_reqs

    def counted(con: Any) -> None:
        traced = con.execute

        class Counting:
            def execute(self, query: str, *args: Any) -> Any:
                statements.append(1)
                return traced(query, *args)

        original(Counting())

    monkeypatch.setattr(batch, "_batch_reqs", counted)
    in_pieces = contents()
    assert len(statements) > 10 and all(at_once[t] for t in tables)
    longest_line = max(len(line) for path in synth.files for line in path.read_bytes().splitlines(keepends=True))
    assert len(pieces) > 2 * len(synth.files) and max(pieces) <= 2 * 20_000 + longest_line
    for table in tables:
        assert in_pieces[table] == at_once[table], table


def test_a_statement_that_runs_out_of_memory_is_read_again_in_halves(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A statement's memory grows with the raw bytes it reads several times over. Where the files read in one
    statement do not fit the limit, they are read again in statements of half the bytes (a file cut into
    pieces of whole lines), as often as needed, and no later statement is larger; the tables are those read
    within a limit that fits."""
    from service_profiler.columnar import raw

    synth = generate_run(tmp_path / "run", SyntheticConfig(requests=1500, output_tokens=32, max_num_seqs=64, seed=9))
    tables = ("record", "batch", "request")

    def contents(memory_limit: str) -> dict[str, list[tuple[Any, ...]]]:
        run = analyze_run([synth.run_dir], memory_limit=memory_limit)
        try:
            return {t: run.con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in tables}
        finally:
            run.close()

    fits = contents("1GB")
    monkeypatch.setattr(raw, "_statement_bytes", lambda con: 1 << 40)  # every file in one statement at first
    statements: list[tuple[int, bool]] = []
    insert = raw._insert_statement

    def noted(con: Any, group: list[tuple[int, str]]) -> None:
        size = sum(Path(path).stat().st_size for _, path in group)
        try:
            insert(con, group)
        except duckdb.OutOfMemoryException:
            statements.append((size, False))
            raise
        statements.append((size, True))

    monkeypatch.setattr(raw, "_insert_statement", noted)
    halved = contents("100MB")
    whole = sum(path.stat().st_size for path in synth.files)
    assert statements[0] == (whole, False)  # all of it at once does not fit
    longest_line = max(len(line) for path in synth.files for line in path.read_bytes().splitlines(keepends=True))
    # after a statement ran out of memory, none larger than half of it is tried (a piece ends with its line)
    for i, (size, fitted) in enumerate(statements):
        if not fitted:
            assert all(later <= size // 2 + longest_line for later, _ in statements[i + 1:])
    assert sum(size for size, fitted in statements if fitted) >= whole - 4096  # every rec line read once
    for table in tables:
        assert halved[table] == fits[table], table


def test_output_links_are_not_followed(tmp_path: Path, busy: SyntheticRun) -> None:
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "elsewhere.csv"
    target.write_text("keep me\n")
    (out / "request.csv").symlink_to(target)
    done = _cli("analyze", "--input-path", str(busy.run_dir), "--output-path", str(out), "--format", "csv",
                "--quiet")
    assert done.returncode == 0, done.stderr
    assert target.read_text() == "keep me\n"
    assert not (out / "request.csv").is_symlink()


def test_no_raw_files_is_exit_status_2(tmp_path: Path) -> None:
    done = _cli("analyze", "--input-path", str(tmp_path), "--output-path", str(tmp_path / "out"))
    assert done.returncode == 2
    assert "no raw files" in done.stderr and "Traceback" not in done.stderr


def test_duckdb_threads_are_shared_out_and_given_back(tmp_path: Path, busy: SyntheticRun,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A small run's tables are built on one DuckDB thread, exporters side by side share the threads out,
    and once none is left to start, those still running get the threads of those that ended; after each,
    the setting is what it was. `threads` given by the user holds for the tables."""
    from service_profiler.columnar import pipeline
    from service_profiler.columnar import run as run_module

    seen: dict[str, list[int]] = {"tables": [], "outputs": [], "csv alone": []}
    whole = [0]  # the threads the last output should get: the run's, or (a small run) its share
    db_done = threading.Event()
    build_batches, run_one = run_module.build_batches, pipeline._run_one

    def noting_build(con: duckdb.DuckDBPyConnection) -> None:
        seen["tables"].append(duckdb_threads(con))
        build_batches(con)

    def noting_export(run: Any, fmt: str, options: dict[str, Any], out_dir: Path) -> Any:
        seen["outputs"].append(duckdb_threads(run.con))
        outcome = run_one(run, fmt, options, out_dir)
        if fmt == "db":
            db_done.set()
        else:  # waits for profiler.db to end, and for its threads to come this way (or not)
            assert db_done.wait(30)
            deadline = time.monotonic() + (30 if whole[0] != seen["outputs"][0] else 0.3)
            while duckdb_threads(run.con) != whole[0] and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)
            seen["csv alone"].append(duckdb_threads(run.con))
        return outcome

    monkeypatch.setattr(run_module, "build_batches", noting_build)
    monkeypatch.setattr(pipeline, "_run_one", noting_export)
    with duckdb.connect() as fresh:
        default = duckdb_threads(fresh)
    for threads, expected, small in ((None, 1, False), (3, 3, False), (3, 3, True)):
        # not on a small run, where a query's extra threads cost more than they save
        monkeypatch.setattr(pipeline, "SMALL_RUN_RECORDS", SMALL_RUN_RECORDS if small else 0)
        run = analyze_run([busy.run_dir], threads=threads)
        try:
            assert run.count("record") < SMALL_RUN_RECORDS
            assert seen["tables"].pop() == expected
            assert duckdb_threads(run.con) == (threads or default)
            share = max((threads or default) // 2, 1)
            whole[0] = share if small else threads or default
            db_done.clear()
            outcomes = export_all(run, ["csv", "db"], tmp_path / f"{threads}-{small}", jobs=2)
            assert [o.error for o in outcomes] == [None, None]
            assert sorted(seen["outputs"]) == [share] * 2
            assert seen["csv alone"] == [whole[0]]
            seen["outputs"].clear()
            seen["csv alone"].clear()
            assert duckdb_threads(run.con) == (threads or default)
        finally:
            run.close()


def test_outputs_that_do_not_fit_their_share_of_the_memory_limit_are_written_again_within_the_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Side by side, the exporters get a share of the limit (room for what DuckDB's allocator keeps); one
    that runs out of it is written again afterwards, alone, within the whole limit, with the same bytes, and
    no output starts side by side after that: those not started are written alone too. A share below what
    the tables hold in memory cannot be set: the limit stays whole."""
    from service_profiler.columnar import pipeline

    limits: dict[str, list[tuple[str, int]]] = {}
    run_one = pipeline._run_one

    def noting_the_limit(run: Any, fmt: str, options: dict[str, Any], out_dir: Path) -> Any:
        limits.setdefault(out_dir.name, []).append((fmt, memory_limit_bytes(run.con)))
        return run_one(run, fmt, options, out_dir)

    monkeypatch.setattr(pipeline, "_run_one", noting_the_limit)
    synth = generate_run(tmp_path / "run", SyntheticConfig(requests=60, output_tokens=6, seed=7))
    run = analyze_run([synth.run_dir], memory_limit="600MB")
    formats = ["csv", "db", "summary"]  # started in the order db, csv, summary
    try:
        whole = memory_limit_bytes(run.con)
        alone = export_all(run, formats, tmp_path / "alone", jobs=1)
        held = run.con.execute("SELECT sum(memory_usage_bytes) FROM duckdb_memory()").fetchone()[0]
        runs: dict[str, list[str]] = {"squeezed": [], "below": []}
        outcomes = {
            # the tables fit, the exporters' working memory does not
            "squeezed": export_all(run, formats, tmp_path / "squeezed", jobs=2,
                                   progress=runs["squeezed"].append, outputs_share=(held + (4 << 20)) / whole),
            "below": export_all(run, formats, tmp_path / "below", jobs=2, progress=runs["below"].append,
                                outputs_share=(held >> 2) / whole)}
        assert memory_limit_bytes(run.con) == whole  # given back for what follows
    finally:
        run.close()
    assert [o.error for o in alone] == [None] * 3
    assert [o.error for o in outcomes["squeezed"]] == [o.error for o in outcomes["below"]] == [None] * 3
    squeezed = runs["squeezed"]
    assert squeezed[0] in ("outputs written one at a time from here: db, csv ran out of memory side by side",
                           "outputs written one at a time from here: csv, db ran out of memory side by side")
    assert sorted(squeezed[1:3]) == ["csv done (again, alone, within the whole memory limit)",
                                     "db done (again, alone, within the whole memory limit)"]
    assert squeezed[3:] == ["summary done (alone, within the whole memory limit)"]
    # summary was not started beside them: it ran once, within the whole limit, after both were written again
    assert [fmt for fmt, _ in limits["squeezed"]][-1] == "summary"
    assert [limit for fmt, limit in limits["squeezed"] if fmt == "summary"] == [whole]
    assert sorted(runs["below"]) == ["csv done", "db done", "summary done"]
    for out in ("squeezed", "below"):
        for name in ("request.csv", "batch.csv", "per_iteration_requests.csv", "request_summary.csv"):
            assert (tmp_path / out / name).read_bytes() == (tmp_path / "alone" / name).read_bytes()
        requests = sqlite3.connect(tmp_path / out / "profiler.db").execute("SELECT count(*) FROM request").fetchone()
        assert requests == (60,)


def test_a_table_numbered_by_its_keys_is_the_table_numbered_by_a_window() -> None:
    """`create_numbered` (the keys sorted alone, the rows joined back by row id) gives each row the number a
    window over the whole rows gives it, with every column, and leaves no helper table behind."""
    from service_profiler.columnar.batch import create_numbered

    with duckdb.connect() as con:
        con.execute("""CREATE TABLE src AS SELECT i % 97 AS a, (i * 7919) % 1000 AS b, 'row ' || i AS label,
                       repeat('x', i % 50) AS payload FROM range(20000) t(i)""")
        create_numbered(con, "numbered", "SELECT * FROM src", "a, b, label", "r.label, r.payload, r.a")
        windowed = con.execute("""SELECT row_number() OVER (ORDER BY a, b, label) AS row_no, label, payload, a
                                  FROM src ORDER BY row_no""").fetchall()
        assert con.execute("SELECT * FROM numbered ORDER BY row_no").fetchall() == windowed
        assert [c[0] for c in con.execute("SELECT * FROM numbered LIMIT 0").description] == [
            "row_no", "label", "payload", "a"]
        assert con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'numbered_rows'").fetchone() == (0,)


def test_outputs_of_a_run_too_large_for_side_by_side_are_written_one_at_a_time(
        tmp_path: Path, busy: SyntheticRun, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past SIDE_BY_SIDE_RECORDS_PER_GIB records per GiB of the limit, `jobs` > 1 writes the outputs one
    after another, each with all of DuckDB's threads and the whole limit, and says so; the files are the
    ones written side by side."""
    from service_profiler.columnar import pipeline

    spans: list[tuple[str, float, float, int, int]] = []
    run_one = pipeline._run_one

    def timed(run: Any, fmt: str, options: dict[str, Any], out_dir: Path) -> Any:
        start = time.monotonic()
        threads, limit = duckdb_threads(run.con), memory_limit_bytes(run.con)
        outcome = run_one(run, fmt, options, out_dir)
        spans.append((fmt, start, time.monotonic(), threads, limit))
        return outcome

    monkeypatch.setattr(pipeline, "_run_one", timed)
    run = analyze_run([busy.run_dir], threads=2)
    try:
        whole = memory_limit_bytes(run.con)
        export_all(run, ["csv", "db"], tmp_path / "side_by_side", jobs=2)
        assert {threads for *_, threads, _ in spans} == {1}  # each its share: the threshold not reached
        spans.clear()
        monkeypatch.setattr(pipeline, "SIDE_BY_SIDE_RECORDS_PER_GIB", run.count("record") // 2)
        said: list[str] = []
        outcomes = export_all(run, ["csv", "db"], tmp_path / "one_by_one", jobs=2, progress=said.append)
    finally:
        run.close()
    assert [o.error for o in outcomes] == [None, None]
    assert said[0].startswith("outputs written one at a time")
    (_, _, first_end, *_), (_, second_start, *_) = sorted(spans, key=lambda s: s[1])
    assert first_end <= second_start
    assert {(threads, limit) for *_, threads, limit in spans} == {(2, whole)}
    for name in ("request.csv", "batch.csv", "kvcache.csv"):
        assert (tmp_path / "one_by_one" / name).read_bytes() == (tmp_path / "side_by_side" / name).read_bytes()
