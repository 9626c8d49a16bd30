"""The DuckDB pipeline (`service_profiler.columnar`, `service-profiler analyze`) against the previous,
in-memory analysis (`service_profiler.analyze`) on the same raw files: same tables, same CSV files, same
profiler.db.

Known, documented difference (docs/COLUMNAR.md): rows with the same timestamp that were written in two
different `rec` lines may come in another order (DuckDB's reader gives no line number), so kvcache,
lifecycle events and the raw span/event/counter tables are compared as multisets.

Everything else is compared exactly, columns and rows, on runs whose requests and batches are all
complete and on one only partly observed (collection switched, a process killed, records lost, the HTTP
server's exchanges with out-of-order milestones): test_outputs_have_the_same_columns fails if either
pipeline's outputs gain a column, row or table the other lacks.
"""

from __future__ import annotations

import csv
import json
import math
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from synthetic import SyntheticConfig, SyntheticRun, generate_run

from service_profiler.analyze.lifecycle import iter_request_states
from service_profiler.analyze.tables import Table, build_tables
from service_profiler.columnar.iterations import ITERATION_COLUMNS
from service_profiler.columnar.plots_out import PLOTS
from service_profiler.columnar.run import AnalysisRun, analyze_run
from service_profiler.rawdata.rawfile import read_run

ORDERED = {"batch": "batch_row", "request": "row_no", "state_transition": "row_no",
           "iteration": "batch_row, kind, pos"}
AS_SETS = {"kvcache": "row_no", "lifecycle_event": "row_no"}
OLD_TABLE = {"batch": "batches", "request": "requests", "state_transition": "state_transitions",
             "kvcache": "kvcache", "lifecycle_event": "events"}


def _busy_config() -> SyntheticConfig:
    """Two data-parallel engines on another host's clock, a KV cache small enough to preempt."""
    return SyntheticConfig(requests=160, output_tokens=24, max_num_seqs=24, num_gpu_blocks=260, dp_size=2,
                           engine_hostname="engine-host", engine_mono_offset_ns=987_654_321_000, seed=11,
                           runner_timer_spans=True)


@pytest.fixture(scope="module")
def busy(tmp_path_factory: pytest.TempPathFactory) -> SyntheticRun:
    return generate_run(tmp_path_factory.mktemp("busy"), _busy_config())


@pytest.fixture(scope="module")
def without_state_events(tmp_path_factory: pytest.TempPathFactory, busy: SyntheticRun) -> Path:
    """The busy run as recorded without `Request/state` events (transitions derived from the batches)."""
    out = tmp_path_factory.mktemp("nostate")
    renamed = 0
    for path in busy.run_dir.iterdir():
        text = path.read_text(encoding="utf-8")
        renamed += text.count('"name":"state"}')
        (out / path.name).write_text(text.replace('"name":"state"}', '"name":"notState"}'), encoding="utf-8")
    assert renamed >= 2, "the engines declare the state channel"
    return out


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool | int | float) and isinstance(b, int | float) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-9)
    return str(a) == str(b)


def _rows(new: AnalysisRun, table: str, columns: list[str], order: str) -> list[tuple[Any, ...]]:
    cols = ", ".join(f'"{c}"' for c in columns)
    return new.con.execute(f"SELECT {cols} FROM {table} ORDER BY {order}").fetchall()


def _compare_tables(path: Path) -> None:
    old = build_tables(read_run([path]))
    new = analyze_run([path])
    try:
        old_tables: dict[str, Table] = {name: getattr(old, attr) for name, attr in OLD_TABLE.items()}
        old_tables["iteration"] = Table("iteration", list(ITERATION_COLUMNS), list(iter_request_states(old)))
        for name, table in old_tables.items():
            columns, old_rows = table.columns, table.rows
            got = _rows(new, name, columns, ORDERED.get(name) or AS_SETS[name])
            assert len(got) == len(old_rows), name
            if name in AS_SETS:
                got, want = sorted(got, key=repr), sorted(old_rows, key=repr)
            else:
                want = old_rows
            for i, (g, w) in enumerate(zip(got, want, strict=True)):
                bad = [c for c, x, y in zip(columns, w, g, strict=True) if not _same(x, y)]
                assert not bad, f"{name} row {i}: {bad}: old {w} new {g}"
        assert len(old.requests) > 0 and len(old.batches) > 0
    finally:
        new.close()


