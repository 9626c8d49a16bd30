"""`service-profiler convert` (raw -> Parquet beside the raw files, per host) and `analyze` reading the
Parquet instead of the raw files (docs/DISTRIBUTED.md): the same outputs, hosts merged, stale and bad
conversions refused with a message, symbolic links never followed. Everything through the CLI, in
subprocesses, on synthetic runs.

The outputs compared: every CSV byte for byte, problems.txt byte for byte, every profiler.db table row for
row, and the trace's events as a multiset (the trace's event order differs between two analyses of the
same raw files too: it is not part of what reading the Parquet must keep).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import duckdb
import pytest
from synthetic import SyntheticConfig, generate_run

from service_profiler.columnar.parquet_format import PARQUET_DIR

FORMATS = ("csv", "db", "json")


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service_profiler.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def _analyze(inputs: list[Path], out: Path) -> subprocess.CompletedProcess[str]:
    return _cli("analyze", "--input-path", *inputs, "--output-path", out, "--format", *FORMATS, "--quiet")


def _convert(*run_dirs: Path) -> subprocess.CompletedProcess[str]:
    return _cli("convert", "--input-path", *run_dirs, "--quiet")


def _ok(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 0, done.stderr


def _refused(done: subprocess.CompletedProcess[str], *names: str) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    for name in names:
        assert name in done.stderr, (name, done.stderr)
    return done.stderr


def _append(path: Path, lines: list[str]) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write("".join(line + "\n" for line in lines))


def _damage(api_file: Path) -> None:
    """Control lines of every kind the reader keeps, and bad lines it lists as problems."""
    _append(api_file, [
        '{"t":"warn","msg":"handler failed","count":3}',
        '{"t":"patch","applied":["a.b"],"pending":[],"skipped":["c.d"],"failed":[]}',
        '{"t":"meta","key":"note","value":{"x":[1,2]}}',
        '{"t":"lost","count":4,"reason":"write_error","from_ts":10,"to_ts":20,"msg":"disk full"}',
        '{"t":"dropped","count":2,"ts":30}',
        '{"t":"flushed","until":40}',
        '{"t":"mystery"}',
        'not json at all',
        '{"t":"rec","r":[[999,5,6,1,null],[1,"x",7,1,null]]}',
        '{"t":"rec","r":[[1,5,6,1,null],[1,#,7,1,null]]}',  # corrupt, though it ends as a record line does
        '{"t":"rec","r":[[1,5,6',  # torn: the process was killed mid-line
    ])


def _db_rows(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    db = sqlite3.connect(path)
    try:
        names = [n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view') "
                                          "ORDER BY name")]
        return {n: db.execute(f'SELECT * FROM "{n}"').fetchall() for n in names}
    finally:
        db.close()


def _trace_events(path: Path) -> tuple[list[str], Any]:
    trace = json.loads(path.read_text(encoding="utf-8"))
    return sorted(json.dumps(e, sort_keys=True) for e in trace["traceEvents"]), trace["metadata"]


def _assert_same_outputs(want: Path, got: Path) -> None:
    names = sorted(p.relative_to(want) for p in want.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(got) for p in got.rglob("*") if p.is_file())
    assert any(n.suffix == ".csv" for n in names)
    for name in names:
        if name.suffix == ".csv" or name.name == "problems.txt":
            assert (got / name).read_bytes() == (want / name).read_bytes(), name
    want_db, got_db = _db_rows(want / "profiler.db"), _db_rows(got / "profiler.db")
    assert want_db.keys() == got_db.keys()
    for table, rows in want_db.items():
        assert got_db[table] == rows, table
    assert _trace_events(got / "chrome_tracing.json") == _trace_events(want / "chrome_tracing.json")


def test_parquet_gives_the_same_outputs_as_the_raw_files(tmp_path: Path) -> None:
    synth = generate_run(tmp_path / "run", SyntheticConfig(requests=120, output_tokens=12, dp_size=2, seed=5))
    api = next(p for p in synth.run_dir.glob("*.sprof.jsonl") if "4100" in p.name)
    _damage(api)
    _ok(_analyze([synth.run_dir], tmp_path / "raw"))
    problems = (tmp_path / "raw" / "problems.txt").read_text(encoding="utf-8")
    assert "torn" in problems and "mystery" in problems and "malformed records" in problems, problems
    assert f"{api}: 1 record line(s) not valid JSON" in problems, problems
    _ok(_convert(synth.run_dir))
    assert (synth.run_dir / PARQUET_DIR / "manifest.json").is_file()
    _ok(_analyze([synth.run_dir], tmp_path / "parquet"))
    _assert_same_outputs(tmp_path / "raw", tmp_path / "parquet")
    # the conversion named twice (its run directory and itself) is read once
    _ok(_analyze([synth.run_dir, synth.run_dir / PARQUET_DIR], tmp_path / "twice"))
    _assert_same_outputs(tmp_path / "raw", tmp_path / "twice")
    # the Parquet alone, raw files gone (only the conversion was kept): still the same
    for raw in synth.run_dir.glob("*.sprof.jsonl"):
        raw.unlink()
    _ok(_analyze([synth.run_dir], tmp_path / "parquet_only"))
    _assert_same_outputs(tmp_path / "raw", tmp_path / "parquet_only")


def _two_hosts(root: Path) -> tuple[Path, list[Path]]:
    """An API server on one host and two data-parallel engines on another (another monotonic clock), each
    host's files in a directory of its own, the second engine's apart (`engine-host-b`), its clock anchor a
    millisecond off the first's: the merged run anchors both on one offset (rawcheck.same_host_offsets),
    not what the conversion of the first engine's file alone used, so its records are shifted."""
    cfg = SyntheticConfig(requests=120, output_tokens=12, dp_size=2, engine_hostname="engine-host",
                          engine_mono_offset_ns=987_654_321_000, seed=7)
    synth = generate_run(root / "flat", cfg)
    run = root / "run"
    for raw in synth.run_dir.glob("*.sprof.jsonl"):
        lines = raw.read_text(encoding="utf-8").splitlines(keepends=True)
        header = json.loads(lines[0])
        if header["pid"] == cfg.engine_pid + 1:
            header["clock"]["wall_ns"] += 1_000_000
            lines[0] = json.dumps(header) + "\n"
        host_dir = run / (header["hostname"] + ("-b" if header["pid"] == cfg.engine_pid + 1 else ""))
        host_dir.mkdir(parents=True, exist_ok=True)
        (host_dir / raw.name).write_text("".join(lines), encoding="utf-8")
    return run, sorted(p for p in run.iterdir() if p.is_dir())


