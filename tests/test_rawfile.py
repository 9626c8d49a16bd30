from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from synthetic import SyntheticConfig, SyntheticRun, generate_run

from service_profiler.rawdata.rawfile import read_run

SMALL = SyntheticConfig(requests=20, output_tokens=6, max_num_seqs=8, seed=3, flush_every=16)


@pytest.fixture
def synth(tmp_path: Path) -> SyntheticRun:
    return generate_run(tmp_path / "run", SMALL)


def _engine_file(synth: SyntheticRun) -> Path:
    return next(p for p in synth.files if "-4200." in p.name)


def test_reads_every_record_sorted_and_epoch_aligned(synth: SyntheticRun) -> None:
    run = read_run([synth.run_dir])
    assert run.problems == []
    assert run.num_records == synth.num_records
    assert sorted(p.role for p in run.processes) == ["api_server", "engine_core"]
    starts = [s.start_ns for s in run.spans]
    assert starts == sorted(starts)
    assert [e.ts_ns for e in run.events] == sorted(e.ts_ns for e in run.events)
    assert [c.ts_ns for c in run.counters] == sorted(c.ts_ns for c in run.counters)
    # timestamps are epoch ns: the true arrival of every request is an httpReq timestamp
    arrivals = {e.attrs["rid"]: e.ts_ns for e in run.events if e.name == "httpReq" and e.attrs}
    assert arrivals == {rid: t.arrival_ns for rid, t in synth.requests.items()}


def test_processes_carry_header_meta_patch_and_state(synth: SyntheticRun) -> None:
    run = read_run([synth.run_dir])
    engine = next(p for p in run.processes if p.role == "engine_core")
    assert engine.key == f"{SMALL.hostname}:{SMALL.engine_pid}"
    assert engine.engine == {"name": "vllm", "version": "0.32.0"}
    assert engine.meta["dp_rank"] == 0
    assert engine.patch is not None and engine.patch["skipped"][0]["reason"] == "module not imported"
    assert engine.dropped == 0
    assert {s[2] for s in run.states} == {True}
    assert engine.wall_offset_ns != 0


def test_clock_anchor_aligns_processes_from_different_hosts(tmp_path: Path) -> None:
    # the engine's monotonic clock is 5000 s away from the API server's (another host)
    cfg = SyntheticConfig(requests=10, output_tokens=4, engine_hostname="host-b", engine_mono_offset_ns=5_000 * 10**9)
    synth = generate_run(tmp_path / "run", cfg)
    run = read_run([synth.run_dir])
    enqueue = {e.attrs["rid"]: e.ts_ns for e in run.events if e.name == "enqueue" and e.attrs}
    assert enqueue == {rid: t.engine_arrival_ns for rid, t in synth.requests.items()}
    assert {p.hostname for p in run.processes} == {SMALL.hostname, "host-b"}


def _shift_wall_anchor(path: Path, shift_ns: int) -> None:
    lines = path.read_text().splitlines(keepends=True)
    header = json.loads(lines[0])
    header["clock"]["wall_ns"] += shift_ns
    lines[0] = json.dumps(header) + "\n"
    path.write_text("".join(lines))


def test_processes_of_one_host_share_its_monotonic_clock(synth: SyntheticRun) -> None:
    # The wall clock was stepped 100 ms (NTP) between the API server's start and the engine's: each
    # process's own anchor would put every engine record 100 ms late, scheduling after the first token.
    _shift_wall_anchor(_engine_file(synth), 100_000_000)
    run = read_run([synth.run_dir])
    enqueue = {e.attrs["rid"]: e.ts_ns for e in run.events if e.name == "enqueue" and e.attrs}
    truth = {rid: t.engine_arrival_ns for rid, t in synth.requests.items()}
    # one clock for both, anchored by the newest anchor (the engine's): everything moves by the step alike
    assert {enqueue[rid] - truth[rid] for rid in truth} == {100_000_000}
    api = next(p for p in run.processes if p.role == "api_server")
    engine = next(p for p in run.processes if p.role == "engine_core")
    assert api.wall_offset_ns == engine.wall_offset_ns
    arrival = {e.attrs["rid"]: e.ts_ns for e in run.events if e.name == "httpReq" and e.attrs}
    assert {enqueue[rid] - arrival[rid] for rid in truth} == {t.engine_arrival_ns - t.arrival_ns
                                                               for t in synth.requests.values()}


def test_same_hostname_on_unrelated_clocks_keeps_each_anchor(tmp_path: Path) -> None:
    # two machines that share a hostname (e.g. containers): their monotonic clocks are unrelated, so each
    # file keeps its own anchor
    cfg = SyntheticConfig(requests=10, output_tokens=4, engine_mono_offset_ns=5_000 * 10**9)
    synth = generate_run(tmp_path / "run", cfg)
    run = read_run([synth.run_dir])
    enqueue = {e.attrs["rid"]: e.ts_ns for e in run.events if e.name == "enqueue" and e.attrs}
    assert enqueue == {rid: t.engine_arrival_ns for rid, t in synth.requests.items()}
    assert len({p.wall_offset_ns for p in run.processes}) == 2


