"""The DuckDB pipeline (`service_profiler.columnar`, `service-profiler analyze2`) against the current
analysis (`service_profiler.analyze`) on the same raw files: same tables, same CSV files, same profiler.db.

Known, documented difference (docs/COLUMNAR.md): rows with the same timestamp that were written in two
different `rec` lines may come in another order (DuckDB's reader gives no line number), so kvcache,
lifecycle events and the raw span/event/counter tables are compared as multisets.

What analyze2 does not produce yet is listed once, in NOT_YET_PORTED; every comparison checks everything
else exactly, and test_the_gap_is_exactly_what_is_not_yet_ported fails if the difference between the two
pipelines' outputs is anything other than that list (so it cannot grow silently, and must shrink as
outputs get ported).
"""

from __future__ import annotations

import csv
import json
import math
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from service_profiler.analyze.completeness import COMPLETE_COLUMNS
from service_profiler.analyze.lifecycle import iter_request_states
from service_profiler.analyze.request_breakdown import BREAKDOWN_COLUMNS
from service_profiler.analyze.synthetic import SyntheticConfig, SyntheticRun, generate_run
from service_profiler.analyze.tables import Table, build_tables
from service_profiler.columnar.iterations import ITERATION_COLUMNS
from service_profiler.columnar.plots_out import PLOTS
from service_profiler.columnar.run import AnalysisRun, analyze_run
from service_profiler.rawfile import read_run

# What the current analysis produces and analyze2 does not yet (docs/COLUMNAR.md). Table entries are the
# columns the current analysis appends at the end of that table (in memory, in its CSV file and in
# profiler.db), in order; "service_summary.csv" the rows it appends at the end; "profiler.db" the tables and
# views analyze2's database lacks.
NOT_YET_PORTED: dict[str, list[str]] = {
    "request": [*BREAKDOWN_COLUMNS, *COMPLETE_COLUMNS],
    "batch": [*COMPLETE_COLUMNS],
    "service_summary.csv": ["complete_request_num", "incomplete_request_num", "incomplete_batch_num",
                            "processes_not_closed"],
    "profiler.db": ["process_completeness", "process_gap", "v_request_breakdown"],
}
CSV_TABLE = {"request.csv": "request", "batch.csv": "batch"}

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
            ported = [i for i, c in enumerate(table.columns) if c not in NOT_YET_PORTED.get(name, [])]
            columns = [table.columns[i] for i in ported]
            old_rows = [tuple(row[i] for i in ported) for row in table.rows]
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


@pytest.fixture(scope="module")
def both_outputs(tmp_path_factory: pytest.TempPathFactory, busy: SyntheticRun) -> tuple[Path, Path]:
    old, new = tmp_path_factory.mktemp("old"), tmp_path_factory.mktemp("new")
    done = _cli("analyze", "--input-path", str(busy.run_dir), "--output-path", str(old), "--format", "csv", "db",
                "--quiet")
    assert done.returncode == 0, done.stderr
    done = _cli("analyze2", "--input-path", str(busy.run_dir), "--output-path", str(new), "--format", "csv", "db",
                "--quiet", "--memory-limit", "256MB", "--jobs", "2")
    assert done.returncode == 0, done.stderr
    return old, new


@pytest.mark.parametrize("name", ["batch.csv", "request.csv", "per_iteration_requests.csv",
                                  "state_transitions.csv"])
def test_csv_files_are_identical(both_outputs: tuple[Path, Path], name: str) -> None:
    """Byte for byte, but for the not yet ported cells at the end of each line of request/batch.csv."""
    old, new = both_outputs
    old_bytes, new_bytes = (old / name).read_bytes(), (new / name).read_bytes()
    unported = NOT_YET_PORTED.get(CSV_TABLE.get(name, ""), [])
    if not unported:
        assert new_bytes == old_bytes
        return
    old_lines, new_lines = old_bytes.split(b"\n"), new_bytes.split(b"\n")
    assert len(new_lines) == len(old_lines)
    assert old_lines[-1] == new_lines[-1] == b""
    for o, n in zip(old_lines[:-1], new_lines[:-1], strict=True):
        assert o.startswith(n + b","), (o, n)
        tail = next(csv.reader([o[len(n) + 1:].decode("utf-8")]))
        assert len(tail) == len(unported), (o, n)


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
    old_rows = [r for r in old_rows if r[0] not in NOT_YET_PORTED.get(name, [])]
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
    want_schema = [(kind, name, _without_unported_columns(name, sql)) for kind, name, sql in old.execute(schema)
                   if name not in NOT_YET_PORTED["profiler.db"]]
    assert new.execute(schema).fetchall() == want_schema
    for (name,) in old.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')"):
        if name in NOT_YET_PORTED["profiler.db"]:
            continue
        cols = [r[1] for r in old.execute(f"PRAGMA table_info({name})")
                if r[1] != "id" and r[1] not in NOT_YET_PORTED.get(name, [])]
        query = f"SELECT {', '.join(chr(34) + c + chr(34) for c in cols)} FROM {name}"
        want, got = old.execute(query).fetchall(), new.execute(query).fetchall()
        if name in ("span", "event", "counter", "kvcache", "lifecycle_event", "v_kv_usage"):
            want, got = sorted(want, key=repr), sorted(got, key=repr)
        assert len(got) == len(want), name
        for g, w in zip(got, want, strict=True):
            assert all(_same(x, y) for x, y in zip(w, g, strict=True)), (name, w, g)


