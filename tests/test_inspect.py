from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
from runtime_harness import Workspace
from synthetic import SyntheticConfig, SyntheticRun, generate_run

from service_profiler.rawdata import inspect_run
from service_profiler.rawdata.rawfile import read_run


@pytest.fixture
def synth(tmp_path: Path) -> SyntheticRun:
    return generate_run(tmp_path / "run", SyntheticConfig(requests=10, output_tokens=4, seed=6))


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    inspect_run.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_describe_counts_and_patch_reports(synth: SyntheticRun) -> None:
    info = inspect_run.describe_run(read_run([synth.run_dir]))
    assert [p["role"] for p in info["processes"]] == ["api_server", "engine_core"]
    assert info["total_records"] == synth.num_records
    assert sum(p["records"] for p in info["processes"]) == synth.num_records
    counts = {(r["kind"], r["domain"], r["name"]): r["count"] for r in info["records"]}
    assert counts[("event", "Request", "httpReq")] == 10
    assert counts[("span", "BatchSchedule", "batchFrameworkProcessing")] == len(synth.batches)
    engine = info["processes"][1]
    assert engine["patch"]["applied"] == ["vllm.v1.core.sched.scheduler:Scheduler.schedule"]
    assert engine["patch"]["skipped"][0]["reason"] == "module not imported"
    assert engine["dp_rank"] == 0 and engine["duration_s"] > 0
    assert info["problems"] == [] and info["dropped"] == 0


def test_text_report_shows_drops_warnings_and_problems(synth: SyntheticRun, capsys: pytest.CaptureFixture[str]) -> None:
    engine = next(p for p in synth.files if "-4200." in p.name)
    with engine.open("a") as fh:
        fh.write('{"t":"dropped","count":42,"ts":1}\n')
        fh.write('{"t":"warn","msg":"expression len(x) failed: TypeError","count":3}\n')
        fh.write('{"t":"patch","applied":[],"skipped":[],"failed":[{"symbol":"a.b:C.d","reason":"no attribute d"}]}\n')
        fh.write('{"t":"state","enabled":false,"ts":5,"reason":"timelimit"}\n')
        fh.write('{"t":"meta","key":"vllm_handler_failures","value":{"schedule":2}}\n')
        fh.write('{"t":"rec","r":[[1,')
    assert inspect_run.run(_args(str(synth.run_dir))) == inspect_run.EXIT_OK
    text = capsys.readouterr().out
    assert "DROPPED: 42 records" in text
    assert "expression len(x) failed: TypeError (x3)" in text
    assert "failed   a.b:C.d: no attribute d" in text
    assert "off (timelimit)" in text
    assert "vllm_handler_failures: {'schedule': 2}" in text
    assert "torn last line" in text
    assert "batchFrameworkProcessing" in text


def test_warnings_show_each_message_once_with_its_last_count(synth: SyntheticRun) -> None:
    engine = next(p for p in synth.files if "-4200." in p.name)
    with engine.open("a") as fh:  # first report, a running total, the total written at exit
        fh.write('{"t":"warn","msg":"attr \'n\' failed (IndexError)","count":1}\n')
        fh.write('{"t":"warn","msg":"other problem","count":1}\n')
        fh.write('{"t":"warn","msg":"attr \'n\' failed (IndexError)","count":40}\n')
        fh.write('{"t":"warn","msg":"attr \'n\' failed (IndexError)","count":57}\n')
    info = inspect_run.describe_run(read_run(synth.run_dir))
    warnings = next(p["warnings"] for p in info["processes"] if p["pid"] == 4200)
    assert warnings == ["attr 'n' failed (IndexError) (x57)", "other problem"]
    assert next(p.warnings for p in read_run(synth.run_dir).processes if p.pid == 4200)[-2:] == warnings


def test_json_output_and_no_data(synth: SyntheticRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert inspect_run.run(_args(str(synth.run_dir), "--json")) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["total_records"] == synth.num_records
    assert inspect_run.run(_args(str(tmp_path / "nothing"))) == inspect_run.EXIT_NO_DATA


def test_cli_subprocess(synth: SyntheticRun) -> None:
    exe = Path(sys.executable).parent / "service-profiler"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "service_profiler.cli"]
    proc = subprocess.run([*cmd, "inspect", str(synth.run_dir)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert "processes (2)" in proc.stdout and "synth-host:4200" in proc.stdout


def test_targets_awaiting_import_are_shown(workspace: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    # Raw files written by the real runtime: one target imported and called, one whose module never is.
    workspace.write_config()
    workspace.write_symbols("""
    - symbol: toymod:Engine.schedule
    - symbol: never_imported_mod:Thing.run
    """)
    workspace.run_python("import toymod\ntoymod.Engine().schedule(1)\n")
    info = inspect_run.describe_run(read_run(workspace.prof_dir))
    [process] = info["processes"]
    assert process["patch"]["applied"] == ["toymod:Engine.schedule"]
    assert process["patch"]["pending"] == ["never_imported_mod:Thing.run"]

    assert inspect_run.run(_args(str(workspace.prof_dir))) == inspect_run.EXIT_OK
    text = capsys.readouterr().out
    assert "applied 1, awaiting import 1, skipped 0, failed 0" in text
    assert "    pending  never_imported_mod:Thing.run: awaiting import of its module" in text
    assert inspect_run.run(_args(str(workspace.prof_dir), "--json")) == inspect_run.EXIT_OK
    as_json = json.loads(capsys.readouterr().out)
    assert as_json["processes"][0]["patch"]["pending"] == ["never_imported_mod:Thing.run"]