def test_two_hosts_converted_apart_merge_to_the_same_outputs(tmp_path: Path) -> None:
    run, hosts = _two_hosts(tmp_path)
    assert [h.name for h in hosts] == ["engine-host", "engine-host-b", "synth-host"]
    _ok(_analyze([run], tmp_path / "raw"))
    for host in hosts:  # each host converts its own files
        _ok(_convert(host))
    # gathered on one machine: only the Parquet directories, as rsync would copy them
    gathered = tmp_path / "gathered"
    for conversion in sorted(run.rglob(PARQUET_DIR)):
        shutil.copytree(conversion, gathered / conversion.relative_to(run))
    assert not list(gathered.rglob("*.sprof.jsonl"))
    _ok(_analyze([gathered], tmp_path / "merged"))
    _assert_same_outputs(tmp_path / "raw", tmp_path / "merged")
    keys = [row[1] for row in _db_rows(tmp_path / "merged" / "profiler.db")["process"]]
    assert sorted(keys) == ["engine-host:4200", "engine-host:4201", "synth-host:4100"], keys
    # the records carry their process's key across hosts (host:pid:clock anchor), not a run's index
    con = duckdb.connect()
    stored = {r[0] for r in con.execute(f"SELECT DISTINCT process FROM "
                                        f"'{run / 'synth-host' / PARQUET_DIR / 'record.parquet'}'").fetchall()}
    assert len(stored) == 1 and next(iter(stored)).startswith("synth-host:4100:"), stored


def test_a_raw_file_changed_after_conversion_is_told(tmp_path: Path) -> None:
    synth = generate_run(tmp_path / "run", SyntheticConfig(requests=30, output_tokens=8, seed=2))
    _ok(_convert(synth.run_dir))
    engine = next(p for p in synth.run_dir.glob("*.sprof.jsonl") if "4200" in p.name)
    _append(engine, ['{"t":"flushed","until":50}'])
    err = _refused(_analyze([synth.run_dir], tmp_path / "out"), "stale", engine.name, "service-profiler convert")
    assert "size" in err
    (synth.run_dir / "late-9999.sprof.jsonl").write_text("{}\n", encoding="utf-8")
    _refused(_analyze([synth.run_dir], tmp_path / "out"), "late-9999.sprof.jsonl (not converted)")
    _ok(_convert(synth.run_dir))  # the fix the message names: convert again
    done = _cli("analyze", "--input-path", synth.run_dir, "--output-path", tmp_path / "out", "--format", "csv")
    _ok(done)
    assert f"reading 1 Parquet conversion(s), not the raw files: {synth.run_dir / PARQUET_DIR}" in done.stderr
    assert not list(synth.run_dir.glob(f".{PARQUET_DIR}-*")), "no staging directory left behind"


