from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from synthetic import SyntheticConfig, SyntheticRun, generate_run

from service_profiler.analyze.sqlite_export import write_sqlite
from service_profiler.analyze.tables import build_tables
from service_profiler.rawdata.rawfile import RunData, read_run


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> tuple[SyntheticRun, RunData, sqlite3.Connection]:
    base = tmp_path_factory.mktemp("db")
    synth = generate_run(base / "run", SyntheticConfig(requests=40, output_tokens=10, max_num_seqs=12,
                                                       num_gpu_blocks=120, seed=9))
    run = read_run([synth.run_dir])
    path = write_sqlite([synth.run_dir], build_tables(run), base / "profiler.db")
    assert not (base / "profiler.db.tmp").exists() and not (base / "profiler.db.raw.tmp").exists()
    return synth, run, sqlite3.connect(path)


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
    run = read_run([synth.run_dir])
    tables = build_tables(run)
    path = tmp_path / "profiler.db"
    path.write_text("not a database")
    write_sqlite([synth.run_dir], tables, path)
    write_sqlite([synth.run_dir], tables, path)
    assert _one(sqlite3.connect(path), "SELECT count(*) FROM request") == 3


@pytest.mark.parametrize("drain_every", [7, 1_000_000])
def test_raw_tables_streamed_from_the_files_match_the_read_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                drain_every: int) -> None:
    # write_raw_db reads the files as a stream (drained every DRAIN_RECORDS records) yet writes the
    # rows in the order a stable time sort of the whole run gives: the same ids as read_run's lists
    import json

    from service_profiler.analyze.sqlite_export import write_raw_db
    from service_profiler.rawdata import rawfile

    synth = generate_run(tmp_path / "run", SyntheticConfig(requests=12, output_tokens=6, max_num_seqs=4, seed=3))
    run = read_run([synth.run_dir])
    monkeypatch.setattr(rawfile, "DRAIN_RECORDS", drain_every)
    con = sqlite3.connect(write_raw_db([synth.run_dir], tmp_path / "raw.db"))
    spans = con.execute("SELECT id, proc, domain, name, start_ns, end_ns, tid, attrs FROM span ORDER BY id").fetchall()
    assert [r[0] for r in spans] == list(range(1, len(run.spans) + 1))
    assert [r[1:7] for r in spans] == [(s.proc, s.domain, s.name, s.start_ns, s.end_ns, s.tid) for s in run.spans]
    assert [json.loads(r[7]) if r[7] else None for r in spans] == [
        {k: v for k, v in s.attrs.items() if not (s.name == "batchFrameworkProcessing" and k == "reqs")}
        if s.attrs else None for s in run.spans]
    events = con.execute("SELECT proc, name, ts_ns, tid, attrs FROM event ORDER BY id").fetchall()
    assert events == [(e.proc, e.name, e.ts_ns, e.tid, json.dumps(e.attrs, separators=(",", ":")) if e.attrs
                       else None) for e in run.events]
    counters = con.execute('SELECT proc, name, ts_ns, "values" FROM counter ORDER BY id').fetchall()
    assert [(c[0], c[1], c[2], json.loads(c[3])) for c in counters] == [
        (c.proc, c.name, c.ts_ns, c.values) for c in run.counters]
    assert con.execute("SELECT count(*) FROM process").fetchone()[0] == len(run.processes)
    indexes = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"ix_span_name", "ix_event_rid", "ix_counter_name"} <= indexes
    assert con.execute("SELECT name FROM sqlite_temp_master").fetchall() == []


@pytest.mark.parametrize("count", [0, 1, 63, 64, 65, 129, 500])
@pytest.mark.parametrize("width", [1, 5, 13, 40])
def test_insert_rows_writes_every_row_in_order(count: int, width: int) -> None:
    # Multi-row INSERTs (64 rows, fewer for rows so wide that 64 would pass SQLite's old limit of 999
    # parameters, as at width 40) plus single rows for the rest: the same table as one statement per
    # row, rowids included.
    from service_profiler.analyze.sqlite_export import insert_rows

    rows = [tuple(f"r{i}c{k}" if k % 2 else i * width + k for k in range(width)) for i in range(count)]
    cols = ", ".join(f"c{k}" for k in range(width))
    con = sqlite3.connect(":memory:")
    for name in ("many", "one"):
        con.execute(f"CREATE TABLE {name} ({cols})")
    insert_rows(con, "many", width, iter(rows))  # a generator as from the exporters: read once
    con.executemany(f"INSERT INTO one VALUES ({','.join('?' * width)})", rows)
    many = con.execute("SELECT rowid, * FROM many ORDER BY rowid").fetchall()
    assert many == con.execute("SELECT rowid, * FROM one ORDER BY rowid").fetchall()
    assert [r[1:] for r in many] == rows