def test_torn_last_line_keeps_everything_before_it(synth: SyntheticRun) -> None:
    path = _engine_file(synth)
    lines = path.read_bytes().splitlines(keepends=True)
    rec_index = max(i for i, line in enumerate(lines) if line.startswith(b'{"t":"rec"'))
    cut = lines[: rec_index + 1]
    cut[-1] = cut[-1][: len(cut[-1]) // 2]  # cut the last rec line in the middle, no newline
    path.write_bytes(b"".join(cut))
    run = read_run([synth.run_dir])
    lost = len(json.loads(lines[rec_index])["r"])
    assert run.num_records == synth.num_records - lost
    assert len(run.problems) == 1
    assert f"{path}:{rec_index + 1}: torn last line" in run.problems[0]


def test_corrupt_middle_line_is_skipped_and_reading_goes_on(synth: SyntheticRun) -> None:
    path = _engine_file(synth)
    lines = path.read_bytes().splitlines(keepends=True)
    rec_lines = [i for i, line in enumerate(lines) if line.startswith(b'{"t":"rec"')]
    victim = rec_lines[len(rec_lines) // 2]
    lost = len(json.loads(lines[victim])["r"])
    lines[victim] = b'{"t":"rec","r":[[1,2,\x00garbage\n'
    path.write_bytes(b"".join(lines))
    run = read_run([synth.run_dir])
    assert run.num_records == synth.num_records - lost
    assert run.problems == [
        f"{path}:{victim + 1}: corrupt line (not a JSON object with \"t\", or nested too deep); skipped"]
    # records after the corrupt line are there: the last batch of the run is still read
    last_batch = max(b.batch_id for b in synth.batches)
    assert any(s.attrs and s.attrs.get("batch_id") == last_batch for s in run.spans if s.name == "step")


def test_bad_record_costs_only_itself(synth: SyntheticRun) -> None:
    path = _engine_file(synth)
    lines = path.read_bytes().splitlines(keepends=True)
    victim = next(i for i, line in enumerate(lines) if line.startswith(b'{"t":"rec"'))
    obj = json.loads(lines[victim])
    obj["r"][0][1] = "not-a-timestamp"
    obj["r"].append([999, 1, 1, None])  # channel never declared
    lines[victim] = (json.dumps(obj) + "\n").encode()
    path.write_bytes(b"".join(lines))
    run = read_run([synth.run_dir])
    assert run.num_records == synth.num_records - 1
    assert any("1 malformed records" in p for p in run.problems)
    assert any("undeclared channel 999" in p for p in run.problems)


def test_file_without_header_is_reported_and_skipped(synth: SyntheticRun) -> None:
    stray = synth.run_dir / "other-1.sprof.jsonl"
    stray.write_text('{"t":"rec","r":[[1,5,1,null]]}\n')
    run = read_run([synth.run_dir])
    assert run.num_records == synth.num_records
    assert len(run.processes) == 2
    assert run.problems == [f"{stray}:1: no valid header line (expected a JSON object with \"t\": \"header\"); "
                            "file skipped"]


def test_dir_of_runs_host_copies_and_duplicates(tmp_path: Path) -> None:
    a = generate_run(tmp_path / "runs" / "a", SMALL)
    b = generate_run(tmp_path / "runs" / "b",
                     SyntheticConfig(requests=5, output_tokens=3, api_pid=7100, engine_pid=7200))
    # the same engine file collected twice (e.g. copied from two hosts): counted once
    copy_dir = tmp_path / "hostcopy"
    copy_dir.mkdir()
    shutil.copy(_engine_file(a), copy_dir / _engine_file(a).name)
    run = read_run([tmp_path / "runs", copy_dir])
    assert len(run.processes) == 4
    assert run.num_records == a.num_records + b.num_records
    assert len(run.problems) == 1 and "duplicate copy" in run.problems[0]


def test_single_file_and_missing_paths(synth: SyntheticRun, tmp_path: Path) -> None:
    run = read_run(_engine_file(synth))
    assert len(run.processes) == 1 and run.processes[0].role == "engine_core"
    empty = tmp_path / "empty"
    empty.mkdir()
    run = read_run([empty, tmp_path / "nope"])
    assert run.processes == [] and len(run.problems) == 2


def test_rids_are_interned(synth: SyntheticRun) -> None:
    run = read_run([synth.run_dir])
    batch = next(s for s in run.spans if s.name == "batchFrameworkProcessing" and s.attrs and s.attrs["reqs"])
    rid = batch.attrs["reqs"][0][0]  # type: ignore[index]
    enqueue = next(e for e in run.events if e.name == "enqueue" and e.attrs and e.attrs["rid"] == rid)
    assert enqueue.attrs is not None and enqueue.attrs["rid"] is rid