def test_tables_equal_the_current_analysis(busy: SyntheticRun) -> None:
    _compare_tables(busy.run_dir)
    preempted = analyze_run([busy.run_dir])
    try:
        assert preempted.count("iteration WHERE state = 'preempted'") > 0, "the scenario must preempt"
    finally:
        preempted.close()


def test_tables_equal_without_state_events(without_state_events: Path) -> None:
    _compare_tables(without_state_events)


# a real profiled vLLM CPU run (the tiny demo model, 40 requests of 12 tokens, 8 concurrent, every third
# streamed): API server, EngineCore and worker files as the runtime wrote them
REAL_RUN = Path(__file__).parent / "data" / "vllm_cpu_run_40req"


def test_tables_equal_on_a_real_run() -> None:
    assert len(list(REAL_RUN.glob("*.sprof.jsonl"))) == 3
    _compare_tables(REAL_RUN)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service_profiler.cli", *args], capture_output=True, text=True,
                          timeout=300)


def _previous(*args: str) -> subprocess.CompletedProcess[str]:
    """The previous, in-memory pipeline (service_profiler.analyze), which the DuckDB one replaced."""
    return subprocess.run([sys.executable, "-m", "service_profiler.analyze.command", *args], capture_output=True,
                          text=True, timeout=300)


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


def test_tables_equal_on_a_partly_observed_run(partial: Path) -> None:
    _compare_tables(partial)
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
    finally:
        run.close()


@pytest.fixture(scope="module", params=["busy", "partial"])
def both_outputs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    run_dir = request.getfixturevalue("busy").run_dir if request.param == "busy" else request.getfixturevalue("partial")
    old, new = tmp_path_factory.mktemp("old"), tmp_path_factory.mktemp("new")
    done = _previous("--input-path", str(run_dir), "--output-path", str(old), "--format", "csv", "db", "--quiet")
    assert done.returncode == 0, done.stderr
    done = _cli("analyze", "--input-path", str(run_dir), "--output-path", str(new), "--format", "csv", "db",
                "--quiet", "--memory-limit", "256MB", "--jobs", "2", "--processes")
    assert done.returncode == 0, done.stderr
    return old, new


@pytest.mark.parametrize("name", ["batch.csv", "request.csv", "per_iteration_requests.csv",
                                  "state_transitions.csv"])
def test_csv_files_are_identical(both_outputs: tuple[Path, Path], name: str) -> None:
    old, new = both_outputs
    assert (new / name).read_bytes() == (old / name).read_bytes()


@pytest.mark.parametrize("name", ["kvcache.csv", "events.csv"])
def test_csv_files_hold_the_same_lines(both_outputs: tuple[Path, Path], name: str) -> None:
    old, new = both_outputs
    old_lines, new_lines = (p.read_text(encoding="utf-8").splitlines() for p in (old / name, new / name))
    assert new_lines[0] == old_lines[0]
    assert sorted(new_lines) == sorted(old_lines)


@pytest.mark.parametrize("name", ["request_summary.csv", "batch_summary.csv", "service_summary.csv"])
def test_summaries_agree(both_outputs: tuple[Path, Path], name: str) -> None:
    """Same metrics and values up to float rounding: the old summaries subtract epoch-ns timestamps as
    float64 (spacing 256 ns), the new ones as integers."""
    old, new = both_outputs
    with (old / name).open() as a, (new / name).open() as b:
        old_rows, new_rows = list(csv.reader(a)), list(csv.reader(b))
    assert [r[0] for r in new_rows] == [r[0] for r in old_rows]
    for o, n in zip(old_rows[1:], new_rows[1:], strict=True):
        for x, y in zip(o[1:], n[1:], strict=True):
            assert (x == "") == (y == ""), (o, n)
            if x:
                assert float(y) == pytest.approx(float(x), rel=1e-6, abs=1e-6), (o, n)


