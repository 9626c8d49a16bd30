"""Data only partly there: collection switched on and off, processes that did not close, records
lost, an API server that died, duplicated input. Nothing is presented as whole that is not, and no
duration is ever negative."""

from __future__ import annotations

import csv
import json
import random
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from synthetic import SyntheticConfig, SyntheticRun, generate_run

from service_profiler.columnar import command
from service_profiler.rawdata import inspect_run

OUTPUT_TOKENS = 8
DURATIONS = ("queue_ms", "prefill_ms", "decode_ms", "ttft_ms", "tpot_ms", "e2e_ms")


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> SyntheticRun:
    config = SyntheticConfig(requests=40, output_tokens=OUTPUT_TOKENS, seed=7, flush_every=16, arrival_rate_per_s=40)
    return generate_run(tmp_path_factory.mktemp("partial") / "run", config)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write(path: Path, lines: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(obj) + "\n" for obj in lines))


def _files(run_dir: Path) -> dict[str, Path]:
    """'api' and 'engine' raw files of a synthetic run."""
    out = {}
    for path in sorted(run_dir.glob("*.sprof.jsonl")):
        out["api" if "api" in _lines(path)[0].get("role", "") else "engine"] = path
    return out


def _analyze(run_dir: Path, out: Path, *formats: str) -> tuple[list[dict[str, str]], str]:
    argv = ["--input-path", str(run_dir), "--output-path", str(out), "--format", *(formats or ("csv",))]
    assert command.main(argv) == command.EXIT_OK
    with (out / "request.csv").open(newline="") as fh:
        return list(csv.DictReader(fh)), (out / "service_summary.csv").read_text()


def _num(cell: str) -> float | None:
    return float(cell) if cell not in ("", None) else None


def _mono_range(run_dir: Path) -> tuple[int, int]:
    times = [rec[1] for path in _files(run_dir).values() for obj in _lines(path) if obj.get("t") == "rec"
             for rec in obj["r"]]
    return min(times), max(times)


def _with_windows(src: Path, dst: Path, off: list[tuple[int, int]], only: str | None = None) -> None:
    """The run as if collection had been off during each (from, to) mono-ns window: the records starting
    then are not written, and each process writes its state switches. `only`: in that process alone."""
    def off_at(ts: int) -> bool:
        return any(a <= ts < b for a, b in off)

    for name, path in _files(src).items():
        if only is not None and name != only:
            shutil.copy(path, dst / path.name)
            continue
        out: list[dict[str, Any]] = []
        for obj in _lines(path):
            if obj.get("t") == "rec":
                kept = [rec for rec in obj["r"] if not off_at(rec[1])]
                if kept:
                    out.append({"t": "rec", "r": kept})
            else:
                out.append(obj)
        for a, b in off:
            out.append({"t": "state", "enabled": False, "ts": a, "reason": "reload"})
            out.append({"t": "state", "enabled": True, "ts": b, "reason": "reload"})
        _write(dst / path.name, out)


@pytest.mark.parametrize(("seed", "only"), [(0, None), (1, None), (2, None), (3, None), (4, "engine"),
                                            (5, "engine"), (6, "api")])
