"""`service-profiler analyze` (columnar/command.py): its arguments, console report, exit statuses, one
exporter's failure costing only itself, the raw data's problems reported and written, and the same files
whichever way the exporters run (one after another, threads, a process pool)."""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from synthetic import SyntheticConfig, SyntheticRun, generate_run

from service_profiler.columnar import command, pipeline


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> SyntheticRun:
    return generate_run(tmp_path_factory.mktemp("cmd") / "run", SyntheticConfig(requests=30, output_tokens=8, seed=4))


def _args(inputs: list[Path], out: Path, *formats: str, extra: tuple[str, ...] = ()) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    argv = ["--input-path", *map(str, inputs), "--output-path", str(out), *extra]
    if formats:
        argv += ["--format", *formats]
    return parser.parse_args(argv)


def test_arguments_default_to_every_format(tmp_path: Path) -> None:
    args = _args([tmp_path], tmp_path / "o")
    assert args.format == ["csv", "json", "db", "plots", "model"]


def test_run_writes_csv_and_db_and_reports(synth: SyntheticRun, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert command.run(_args([synth.run_dir], out, "csv", "db")) == command.EXIT_OK
    assert (out / "request.csv").exists() and (out / "profiler.db").exists()
    assert not (out / "chrome_tracing.json").exists() and not (out / "problems.txt").exists()
    captured = capsys.readouterr()
    assert "requests   30 (30 finished)" in captured.out
    assert "request.csv" in captured.out and "profiler.db" in captured.out
    assert "[analyze" in captured.err and "read 2 process file(s)" in captured.err
    assert "problem" not in captured.err


def test_failing_exporter_does_not_cost_the_others(synth: SyntheticRun, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "sp_broken_exporter.py").write_text(
        "class Broken:\n"
        "    name = 'json'\n"
        "    def __init__(self, **options):\n"
        "        pass\n"
        "    def export(self, run, out_dir):\n"
        "        raise RuntimeError('exporter bug')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(pipeline.EXPORTERS, "json", ("sp_broken_exporter", "Broken"))
    out = tmp_path / "out"
    assert command.run(_args([synth.run_dir], out, "json", "csv", "--quiet")) == command.EXIT_EXPORT_FAILED
    assert (out / "batch.csv").exists() and (out / "request_summary.csv").exists()
    assert not (out / "chrome_tracing.json").exists()
    assert "error: json failed: RuntimeError: exporter bug" in capsys.readouterr().err


def test_an_exporter_process_that_dies_is_reported_not_raised(synth: SyntheticRun, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A pool worker killed mid-export (out of memory, a signal) ends in a message and an exit status."""
    (tmp_path / "sp_dying_worker.py").write_text(
        "import os\n"
        "from service_profiler.columnar import pipeline\n"
        "def export(run, fmt, options, out_dir):\n"
        "    if fmt == 'json':\n"
        "        os._exit(9)\n"
        "    return pipeline._in_worker(run, fmt, options, out_dir)\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # a spawned worker gets this sys.path and finds the module
    import sp_dying_worker

    monkeypatch.setattr(pipeline, "_in_worker", sp_dying_worker.export)
    out = tmp_path / "out"
    status = command.run(_args([synth.run_dir], out, "json", "csv", extra=("--jobs", "2", "--processes", "--quiet")))
    assert status == command.EXIT_EXPORT_FAILED
    assert "error: json failed: the exporter process died before it finished" in capsys.readouterr().err


def test_problems_are_reported_and_written(synth: SyntheticRun, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(synth.run_dir, run_dir)
    engine = next(run_dir.glob("*-4200.sprof.jsonl"))
    with engine.open("ab") as fh:
        fh.write(b'{"t":"rec","r":[[3,1')  # the process died mid-write
    out = tmp_path / "out"
    assert command.run(_args([run_dir], out, "csv")) == command.EXIT_OK
    problems = (out / "problems.txt").read_text()
    assert "torn or corrupt record line" in problems and str(engine) in problems
    assert "1 problem(s) in the raw data" in capsys.readouterr().err
    with (out / "request.csv").open(newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 30  # the rest of the file is all there


def test_no_data_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert command.run(_args([tmp_path / "missing"], tmp_path / "out", "csv")) == command.EXIT_NO_DATA
    err = capsys.readouterr().err
    assert "no readable raw files" in err and "no such file or directory" in err


def test_cli_subprocess_all_formats(synth: SyntheticRun, tmp_path: Path) -> None:
    """The real command line in a real process, every output format."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "service_profiler.cli", "analyze", "--input-path",
                           str(synth.run_dir), "--output-path", str(out)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "TTFT" in proc.stdout and "wrote" in proc.stdout
    for name in ("request.csv", "batch.csv", "kvcache.csv", "profiler.db", "per_iteration_requests.csv",
                 "chrome_tracing.json", "plots/ttft_distribution.png", "model/latency_model.json"):
        assert (out / name).stat().st_size > 0, name
    with (out / "request.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 30
    con = sqlite3.connect(out / "profiler.db")
    assert con.execute("SELECT count(*) FROM request").fetchone()[0] == 30


# files whose rows of equal time may come in either order (records of one time in two lines: docs/COLUMNAR.md)
_SAME_LINES = {"kvcache.csv", "events.csv"}


@pytest.mark.parametrize("extra", [("--jobs", "2"), ("--jobs", "2", "--processes")])
def test_threads_and_processes_write_the_same_files(synth: SyntheticRun, tmp_path: Path,
                                                    extra: tuple[str, ...]) -> None:
    """Where the exporters run (one after another, threads, a process pool) never changes what they write."""
    formats = ("csv", "json", "db")
    ref = tmp_path / "ref"
    assert command.run(_args([synth.run_dir], ref, *formats, extra=("--jobs", "1", "--quiet"))) == command.EXIT_OK
    out = tmp_path / "out"
    assert command.run(_args([synth.run_dir], out, *formats, extra=(*extra, "--quiet"))) == command.EXIT_OK
    files = sorted(p.name for p in ref.iterdir() if p.is_file() and p.name != "profiler.db")
    assert files == sorted(p.name for p in out.iterdir() if p.is_file() and p.name != "profiler.db")
    assert "request.csv" in files and "chrome_tracing.json" in files
    for name in files:
        if name == "chrome_tracing.json":  # the same events; records of one time may come in either order
            ref_trace, out_trace = (json.loads((d / name).read_text()) for d in (ref, out))
            assert out_trace["metadata"] == ref_trace["metadata"]
            assert sorted(map(json.dumps, out_trace["traceEvents"])) == sorted(
                map(json.dumps, ref_trace["traceEvents"]))
        elif name in _SAME_LINES:
            assert sorted((out / name).read_text().splitlines()) == sorted((ref / name).read_text().splitlines())
        else:
            assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    dumps = [sorted(sqlite3.connect(d / "profiler.db").iterdump()) for d in (ref, out)]
    assert dumps[0] == dumps[1]


def test_figures_drawn_in_their_process_are_the_ones_drawn_here(synth: SyntheticRun, tmp_path: Path) -> None:
    """--jobs 2 draws the plots and the model in the figure process, --jobs 1 in this one: the same files."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert command.run(_args([synth.run_dir], ref, "plots", "model", extra=("--jobs", "1", "--quiet"))) == 0
    assert command.run(_args([synth.run_dir], out, "plots", "model", extra=("--jobs", "2", "--quiet"))) == 0
    files = sorted(str(p.relative_to(ref)) for p in ref.rglob("*") if p.is_file())
    assert "plots/ttft_distribution.png" in files and "model/latency_model.json" in files
    assert files == sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    for name in files:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name


def test_figures_start_once_the_batch_and_request_tables_exist(synth: SyntheticRun, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """On a small run the plots and the model start while the other tables are built (the figure process,
    the last to end there, would otherwise wait for them); their outcomes come with the others'. Where
    building the other tables fails, the run is closed only once they have ended."""
    from service_profiler.columnar import run as run_module
    from service_profiler.columnar.figure_process import FigureProcess

    figures = FigureProcess()
    try:
        early = pipeline.EarlyOutputs(["csv", "plots", "model"], tmp_path / "out", figures)
        tables_then: set[str] = set()

        def batches_built(analysis: run_module.AnalysisRun) -> object:
            tables_then.update(n for (n,) in analysis.con.execute("SELECT table_name FROM duckdb_tables()").fetchall())
            return early.start(analysis)

        analysis = run_module.analyze_run([synth.run_dir], batches_built=batches_built)
        try:
            assert {"batch", "request"} <= tables_then and not {"kvcache", "iteration"} & tables_then
            assert sorted(early.futures) == ["model", "plots"]
            outcomes = pipeline.export_all(analysis, ["csv", "plots", "model"], tmp_path / "out", jobs=2,
                                           started=early.futures)
        finally:
            early.wait()
            analysis.close()
        assert [(o.fmt, o.error) for o in outcomes] == [("csv", None), ("plots", None), ("model", None)]
        assert (tmp_path / "out" / "plots" / "ttft_distribution.png").is_file()
        assert (tmp_path / "out" / "model" / "latency_model.json").is_file()

        # the KV cache table fails: the outputs started end before the run's database is closed
        def fail(con: object) -> None:
            raise RuntimeError("kv cache table failed")

        monkeypatch.setattr(run_module, "build_kvcache", fail)
        early = pipeline.EarlyOutputs(["plots", "model"], tmp_path / "failed", figures)
        ended_before_close: list[bool] = []

        def started_then_waited(analysis: run_module.AnalysisRun) -> object:
            waiter = early.start(analysis)

            def wait_then_check() -> None:
                waiter()
                ended_before_close.append(all(f.done() for f in early.futures.values()))
                analysis.con.execute("SELECT 1")  # still open
            return wait_then_check

        with pytest.raises(RuntimeError, match="kv cache table failed"):
            run_module.analyze_run([synth.run_dir], batches_built=started_then_waited)
        assert ended_before_close == [True] and sorted(early.futures) == ["model", "plots"]
        assert all(f.result().error is None for f in early.futures.values())
    finally:
        figures.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("workers", [1, 2])  # spawned; forked by a fork server
def test_a_killed_figure_process_costs_no_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 workers: int) -> None:
    import os
    import signal

    from service_profiler.columnar.figure_process import FigureProcess
    from service_profiler.columnar.plots_draw import Lines, Series, draw_plots

    figures = FigureProcess(workers)
    try:
        pid = figures.submit(os.getpid)()
        assert pid != os.getpid()
        os.kill(pid, signal.SIGKILL)
        plot = Lines([Series([0.0, 1.0], [1.0, 2.0], [1.0, 2.0], [1.0, 2.0])], "x", "y", "t")
        written = figures.submit(draw_plots, [(tmp_path / "p.png", (4.0, 3.0), plot)])()
    finally:
        figures.close()
    assert written == [tmp_path / "p.png"] and (tmp_path / "p.png").read_bytes().startswith(b"\x89PNG")
    assert "the figure process ended" in capsys.readouterr().err


@pytest.mark.parametrize("workers", [1, 2])  # spawned; forked by a fork server
def test_the_figure_process_ends_with_a_killed_analyze(tmp_path: Path, workers: int) -> None:
    """analyze killed outright (SIGKILL: no clean-up runs) leaves no figure process behind, nor a fork
    server."""
    import os
    import signal
    import time

    code = ("import os, sys, time\n"
            "from service_profiler.columnar.figure_process import FigureProcess\n"
            f"f = FigureProcess({workers})\n"
            "print(f.submit(os.getpid)(), os.getppid(), flush=True)\n"
            "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline().split()[0])
        with open(f"/proc/{child}/stat") as fh:
            server = int(fh.read().split(")")[-1].split()[1])  # the worker's parent: analyze, or its fork server
        assert _alive(child) and _alive(server)
    finally:
        parent.kill()
        parent.wait(timeout=30)
    left = [pid for pid in (child, server) if pid != parent.pid]
    deadline = time.monotonic() + 10
    while any(map(_alive, left)) and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        assert not any(map(_alive, left))
    finally:
        for pid in left:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_tables_that_do_not_fit_the_memory_limit_say_what_to_change(synth: SyntheticRun, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    status = command.run(_args([synth.run_dir], tmp_path / "out", "csv", extra=("--memory-limit", "10MB", "--quiet")))
    assert status == command.EXIT_NO_DATA
    err = capsys.readouterr().err
    assert "error: the analysis tables did not fit in --memory-limit 10MB" in err
    assert "larger --memory-limit" in err and "Traceback" not in err


def test_an_output_that_does_not_fit_the_memory_limit_says_what_to_change(synth: SyntheticRun, tmp_path: Path) -> None:
    """An output that ran out of memory (here: the trace, the limit lowered once the tables were built) is
    told as such, with the setting to change, in one line and without DuckDB's advice or a traceback."""
    from service_profiler.columnar.run import analyze_run

    run = analyze_run([synth.run_dir])
    try:
        run.con.execute("SET memory_limit = '8MB'")
        (tmp_path / "out").mkdir()
        outcome = pipeline._run_one(run, "json", {}, tmp_path / "out")
    finally:
        run.close()
    assert outcome.out_of_memory
    message = command.failure_message(outcome, "8MB")
    assert message.startswith("error: json did not fit in --memory-limit 8MB (Out of Memory Error: ")
    assert message.endswith("; run again with a larger --memory-limit, or without json in --format (the other "
                            "outputs were written)")
    assert "\n" not in message and "Traceback" not in message


def test_sigterm_ends_analyze_with_its_status_no_traceback_and_no_work_directory(tmp_path: Path) -> None:
    """SIGTERM while the tables are built (DuckDB queries): exit status 143, no traceback, the work
    directory removed."""
    import signal

    run = generate_run(tmp_path / "run", SyntheticConfig(requests=4000, output_tokens=32, max_num_seqs=64, seed=9))
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "service_profiler.cli", "analyze", "--input-path", str(run.run_dir),
                             "--output-path", str(tmp_path / "out"), "--temp-dir", str(work), "--threads", "1",
                             "--jobs", "1", "--format", "csv", "db", "json"], stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        seen = ""
        while "] read " not in seen:  # the first progress line: the tables are built next
            line = proc.stderr.readline()
            assert line, f"analyze ended before reading: {seen}"
            seen += line
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "Error" not in err, err
    assert list(work.iterdir()) == []


def test_a_work_directory_left_by_a_killed_analyze_is_removed_by_the_next_one(tmp_path: Path,
                                                                              capsys: pytest.CaptureFixture[str]
                                                                              ) -> None:
    """analyze killed outright (SIGKILL: no clean-up runs) leaves its work directory and spill behind; the
    next analyze (or convert) under the same --temp-dir removes it and says so. It leaves alone a work
    directory whose process lives (its lock held), one made by an older version (no lock file), a
    symbolic link, and everything outside the work directories."""
    import fcntl
    import os
    import signal

    from service_profiler.columnar.workdir import LOCK_NAME

    run = generate_run(tmp_path / "run", SyntheticConfig(requests=4000, output_tokens=32, max_num_seqs=64, seed=9))
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "service_profiler.cli", "analyze", "--input-path", str(run.run_dir),
                             "--output-path", str(tmp_path / "killed"), "--temp-dir", str(work), "--threads", "1",
                             "--jobs", "1", "--format", "csv"], stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        seen = ""
        while "] read " not in seen:  # the records are in the work directory
            line = proc.stderr.readline()
            assert line, f"analyze ended before reading: {seen}"
            seen += line
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    left = [p for p in work.iterdir()]
    assert len(left) == 1 and (left[0] / LOCK_NAME).is_file(), left

    alive = work / "sprof-analysis-alive"  # as a live process's: its lock held (here, by this test)
    alive.mkdir()
    held = os.open(alive / LOCK_NAME, os.O_WRONLY | os.O_CREAT, 0o600)
    fcntl.flock(held, fcntl.LOCK_EX)
    older = work / "sprof-analysis-older"  # as an older version's: no lock file
    older.mkdir()
    (older / "spill.tmp").write_bytes(b"x")
    target = tmp_path / "not-a-work-dir"  # a link with a work directory's name: never followed
    target.mkdir()
    (target / LOCK_NAME).write_bytes(b"")
    (target / "keep").write_bytes(b"x")
    (work / "sprof-analysis-link").symlink_to(target, target_is_directory=True)
    (work / "unrelated").mkdir()
    try:
        status = command.run(_args([run.run_dir], tmp_path / "out", "csv", extra=("--temp-dir", str(work))))
        assert status == command.EXIT_OK
        err = capsys.readouterr().err
        assert "removed 1 work directory left by an analyze or convert that ended without cleaning up" in err
        assert str(left[0]) in err
        assert sorted(p.name for p in work.iterdir()) == [
            "sprof-analysis-alive", "sprof-analysis-link", "sprof-analysis-older", "unrelated"]
        assert (alive / LOCK_NAME).is_file() and (older / "spill.tmp").is_file()
        assert sorted(p.name for p in target.iterdir()) == sorted([LOCK_NAME, "keep"])
    finally:
        os.close(held)
    # its process gone (the lock free), the directory goes at the next start: here, convert's
    done = subprocess.run([sys.executable, "-m", "service_profiler.cli", "convert", "--input-path", str(run.run_dir),
                           "--temp-dir", str(work)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert str(alive) in done.stderr and not alive.exists()
    assert sorted(p.name for p in work.iterdir()) == ["sprof-analysis-link", "sprof-analysis-older", "unrelated"]


def test_a_temp_dir_that_cannot_hold_a_work_directory_is_named_with_the_fix(synth: SyntheticRun, tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]
                                                                            ) -> None:
    missing = tmp_path / "no-such-dir"
    status = command.run(_args([synth.run_dir], tmp_path / "out", "csv", extra=("--temp-dir", str(missing))))
    assert status == command.EXIT_NO_DATA
    err = capsys.readouterr().err
    assert f"error: cannot make a work directory in {missing} (No such file or directory)" in err
    assert "give --temp-dir an existing directory you can write to" in err and "Traceback" not in err
    done = subprocess.run([sys.executable, "-m", "service_profiler.cli", "convert", "--input-path", str(synth.run_dir),
                           "--temp-dir", str(missing)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert f"convert: cannot make a work directory in {missing}" in done.stderr