def _without_unported_columns(table: str, sql: str | None) -> str | None:
    """The current analysis's CREATE TABLE statement less the definitions of the not yet ported columns."""
    for column in NOT_YET_PORTED.get(table, []) if sql else []:
        assert sql is not None
        sql, found = re.subn(rf', "{re.escape(column)}"(?: [A-Z]+)?(?=[,)])', "", sql)
        assert found == 1, (table, column, sql)
    return sql


def _db_columns(db: sqlite3.Connection) -> dict[str, list[str]]:
    names = [n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")]
    return {n: [r[1] for r in db.execute(f"PRAGMA table_info({n})")] for n in names}


def test_the_gap_is_exactly_what_is_not_yet_ported(busy: SyntheticRun, both_outputs: tuple[Path, Path]) -> None:
    """The current analysis's outputs are analyze2's plus exactly NOT_YET_PORTED, each at the end."""
    old = build_tables(read_run([busy.run_dir]))
    new = analyze_run([busy.run_dir])
    try:
        for name, attr in OLD_TABLE.items():
            new_columns = [d[0] for d in new.con.execute(f"SELECT * FROM {name} LIMIT 0").description]
            old_columns = getattr(old, attr).columns
            assert old_columns == [c for c in new_columns if c in old_columns] + NOT_YET_PORTED.get(name, []), name
            assert not set(NOT_YET_PORTED.get(name, [])) & set(new_columns), name
    finally:
        new.close()
    old_dir, new_dir = both_outputs
    assert sorted(p.name for p in new_dir.iterdir()) == sorted(p.name for p in old_dir.iterdir())
    for path in sorted(old_dir.glob("*.csv")):
        with path.open() as a, (new_dir / path.name).open() as b:
            old_header, new_header = next(csv.reader(a)), next(csv.reader(b))
            old_names, new_names = [r[0] for r in csv.reader(a)], [r[0] for r in csv.reader(b)]
        assert old_header == new_header + NOT_YET_PORTED.get(CSV_TABLE.get(path.name, ""), []), path.name
        if "summary" in path.name:
            assert old_names == new_names + NOT_YET_PORTED.get(path.name, []), path.name
    old_db, new_db = (_db_columns(sqlite3.connect(d / "profiler.db")) for d in both_outputs)
    assert sorted(set(old_db) - set(new_db)) == sorted(NOT_YET_PORTED["profiler.db"])
    assert set(new_db) <= set(old_db)
    for name, columns in new_db.items():
        assert old_db[name] == columns + NOT_YET_PORTED.get(name, []), name


def test_every_output_of_a_real_run(tmp_path: Path) -> None:
    """All formats on the real run: a trace the strict validator accepts, the nine plots, the model."""
    from service_profiler.analyze.trace_check import validate_trace

    done = _cli("analyze2", "--input-path", str(REAL_RUN), "--output-path", str(tmp_path), "--quiet")
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
    from service_profiler.analyze.trace_check import validate_trace

    full, capped, window = tmp_path / "full", tmp_path / "capped", tmp_path / "window"
    for out, extra in ((full, []), (capped, ["--trace-max-per-second", "5"]), (window, ["--window", "1:2"])):
        done = _cli("analyze2", "--input-path", str(busy.run_dir), "--output-path", str(out), "--format", "json",
                    "--quiet", *extra)
        assert done.returncode == 0, done.stderr
    traces = {out.name: json.loads((out / "chrome_tracing.json").read_text(encoding="utf-8"))
              for out in (full, capped, window)}
    for trace in traces.values():
        assert validate_trace(trace) == []
    origin = traces["full"]["metadata"]["origin_epoch_ns"]
    per_second: dict[tuple[Any, ...], int] = {}
    for e in traces["capped"]["traceEvents"]:
        if e["ph"] in "XiC" and e.get("cat") != "Request":
            key = (e["pid"], e["name"], int(e["ts"] // 1e6))
            per_second[key] = per_second.get(key, 0) + 1
    assert per_second and max(per_second.values()) <= 5
    full_spans = traces["full"]["metadata"]["events"]["span"]
    assert traces["capped"]["metadata"]["events"]["span"] < full_spans
    spans = [e for e in traces["window"]["traceEvents"] if e["ph"] == "X" and e.get("cat") != "Request"]
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
    done = _cli("analyze2", "--input-path", str(synth.run_dir), "--output-path", str(out), "--format", "csv",
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
    done = _cli("analyze2", "--input-path", str(busy.run_dir), "--output-path", str(out), "--format", "csv",
                "--quiet")
    assert done.returncode == 0, done.stderr
    assert target.read_text() == "keep me\n"
    assert not (out / "request.csv").is_symlink()


def test_no_raw_files_is_exit_status_2(tmp_path: Path) -> None:
    done = _cli("analyze2", "--input-path", str(tmp_path), "--output-path", str(tmp_path / "out"))
    assert done.returncode == 2
    assert "no raw files" in done.stderr and "Traceback" not in done.stderr
