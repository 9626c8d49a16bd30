"""profiler.db as `service-profiler analyze --format db` writes it: its tables, views and indexes, the raw
records, and the analysis tables against the synthetic generator's ground truth."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from synthetic import SyntheticConfig, SyntheticRun, generate_run

from service_profiler.rawdata.rawfile import RunData, read_run


def _write_db(run_dir: Path, out: Path) -> Path:
    done = subprocess.run([sys.executable, "-m", "service_profiler.cli", "analyze", "--input-path", str(run_dir),
                           "--output-path", str(out), "--format", "db", "--quiet"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return out / "profiler.db"


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> tuple[SyntheticRun, RunData, sqlite3.Connection]:
    base = tmp_path_factory.mktemp("db")
    synth = generate_run(base / "run", SyntheticConfig(requests=40, output_tokens=10, max_num_seqs=12,
                                                       num_gpu_blocks=120, seed=9))
    path = _write_db(synth.run_dir, base / "out")
    assert [p.name for p in path.parent.iterdir()] == ["profiler.db"]  # no partial or scratch file left
    return synth, read_run([synth.run_dir]), sqlite3.connect(path)


def _one(con: sqlite3.Connection, sql: str, *params: object) -> object:
    return con.execute(sql, params).fetchone()[0]


def test_schema_tables_views_indexes(db: tuple[SyntheticRun, RunData, sqlite3.Connection]) -> None:
    _, _, con = db
    objects = {(t, n) for t, n in con.execute("SELECT type, name FROM sqlite_master")}
    for table in ("process", "process_meta", "span", "event", "counter", "run_state", "problem", "request", "batch",
                  "batch_req", "kvcache", "state_transition", "lifecycle_event"):
        assert ("table", table) in objects, table
    for view in ("v_batch_size_curve", "v_batch_exec", "v_ttft", "v_request_latency", "v_request_breakdown",
                 "v_kv_usage", "v_queue_curve"):
        assert ("view", view) in objects, view
    indexed = {row[0] for row in con.execute("SELECT tbl_name FROM sqlite_master WHERE type = 'index'")}
    assert {"span", "event", "batch", "batch_req", "request", "kvcache"} <= indexed
    plan = " ".join(str(r) for r in con.execute(
        "EXPLAIN QUERY PLAN SELECT br.* FROM request r JOIN batch_req br USING (req_row) WHERE r.rid = 'x'"))
    assert "ix_request_rid" in plan and "ix_batch_req_request" in plan
    plan = " ".join(str(r) for r in con.execute("EXPLAIN QUERY PLAN SELECT * FROM batch_req WHERE batch_row = 3"))
    assert "PRIMARY KEY" in plan


def test_raw_tables_hold_every_record(db: tuple[SyntheticRun, RunData, sqlite3.Connection]) -> None:
    synth, run, con = db
    records = [_one(con, f"SELECT count(*) FROM {table}") for table in ("span", "event", "counter")]
    assert sum(records) == synth.num_records  # type: ignore[arg-type]
    # the same records as the in-memory reader of `inspect` reads, kind by kind
    assert _one(con, "SELECT count(*) FROM span") == len(run.spans)
    assert _one(con, "SELECT count(*) FROM event") == len(run.events)
    assert _one(con, "SELECT count(*) FROM counter") == len(run.counters)
    assert _one(con, "SELECT count(*) FROM process") == 2
    assert _one(con, "SELECT value FROM process_meta WHERE key = 'dp_rank'") == "0"
    # attrs are JSON, queryable; rid / batch_id are columns for joins
    blocks = _one(con, "SELECT sum(json_extract(attrs, '$.blocks')) FROM event WHERE name = 'allocate'")
    assert blocks == sum(b.blocks_allocated for b in synth.batches)
    assert _one(con, "SELECT count(DISTINCT rid) FROM event WHERE name = 'httpReq'") == len(synth.requests)
    usage = _one(con, "SELECT max(json_extract(\"values\", '$.usage')) FROM counter WHERE name = 'kvcache'")
    assert 0 < usage <= 1  # type: ignore[operator]
    # a batch span's request list is the batch_req table, not repeated in its attrs
    assert _one(con, "SELECT json_extract(attrs, '$.reqs') FROM span WHERE name = 'batchFrameworkProcessing'") is None


def test_request_and_batch_tables(db: tuple[SyntheticRun, RunData, sqlite3.Connection]) -> None:
    synth, _, con = db
    for rid, ttft, queue, e2e in con.execute("SELECT rid, ttft_ms, queue_ms, e2e_ms FROM request"):
        truth = synth.requests[rid]
        assert ttft == pytest.approx(truth.ttft_ms, abs=1e-9)
        assert queue == pytest.approx(truth.queue_ms, abs=1e-9)
        assert e2e == pytest.approx(truth.e2e_ms, abs=1e-9)
    model = dict(con.execute("SELECT batch_id, model_run_ms FROM batch"))
    assert model == pytest.approx({b.batch_id: b.model_run_ms for b in synth.batches})
    assert str(_one(con, "SELECT prefill_chunk_sizes FROM batch WHERE batch_row = 0")).startswith("[")


def test_joins_through_batch_req(db: tuple[SyntheticRun, RunData, sqlite3.Connection]) -> None:
    synth, _, con = db
    assert _one(con, "SELECT count(*) FROM batch_req") == sum(b.batch_size for b in synth.batches)
    # iterations per request = its rows in batch_req; equals the table's num_iterations
    rows = con.execute("""
        SELECT r.rid, r.num_iterations, count(br.batch_row), max(b.start_ns) >= r.first_scheduled_ns
        FROM request r JOIN batch_req br USING (req_row) JOIN batch b ON b.batch_row = br.batch_row
        GROUP BY r.rid""").fetchall()
    assert len(rows) == len(synth.requests)
    assert all(n == m and ok for _, n, m, ok in rows)
    # the first batch of each request starts at its first_scheduled_ns
    first = dict(con.execute("""
        SELECT br.rid, min(b.start_ns) FROM batch_req br JOIN batch b USING (batch_row) GROUP BY br.rid"""))
    assert first == {rid: t.first_scheduled_ns for rid, t in synth.requests.items()}


def test_views_answer(db: tuple[SyntheticRun, RunData, sqlite3.Connection]) -> None:
    synth, _, con = db
    assert _one(con, "SELECT count(*) FROM v_ttft") == len(synth.requests)
    assert _one(con, "SELECT count(*) FROM v_batch_size_curve") == len(synth.batches)
    assert _one(con, "SELECT count(*) FROM v_kv_usage") == len(synth.batches)
    assert _one(con, "SELECT max(batch_size) FROM v_batch_size_curve") <= 12  # type: ignore[operator]
    assert _one(con, "SELECT count(*) FROM v_batch_exec") == len(synth.batches)
    assert _one(con, "SELECT count(*) FROM state_transition WHERE to_state = 'PREEMPTED'") == sum(
        t.preemptions for t in synth.requests.values())


def test_rewrite_replaces_the_file(tmp_path: Path) -> None:
    synth = generate_run(tmp_path / "run", SyntheticConfig(requests=3, output_tokens=2))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "profiler.db").write_text("not a database")
    _write_db(synth.run_dir, tmp_path / "out")
    path = _write_db(synth.run_dir, tmp_path / "out")
    assert _one(sqlite3.connect(path), "SELECT count(*) FROM request") == 3