def test_a_corrupt_or_foreign_conversion_is_refused_with_the_fix(tmp_path: Path) -> None:
    synth = generate_run(tmp_path / "run", SyntheticConfig(requests=30, output_tokens=8, seed=3))
    _ok(_convert(synth.run_dir))
    conversion = synth.run_dir / PARQUET_DIR
    record = conversion / "record.parquet"
    good = record.read_bytes()
    record.write_bytes(good[: len(good) // 2])
    _refused(_analyze([synth.run_dir], tmp_path / "out"), "record.parquet", "convert --input-path")
    record.write_bytes(good)
    process = conversion / "process.parquet"
    process.write_bytes(b"PAR1 not really")
    _refused(_analyze([synth.run_dir], tmp_path / "out"), "process.parquet", "convert --input-path")
    _ok(_convert(synth.run_dir))
    manifest = conversion / "manifest.json"
    data = json.loads(manifest.read_text(encoding="utf-8"))
    manifest.write_text(json.dumps({**data, "version": 99}), encoding="utf-8")
    _refused(_analyze([synth.run_dir], tmp_path / "out"), "manifest.json", "version 99", "convert --input-path")
    manifest.write_text("{", encoding="utf-8")
    _refused(_analyze([synth.run_dir], tmp_path / "out"), "manifest.json", "not valid JSON")
    _ok(_convert(synth.run_dir))  # ours (a manifest of our format), so convert may replace it
    _ok(_analyze([synth.run_dir], tmp_path / "out"))


def test_symbolic_links_and_foreign_directories_are_never_followed_or_replaced(tmp_path: Path) -> None:
    synth = generate_run(tmp_path / "run", SyntheticConfig(requests=20, output_tokens=8, seed=4))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("not ours", encoding="utf-8")
    target = synth.run_dir / PARQUET_DIR
    target.symlink_to(elsewhere, target_is_directory=True)
    _refused(_convert(synth.run_dir), "symbolic link")
    _refused(_analyze([synth.run_dir], tmp_path / "out"), "symbolic link")
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep.txt"]
    target.unlink()
    target.mkdir()
    (target / "keep.txt").write_text("not ours either", encoding="utf-8")
    _refused(_convert(synth.run_dir), "not written by `service-profiler convert`")
    assert (target / "keep.txt").read_text(encoding="utf-8") == "not ours either"
    shutil.rmtree(target)
    _ok(_convert(synth.run_dir))
    record = target / "record.parquet"
    moved = tmp_path / "record.parquet"
    record.rename(moved)
    record.symlink_to(moved)
    _refused(_analyze([synth.run_dir], tmp_path / "out"), "record.parquet", "symbolic link")


def test_inputs_with_and_without_a_conversion_are_not_mixed(tmp_path: Path) -> None:
    one = generate_run(tmp_path / "one", SyntheticConfig(requests=10, output_tokens=4, seed=1))
    two = generate_run(tmp_path / "two", SyntheticConfig(requests=10, output_tokens=4, seed=2, hostname="other"))
    _ok(_convert(one.run_dir))
    _refused(_analyze([one.run_dir, two.run_dir], tmp_path / "out"), str(two.run_dir), "convert --input-path")


@pytest.mark.parametrize("given", ["file", "missing", "empty"])
def test_convert_wants_a_run_directory(tmp_path: Path, given: str) -> None:
    synth = generate_run(tmp_path / "run", SyntheticConfig(requests=5, output_tokens=4))
    path = {"file": next(synth.run_dir.glob("*.sprof.jsonl")), "missing": tmp_path / "nowhere",
            "empty": tmp_path / "empty"}[given]
    if given == "empty":
        path.mkdir()
    _refused(_convert(path), str(path), "no readable raw files" if given == "empty" else "not a directory")
    if given == "empty":
        assert list(path.iterdir()) == [], "nothing left behind"
