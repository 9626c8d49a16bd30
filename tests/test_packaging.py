"""What `pip install` delivers: under CI the tests run against the built wheel, and it must carry the
engine knowledge (service_profiler/engines/: handlers and symbol YAMLs), the runtime's default config,
the start-up hook pointing at the runtime's bootstrap, the vLLM plugin entry point and the runtime's C probe
switch; and no C code on the offline side (the analysis runs on DuckDB), nor the previous analysis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from importlib.metadata import entry_points
from importlib.resources import files
from pathlib import Path

import pytest

import service_profiler

IN_CI = os.environ.get("CI") == "true"


@pytest.mark.skipif(not IN_CI, reason="the source tree is installed in editable mode outside CI")
def test_tests_import_the_installed_wheel() -> None:
    purelib = Path(sysconfig.get_paths()["purelib"]).resolve()
    assert Path(service_profiler.__file__).resolve().parent == purelib / "service_profiler"
    assert (purelib / "service_profiler.pth").read_text().startswith("import os;")


def test_wheel_carries_config_and_handlers() -> None:
    from service_profiler.runtime import shipped

    assert shipped.DEFAULT_CONFIG_PATH.is_file()
    assert files("service_profiler.engines").joinpath("engines.json").is_file()
    manifest = json.loads((shipped.engines_dir() / "engines.json").read_text(encoding="utf-8"))
    yamls = [entry["symbols"] for entry in manifest]
    assert "vllm/vllm_v1.yaml" in yamls and "vllm/vllm_ascend.yaml" in yamls
    for name in yamls:
        assert files("service_profiler.engines").joinpath(name).is_file(), name
    import service_profiler.engines.vllm.vllm_extract
    import service_profiler.engines.vllm.vllm_v1  # noqa: F401


def test_only_the_runtime_carries_c_code_and_the_previous_analysis_is_gone() -> None:
    import importlib.util

    root = Path(service_profiler.__file__).resolve().parent
    native = {p.relative_to(root).as_posix().split(".")[0] for p in root.rglob("*")
              if p.suffix in (".c", ".so", ".pyd") and "__pycache__" not in p.parts}
    assert native <= {"runtime/_speedups"}, native
    for module in ("service_profiler.analyze", "service_profiler.rawdata.fastjson",
                   "service_profiler.rawdata._records"):
        assert importlib.util.find_spec(module) is None, module
    assert not (root / "analyze").exists()


def test_vllm_plugin_entry_point_is_the_runtime_bootstrap() -> None:
    from service_profiler.runtime import bootstrap

    plugins = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "service_profiler"]
    assert len(plugins) == 1 and plugins[0].value == "service_profiler.runtime.bootstrap:vllm_plugin"
    assert plugins[0].load() is bootstrap.vllm_plugin


def test_startup_line_runs_the_runtime_bootstrap() -> None:
    # The installed .pth line runs at interpreter start-up: with the config variable set it loads the
    # runtime's bootstrap (kept inactive here by SERVICE_PROF_DISABLE); without it, nothing.
    pth = next(Path(p) / "service_profiler.pth" for p in sys.path if (Path(p) / "service_profiler.pth").is_file())
    assert "'service_profiler.runtime.bootstrap'" in pth.read_text(encoding="utf-8")
    code = "import sys; print('service_profiler.runtime.bootstrap' in sys.modules)"
    seen = []
    for extra in ({"SERVICE_PROF_CONFIG_PATH": "/nonexistent.json"}, {}):
        env = {"PATH": "/usr/bin:/bin", "SERVICE_PROF_DISABLE": "1", **extra}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
        assert proc.returncode == 0, proc.stderr
        seen.append(proc.stdout.strip())
    assert seen == ["True", "False"]


def test_editable_install_carries_the_startup_line(tmp_path: Path) -> None:
    """`pip install -e .` must profile plain Python processes too: its editable wheel carries the
    same `.pth` line as the regular wheel (pip installs that wheel's files into site-packages)."""
    import shutil
    import zipfile

    repo = Path(__file__).resolve().parents[1]
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(repo / name, source / name)
    for name in ("service_profiler",):
        shutil.copytree(repo / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    out = tmp_path / "wheel"
    out.mkdir()
    build = (
        "import sys, setuptools.build_meta as b; "
        "print(b.build_editable(sys.argv[1]))"
    )
    result = subprocess.run([sys.executable, "-c", build, str(out)], cwd=source, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    wheel = out / result.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as archive:
        line = archive.read("service_profiler.pth").decode("utf-8")
    assert line.startswith("import os; ")
    assert "os.environ.get('SERVICE_PROF_CONFIG_PATH')" in line
    assert line.rstrip().endswith("bootstrap.activate_from_startup()")
