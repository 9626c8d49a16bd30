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
    shipped = files("service_profiler.shipped_config")
    for name in ("default_config.json", "engines.json", "vllm_v1.yaml", "vllm_ascend.yaml"):
        assert shipped.joinpath(name).is_file(), name
    import service_profiler.handlers.vllm_extract
    import service_profiler.handlers.vllm_v1  # noqa: F401