def test_profiler_db_has_the_same_tables_and_rows(both_outputs: tuple[Path, Path]) -> None:
    old_dir, new_dir = both_outputs
    old, new = sqlite3.connect(old_dir / "profiler.db"), sqlite3.connect(new_dir / "profiler.db")
    schema = "SELECT type, name, sql FROM sqlite_master ORDER BY name"
    assert new.execute(schema).fetchall() == old.execute(schema).fetchall()
    for (name,) in old.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')"):
        cols = [r[1] for r in old.execute(f"PRAGMA table_info({name})") if r[1] != "id"]
        query = f"SELECT {', '.join(chr(34) + c + chr(34) for c in cols)} FROM {name}"
        want, got = old.execute(query).fetchall(), new.execute(query).fetchall()
        if name in ("span", "event", "counter", "kvcache", "lifecycle_event", "v_kv_usage"):
            want, got = sorted(want, key=repr), sorted(got, key=repr)
        assert len(got) == len(want), name
        for g, w in zip(got, want, strict=True):
            assert all(_same(x, y) for x, y in zip(w, g, strict=True)), (name, w, g)


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


def _db_columns(db: sqlite3.Connection) -> dict[str, list[str]]:
    names = [n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")]
    return {n: [r[1] for r in db.execute(f"PRAGMA table_info({n})")] for n in names}


def test_outputs_have_the_same_columns(busy: SyntheticRun, both_outputs: tuple[Path, Path]) -> None:
    """Same tables with the same columns in the same order, same files, same CSV headers and summary
    metrics, same profiler.db tables and views: nothing of the current analysis is missing."""
    old = build_tables(read_run([busy.run_dir]))
    new = analyze_run([busy.run_dir])
    try:
        for name, attr in OLD_TABLE.items():
            new_columns = [d[0] for d in new.con.execute(f"SELECT * FROM {name} LIMIT 0").description]
            old_columns = getattr(old, attr).columns
            # the DuckDB tables may carry helper columns first (row_no, batch_row), nothing else
            assert [c for c in new_columns if c in old_columns] == old_columns, name
            assert set(new_columns) - set(old_columns) <= {"row_no", "batch_row"}, name
    finally:
        new.close()
    old_dir, new_dir = both_outputs
    assert sorted(p.name for p in new_dir.iterdir()) == sorted(p.name for p in old_dir.iterdir())
    for path in sorted(old_dir.glob("*.csv")):
        with path.open() as a, (new_dir / path.name).open() as b:
            old_header, new_header = next(csv.reader(a)), next(csv.reader(b))
            old_names, new_names = [r[0] for r in csv.reader(a)], [r[0] for r in csv.reader(b)]
        assert old_header == new_header, path.name
        if "summary" in path.name:
            assert old_names == new_names, path.name
    old_db, new_db = (_db_columns(sqlite3.connect(d / "profiler.db")) for d in both_outputs)
    assert new_db == old_db


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


def test_bad_lines_cost_only_themselves(tmp_path: Path) -> None:
    synth = generate_run(tmp_path / "run", SyntheticConfig(requests=20, output_tokens=8, seed=3))
    engine = sorted(synth.run_dir.glob("*4200*"))[0]
    lines = engine.read_text(encoding="utf-8").splitlines(keepends=True)
    rec = [i for i, line in enumerate(lines) if line.startswith('{"t":"rec"')]
    # a record on an undeclared channel and one with a text timestamp inside a good line, a corrupt control
    # line, and a torn last line
    lines[rec[0]] = lines[rec[0]].replace('{"t":"rec","r":[', '{"t":"rec","r":[[999,1,2,{}],[4,"x",1,{}],', 1)
    lines.insert(rec[0], '{"t":"meta","key": oops}\n')
    lines.insert(rec[0], '{"t":"bogus"}\n')
    lines.append('{"t":"rec","r":[[1,2')
    engine.write_text("".join(lines), encoding="utf-8")
    run = analyze_run([synth.run_dir])
    try:
        problems = "\n".join(run.problems)
        assert "2 malformed records" in problems
        assert "not valid JSON" in problems and "torn or corrupt record line" in problems
        assert "unknown line type 'bogus'" in problems
        assert run.count("request") == 20  # everything else is kept
    finally:
        run.close()


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