def test_switching_collection_marks_partial_requests_and_no_duration_is_negative(
        synth: SyntheticRun, tmp_path: Path, seed: int, only: str | None) -> None:
    rng = random.Random(seed)
    lo, hi = _mono_range(synth.run_dir)
    cuts = sorted(rng.randint(lo, hi) for _ in range(2 * rng.randint(1, 5)))
    off = list(zip(cuts[::2], cuts[1::2], strict=True))
    (tmp_path / "run").mkdir()
    _with_windows(synth.run_dir, tmp_path / "run", off, only)
    rows, summary = _analyze(tmp_path / "run", tmp_path / "out", "csv", "db")
    assert rows and any(r["complete"] == "0" for r in rows)
    files = _files(synth.run_dir)
    offset = _offset(files["api"])
    assert offset == _offset(files["engine"])  # one clock: the windows are the same instants in both
    switches = sorted(t + offset for w in off for t in w)
    for row in rows:
        for name in DURATIONS:
            value = _num(row[name])
            assert value is None or value >= 0, (name, row)
        seen = [int(row[c]) for c in ("arrival_ns", "engine_arrival_ns", "first_scheduled_ns", "first_token_ns")
                if row[c]]
        end = int(row["completion_ns"]) if row["completion_ns"] else 2**63
        switched = any(min(seen) < s <= end for s in switches)
        if row["complete"] == "1":
            assert not switched and row["incomplete_reason"] == ""
            assert int(row["output_tokens"]) == OUTPUT_TOKENS, row  # a whole request, all its tokens
        else:
            assert row["complete"] == "0" and row["incomplete_reason"]
        if switched:
            assert row["complete"] == "0" and "collection_switched" in row["incomplete_reason"]
    complete = [r for r in rows if r["complete"] == "1"]
    svc = dict(line.split(",", 1) for line in summary.splitlines()[1:])
    assert int(svc["incomplete_request_num"]) == len(rows) - len(complete)
    assert int(svc["complete_request_num"]) == len(complete)
    with (tmp_path / "out" / "request_summary.csv").open(newline="") as fh:
        stats = {r["Metric"]: r for r in csv.DictReader(fh)}
    if complete:  # latency statistics over complete requests only
        ttft = [float(r["ttft_ms"]) for r in complete]
        assert float(stats["first_token_latency"]["Average"]) == pytest.approx(sum(ttft) / len(ttft), rel=1e-6)
        assert float(stats["first_token_latency"]["Min"]) >= 0
    with (tmp_path / "out" / "batch.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            for name in ("during_time(ms)", "model_run_ms", "step_ms", "update_ms"):
                assert (_num(row[name]) or 0) >= 0
            assert row["complete"] in ("0", "1")
    db = sqlite3.connect(tmp_path / "out" / "profiler.db")
    for name in DURATIONS:
        assert db.execute(f"SELECT count(*) FROM request WHERE {name} < 0").fetchone()[0] == 0
    n_db = db.execute("SELECT count(*) FROM request WHERE complete = 0").fetchone()[0]
    assert n_db == len(rows) - len(complete)


def test_process_without_close_marks_what_follows_its_last_flush(synth: SyntheticRun, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    _, hi = _mono_range(synth.run_dir)
    files = _files(synth.run_dir)
    whole, _ = _analyze(synth.run_dir, tmp_path / "whole")
    done = sorted(int(r["completion_ns"]) - _offset(files["engine"]) for r in whole)
    until = done[len(done) // 2]  # the engine's records are known complete up to half the requests' ends
    api = [*_lines(files["api"]), {"t": "flushed", "until": hi + 1}, {"t": "close", "ts": hi + 2, "reason": "exit"}]
    engine = [*_lines(files["engine"]), {"t": "flushed", "until": until}]  # killed: no final flush
    lost_from, lost_to = until - 2_000_000, until - 1_000_000
    engine.append({"t": "lost", "count": 17, "reason": "write_error", "from_ts": lost_from, "to_ts": lost_to,
                   "msg": "No space left on device"})
    _write(tmp_path / "run" / files["api"].name, api)
    _write(tmp_path / "run" / files["engine"].name, engine)
    rows, _summary = _analyze(tmp_path / "run", tmp_path / "out", "csv", "db")
    offset = _offset(files["engine"])
    for row in rows:
        end = int(row["completion_ns"])
        if end > until + offset:
            assert row["complete"] == "0" and "records_missing:not closed" in row["incomplete_reason"], row
        start = int(row["arrival_ns"])
        if start <= lost_to + offset and end >= lost_from + offset:
            assert "records_missing:lost:write_error" in row["incomplete_reason"], row
    assert any(r["complete"] == "1" for r in rows) and any(r["complete"] == "0" for r in rows)
    with (tmp_path / "out" / "batch.csv").open(newline="") as fh:
        batches = list(csv.DictReader(fh))
    late = [b for b in batches if int(b["start_ns"]) > until + offset]
    assert late and all(b["complete"] == "0" and "not closed" in b["incomplete_reason"] for b in late)
    err_out = capsys.readouterr().out
    assert "NOT CLOSED" in err_out and "PARTIAL" in err_out
    db = sqlite3.connect(tmp_path / "out" / "profiler.db")
    assert sorted(r[0] for r in db.execute("SELECT status FROM process_completeness")) == ["closed", "not closed"]
    gaps = db.execute("SELECT reason, count, end_ns FROM process_gap ORDER BY reason").fetchall()
    assert gaps == [("lost:write_error", 17, lost_to + offset), ("not closed: no final flush", None, None)]
    # inspect says the same, per process
    assert inspect_run.main([str(tmp_path / "run")]) == 0
    text = capsys.readouterr().out
    assert "closed cleanly (exit)" in text and "NOT CLOSED" in text and "17 records, lost:write_error" in text
    info = json.loads(_inspect_json(tmp_path / "run", capsys))
    statuses = sorted(p["completeness"] for p in info["processes"])
    assert statuses == ["closed", "not closed"]


def _inspect_json(run: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert inspect_run.main([str(run), "--json"]) == 0
    return capsys.readouterr().out


def _offset(path: Path) -> int:
    clock = _lines(path)[0]["clock"]
    return int(clock["wall_ns"] - clock["mono_ns"])


def test_old_files_without_markers_read_as_unknown_said_once(synth: SyntheticRun, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    rows, _ = _analyze(synth.run_dir, tmp_path / "out")
    assert rows and all(r["complete"] == "1" for r in rows)
    out = capsys.readouterr().out
    assert out.count("no completeness markers") == 1
    assert inspect_run.main([str(synth.run_dir)]) == 0
    assert capsys.readouterr().out.count("without completeness markers") == 1


def test_api_server_killed_marks_requests_with_engine_timing_only(synth: SyntheticRun, tmp_path: Path) -> None:
    files = _files(synth.run_dir)
    api = _lines(files["api"])
    lo, hi = _mono_range(synth.run_dir)
    killed_at = (lo + hi) // 2
    kept = []
    for obj in api:
        if obj.get("t") == "rec":
            obj = {"t": "rec", "r": [r for r in obj["r"] if r[1] < killed_at]}
            if not obj["r"]:
                continue
        kept.append(obj)
    _write(tmp_path / "run" / files["api"].name, [*kept, {"t": "flushed", "until": killed_at}])
    shutil.copy(files["engine"], tmp_path / "run" / files["engine"].name)
    rows, _ = _analyze(tmp_path / "run", tmp_path / "out")
    engine_only = [r for r in rows if r["timing_source"] == "engine"]
    assert engine_only, "some requests arrived after the API server's records end"
    assert all(r["complete"] == "0" and "no_api_server_record" in r["incomplete_reason"] for r in engine_only)


def test_duplicated_input_counts_once_and_is_reported(synth: SyntheticRun, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    ref_rows, ref_summary = _analyze(synth.run_dir, tmp_path / "ref")
    files = _files(synth.run_dir)
    run = tmp_path / "run"
    run.mkdir()
    # the engine file concatenated with itself; one API rec line written twice; the API file copied
    (run / files["engine"].name).write_bytes(files["engine"].read_bytes() * 2)
    api_lines = files["api"].read_text().splitlines(keepends=True)
    rec_at = next(i for i, line in enumerate(api_lines) if '"rec"' in line)
    api_lines.insert(rec_at + 1, api_lines[rec_at])
    (run / files["api"].name).write_text("".join(api_lines))
    (run / ("copy-" + files["api"].name)).write_text("".join(api_lines))
    capsys.readouterr()
    rows, summary = _analyze(run, tmp_path / "out")
    assert len(rows) == len(ref_rows)
    keep = ("total_input_token_num", "total_generated_token_num", "batch_num", "request_num")
    ref = dict(line.split(",", 1) for line in ref_summary.splitlines()[1:])
    got = dict(line.split(",", 1) for line in summary.splitlines()[1:])
    assert [got[k] for k in keep] == [ref[k] for k in keep]
    problems = (tmp_path / "out" / "problems.txt").read_text()
    assert "repeating an earlier line" in problems and "duplicate copy" in problems
    assert f"{files['engine'].name}:" in problems
