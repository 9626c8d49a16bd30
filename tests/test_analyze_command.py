from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from synthetic import SyntheticConfig, SyntheticRun, generate_run

from service_profiler.analyze import command, steps

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> SyntheticRun:
    return generate_run(tmp_path_factory.mktemp("cmd") / "run", SyntheticConfig(requests=30, output_tokens=8, seed=4))


def _db_mode(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """How profiler.db gets written: "late" (a process forked after the read: small runs, the default
    here), "stream" (forked before the read, streaming the raw files: large runs), "no_fork"."""
    from service_profiler.analyze import db_process

    if mode == "stream":
        monkeypatch.setattr(db_process, "STREAM_ABOVE_BYTES", -1)
    elif mode == "no_fork":
        monkeypatch.setenv("SERVICE_PROFILER_NO_FORK", "1")


def _args(inputs: list[Path], out: Path, *formats: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    argv = ["--input-path", *map(str, inputs), "--output-path", str(out)]
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
    assert not (out / "chrome_tracing.json").exists()
    captured = capsys.readouterr()
    assert "requests   30 (30 finished)" in captured.out
    assert "request.csv" in captured.out and "profiler.db" in captured.out
    assert "[analyze" in captured.err and "read 2 process file(s)" in captured.err
    assert "problem" not in captured.err


def test_missing_optional_exporters_are_skipped_with_a_note(synth: SyntheticRun, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(command, "_optional", lambda name: None)
    assert command.run(_args([synth.run_dir], tmp_path / "out", "json", "plots", "model")) == command.EXIT_OK
    text = capsys.readouterr().out
    assert "chrome trace skipped" in text and "plots skipped" in text and "latency model skipped" in text


def test_optional_import_distinguishes_absent_from_broken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert command._optional("service_profiler.analyze.no_such_module") is None
    # a module that is there but whose own import fails is a real error, not "not installed yet"
    (tmp_path / "sp_exporter_with_missing_dep.py").write_text("import sp_dependency_nobody_has\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="sp_dependency_nobody_has"):
        command._optional("sp_exporter_with_missing_dep")


def test_failing_exporter_does_not_cost_the_others(synth: SyntheticRun, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    def boom(*_: object) -> None:
        raise RuntimeError("exporter bug")

    fake = {"service_profiler.analyze.chrome": SimpleNamespace(write_chrome_trace=boom)}
    monkeypatch.setattr(command, "_optional", lambda name: fake.get(name))
    out = tmp_path / "out"
    assert command.run(_args([synth.run_dir], out, "json", "csv")) == command.EXIT_EXPORT_FAILED
    assert (out / "batch.csv").exists()
    assert "error: chrome trace: RuntimeError: exporter bug" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["forked", "in-process", "one-helper"])
def test_model_and_plots_get_numeric_columns(synth: SyntheticRun, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    # plots + model run in a forked child where the platform allows: what they saw comes back in files.
    # "one-helper": a long run's (more batches than SIDE_BY_SIDE_PLOTS_MAX_BATCHES) are run one after
    # another by the helper itself rather than in processes of their own: the same steps, same inputs
    if mode == "in-process":
        monkeypatch.setenv("SERVICE_PROFILER_NO_FORK", "1")
    elif mode == "one-helper":
        monkeypatch.setattr(command, "SIDE_BY_SIDE_PLOTS_MAX_BATCHES", 0)
    pids_dir = tmp_path / "pids"
    pids_dir.mkdir()
    seen_dir = tmp_path / "seen"
    seen_dir.mkdir()

    def plots(batch_cols: dict, request_cols: dict, out_dir: Path, names: tuple[str, ...]) -> list[Path]:
        # drawn in two parts (two processes): each part gets the columns and its share of the names
        (seen_dir / f"plots-{names[0]}.json").write_text(json.dumps([sorted(batch_cols), sorted(request_cols)]))
        (pids_dir / str(os.getpid())).touch()
        paths = [out_dir / name for name in names]
        for path in paths:
            path.write_bytes(b"png")
        return paths

    def fit(size: object, tokens: object, ms: object, out_dir: Path) -> None:
        (seen_dir / "model.json").write_text(json.dumps([len(size), len(tokens), len(ms)]))  # type: ignore[arg-type]
        (out_dir / "latency_model.json").write_text("{}")
        (pids_dir / str(os.getpid())).touch()

    fake = {"service_profiler.analyze.plots": SimpleNamespace(write_plots=plots, PLOT_NAMES=tuple("abcdefghi"),
                                                              BATCH_COLUMNS=("schedule_ms", "batch_type"),
                                                              REQUEST_COLUMNS=("ttft_ms", "tpot_ms")),
            "service_profiler.model.latency": SimpleNamespace(fit_and_save=fit)}
    monkeypatch.setattr(command, "_optional", lambda name: fake.get(name))
    assert command.run(_args([synth.run_dir], tmp_path / "out", "plots", "model")) == command.EXIT_OK
    for first in ("a", "f"):  # both parts saw the columns
        batch_cols, request_cols = json.loads((seen_dir / f"plots-{first}.json").read_text())
        # the columns the plots declare and the model's, when numeric (batch_type is text): no others
        assert set(batch_cols) == {"schedule_ms", "batch_size", "model_run_ms", "total_scheduled_tokens"}
        assert set(request_cols) == {"ttft_ms", "tpot_ms"}
    assert json.loads((seen_dir / "model.json").read_text()) == [len(synth.batches)] * 3
    assert sorted(p.name for p in (tmp_path / "out" / "plots").iterdir()) == list("abcdefghi")
    processes = {p.name for p in pids_dir.iterdir()}
    if mode == "in-process":
        assert processes == {str(os.getpid())}
    else:  # the helper alone, or the helper and two processes it forked
        assert str(os.getpid()) not in processes and len(processes) == (1 if mode == "one-helper" else 3)


@pytest.mark.skipif(steps.fork_context() is None, reason="exporters run in-process without fork")
def test_exporter_process_dying_is_reported(synth: SyntheticRun, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    def plots(batch_cols: dict, request_cols: dict, out_dir: Path, names: object) -> list[Path]:
        os._exit(3)  # a crash in the forked exporter process (segfault, OOM kill)

    fake = {"service_profiler.analyze.plots": SimpleNamespace(write_plots=plots, PLOT_NAMES=tuple("abcdefghi"),
                                                              BATCH_COLUMNS=(), REQUEST_COLUMNS=())}
    monkeypatch.setattr(command, "_optional", lambda name: fake.get(name))
    out = tmp_path / "out"
    assert command.run(_args([synth.run_dir], out, "plots", "csv")) == command.EXIT_EXPORT_FAILED
    assert (out / "batch.csv").exists()
    assert "error: plots: the exporter process died (exit code 3)" in capsys.readouterr().err


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
    assert "torn last line" in problems and str(engine) in problems
    assert "1 problem(s) in the raw data" in capsys.readouterr().err


def test_no_data_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert command.run(_args([tmp_path / "missing"], tmp_path / "out", "csv")) == command.EXIT_NO_DATA
    assert "no readable raw files" in capsys.readouterr().err


def _cli() -> list[str]:
    exe = Path(sys.executable).parent / "service-profiler"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "service_profiler.cli"]


def test_cli_subprocess_all_formats(synth: SyntheticRun, tmp_path: Path) -> None:
    """The real command line in a real process, every output format."""
    out = tmp_path / "out"
    proc = subprocess.run([*_cli(), "analyze", "--input-path", str(synth.run_dir), "--output-path", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "TTFT" in proc.stdout and "wrote" in proc.stdout
    for name in ("request.csv", "batch.csv", "kvcache.csv", "profiler.db", "per_iteration_requests.csv"):
        assert (out / name).stat().st_size > 0, name
    with (out / "request.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 30
    con = sqlite3.connect(out / "profiler.db")
    assert con.execute("SELECT count(*) FROM request").fetchone()[0] == 30


def test_module_entry_point_subprocess(synth: SyntheticRun, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "service_profiler.analyze.command", "--input-path",
                           str(synth.run_dir), "--output-path", str(tmp_path / "o"), "--format", "csv", "--quiet"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and "[analyze" not in proc.stderr
    assert (tmp_path / "o" / "service_summary.csv").exists()


@pytest.mark.parametrize("variant", ["jobs2", "no_fork", "stream", "stream_parts"])
def test_jobs_and_no_fork_write_the_same_files(synth: SyntheticRun, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch, variant: str) -> None:
    # --jobs 2 (forked chrome child), SERVICE_PROFILER_NO_FORK (all in-process) and the database
    # process streaming the raw files (large runs) change where the work runs, never what is written;
    # nor does handing it the analysis tables in parts of a few rows (a part at a time, also into the
    # CSVs it writes) rather than in one part each
    formats = ("csv", "json", "db")
    ref = tmp_path / "ref"
    assert command.run(_args([synth.run_dir], ref, *formats)) == command.EXIT_OK
    out = tmp_path / "out"
    args = _args([synth.run_dir], out, *formats)
    if variant == "jobs2":
        args.jobs = 2
    elif variant == "stream_parts":
        from service_profiler.analyze import sqlite_export

        _db_mode(monkeypatch, "stream")
        monkeypatch.setattr(sqlite_export, "TABLE_PART_ROWS", 7)
    else:
        _db_mode(monkeypatch, variant)
    assert command.run(args) == command.EXIT_OK
    files = sorted(p.name for p in ref.iterdir() if p.is_file() and p.name != "profiler.db")
    assert files == sorted(p.name for p in out.iterdir() if p.is_file() and p.name != "profiler.db")
    for name in files:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    dumps = [list(sqlite3.connect(d / "profiler.db").iterdump()) for d in (ref, out)]
    assert dumps[0] == dumps[1]


@pytest.mark.parametrize("mode", ["late", "stream", "no_fork"])
def test_raw_tables_failing_costs_only_the_database(synth: SyntheticRun, tmp_path: Path, mode: str,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # the raw tables are written by a process of their own (or in-process without fork): its failure
    # is named and costs profiler.db alone
    from service_profiler.analyze import sqlite_export

    def broken(paths: object, path: Path) -> Path:
        raise OSError("disk full")

    monkeypatch.setattr(sqlite_export, "write_raw_db", broken)
    monkeypatch.setattr(sqlite_export, "write_raw_db_from", broken)
    _db_mode(monkeypatch, mode)
    out = tmp_path / "out"
    args = _args([synth.run_dir], out, "csv", "json", "db")
    assert command.run(args) == command.EXIT_EXPORT_FAILED
    err = capsys.readouterr().err
    assert "error: SQLite raw tables: OSError: disk full" in err
    assert "error: SQLite: RuntimeError: the raw tables (span, event, ...) were not written" in err
    assert (out / "per_iteration_requests.csv").exists() and (out / "chrome_tracing.json").exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("profiler")) == []


@pytest.mark.parametrize("mode", ["late", "stream"])
def test_a_crash_mid_analysis_leaves_no_raw_tables_nor_their_process(
        synth: SyntheticRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    import multiprocessing

    from service_profiler.analyze import tables

    def broken(*args: object) -> object:
        raise MemoryError("out of memory while building the tables")

    monkeypatch.setattr(tables, "build_tables", broken)
    _db_mode(monkeypatch, mode)
    out = tmp_path / "out"
    with pytest.raises(MemoryError):
        command.run(_args([synth.run_dir], out, "csv", "db"))
    assert not (out / "profiler.db.raw.tmp").exists() and not (out / "profiler.db").exists()
    assert multiprocessing.active_children() == []

    # the same once the batch and request tables are built, and (streaming) already being spooled
    monkeypatch.undo()
    monkeypatch.setattr(tables, "build_kvcache_table", broken)
    _db_mode(monkeypatch, mode)
    with pytest.raises(MemoryError):
        command.run(_args([synth.run_dir], out, "csv", "db"))
    assert sorted(p.name for p in out.iterdir() if "profiler.db" in p.name) == []
    assert multiprocessing.active_children() == []


def test_csvs_failing_in_the_database_process_are_written_here(
        synth: SyntheticRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Streaming (large runs), per_iteration_requests.csv (from the entries it inserts), batch.csv and the CSVs of
    # one table each are written by the database process; when one of its writers fails, analyze writes
    # that file itself: same bytes, the database and the other files unaffected
    from service_profiler.analyze import csv_export, db_process

    class FailingWriter(csv_export.PerIterationWriter):
        def write_chunk(self, chunk: object) -> None:
            raise OSError("disk full")

    class FailingBatchCsv(csv_export.BatchCsvWriter):
        def write_chunk(self, message: object) -> None:
            raise OSError("disk full")

    def failing_events(labels: list[str], columns: list[str]) -> csv_export.CsvFormat:
        fmt = csv_export.timed_format(labels, columns)

        def rows(part: list[tuple[object, ...]]) -> list[object]:
            raise OSError("disk full")

        return fmt._replace(columns=rows)

    ref = tmp_path / "ref"
    assert command.run(_args([synth.run_dir], ref, "csv", "db")) == command.EXIT_OK
    monkeypatch.setattr(db_process, "PerIterationWriter", FailingWriter)
    monkeypatch.setattr(db_process, "BatchCsvWriter", FailingBatchCsv)
    failing = {**csv_export.TABLE_CSVS, "events.csv": ("lifecycle_event", failing_events)}
    monkeypatch.setattr(db_process, "TABLE_CSVS", failing)
    _db_mode(monkeypatch, "stream")
    out = tmp_path / "out"
    assert command.run(_args([synth.run_dir], out, "csv", "db")) == command.EXIT_OK
    for name in ("per_iteration_requests.csv", "batch.csv", "events.csv", "request.csv"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    dumps = [list(sqlite3.connect(d / "profiler.db").iterdump()) for d in (ref, out)]
    assert dumps[0] == dumps[1]
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == []


@pytest.mark.skipif(steps.fork_context() is None, reason="the database is written in-process without fork")
@pytest.mark.parametrize("mode", ["late", "stream"])
def test_database_process_dying_costs_only_the_database(synth: SyntheticRun, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str], mode: str) -> None:
    from service_profiler.analyze import sqlite_export

    def killed(self: object, messages: object, on_entry_chunk: object = None) -> None:
        os._exit(9)  # the OOM killer, mid-insert

    ref = tmp_path / "ref"
    assert command.run(_args([synth.run_dir], ref, "csv", "db")) == command.EXIT_OK
    monkeypatch.setattr(sqlite_export.SqliteExport, "apply", killed)
    _db_mode(monkeypatch, mode)
    out = tmp_path / "out"
    assert command.run(_args([synth.run_dir], out, "csv", "db")) == command.EXIT_EXPORT_FAILED
    assert "error: SQLite: the exporter process died (exit code 9)" in capsys.readouterr().err
    _assert_only_the_database_lost(ref, out)


@pytest.mark.skipif(steps.fork_context() is None, reason="the database is written in-process without fork")
def test_database_process_dying_before_the_spool_costs_only_the_database(
        synth: SyntheticRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # streaming: the process dies while it writes the raw tables, before analyze hands it the spool;
    # analyze finds it gone when it tells it to read the spool, and goes on
    from service_profiler.analyze import db_process

    def killed(self: object, run: object = None) -> str:
        os._exit(9)

    ref = tmp_path / "ref"
    assert command.run(_args([synth.run_dir], ref, "csv", "db")) == command.EXIT_OK
    monkeypatch.setattr(db_process.DatabaseProcess, "_write_raw", killed)
    _db_mode(monkeypatch, "stream")
    out = tmp_path / "out"
    assert command.run(_args([synth.run_dir], out, "csv", "db")) == command.EXIT_EXPORT_FAILED
    err = capsys.readouterr().err
    assert "error: SQLite raw tables: the exporter process died (exit code 9)" in err
    assert "error: SQLite: the exporter process died (exit code 9)" in err
    _assert_only_the_database_lost(ref, out)


def _assert_only_the_database_lost(ref: Path, out: Path) -> None:
    assert not (out / "profiler.db").exists()
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".")) == []
    for name in ("per_iteration_requests.csv", "kvcache.csv", "events.csv", "state_transitions.csv",
                 "request.csv", "batch.csv"):  # the first four written here instead
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name


def test_spooling_failing_early_costs_only_the_database(synth: SyntheticRun, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    # Streaming, the spool is started while the tables are still being built (start_hand_over): a
    # failure there is the SQLite step's, reported when it comes; the tables, trace and CSVs go on
    import multiprocessing

    from service_profiler.analyze import db_process

    def full(fh: object, message: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(db_process, "write_spool_message", full)
    _db_mode(monkeypatch, "stream")
    out = tmp_path / "out"
    assert command.run(_args([synth.run_dir], out, "csv", "json", "db")) == command.EXIT_EXPORT_FAILED
    assert "error: SQLite: OSError: disk full" in capsys.readouterr().err
    assert (out / "chrome_tracing.json").exists() and (out / "batch.csv").exists()
    assert (out / "per_iteration_requests.csv").exists() and (out / "request.csv").exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("profiler")) == []
    assert multiprocessing.active_children() == []
