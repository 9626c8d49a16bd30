"""What `pip install` delivers: under CI the tests run against the built wheel, and it must carry the
engine knowledge (handlers/, config/), the start-up hook and the C fast path."""

from __future__ import annotations

import os
import sysconfig
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
    shipped = files("service_profiler.engines.vllm")
    for name in ("default_config.json", "engines.json", "vllm_v1.yaml", "vllm_ascend.yaml"):
        assert shipped.joinpath(name).is_file(), name
    import service_profiler.engines.vllm.vllm_extract
    import service_profiler.engines.vllm.vllm_v1  # noqa: F401


def test_editable_install_carries_the_startup_line(tmp_path: Path) -> None:
    """`pip install -e .` must profile plain Python processes too: its editable wheel carries the
    same `.pth` line as the regular wheel (pip installs that wheel's files into site-packages)."""
    import shutil
    import subprocess
    import sys
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
