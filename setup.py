"""Build glue that pyproject.toml cannot express: install `service_profiler.pth` into site-packages.

The .pth line runs at every interpreter start-up and costs three dictionary lookups when
SERVICE_PROF_CONFIG_PATH and the front doors' switches are unset (see service_profiler/runtime/bootstrap.py).

It also declares the optional C extension `service_profiler.runtime._speedups` (ProbeSwitch, see
service_profiler/runtime/speedups.py). `optional=True`: without a working compiler the build only warns and
the package falls back to pure Python. For a development checkout, build it in place with
`python setup.py build_ext --inplace`.
"""

from __future__ import annotations

import os
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH_NAME = "service_profiler.pth"
PTH_LINE = (
    "import os; (os.environ.get('SERVICE_PROF_CONFIG_PATH') or os.environ.get('VLLM_SCHEDULER_LOGGING') or "
    "os.environ.get('VLLM_ENABLE_SCHEDULER_PROFILING')) and "
    "__import__('service_profiler.runtime.bootstrap').runtime.bootstrap.activate_from_startup()\n"
)


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        with open(os.path.join(self.build_lib, PTH_NAME), "w", encoding="utf-8") as handle:
            handle.write(PTH_LINE)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:  # type: ignore[override]
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH_NAME)]


class _StrategyWithPth:
    """Wraps setuptools' editable strategy so the editable wheel carries the start-up line too."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, wheel: Any, files: list[str], mapping: dict[str, str]) -> None:
        self.inner(wheel, files, mapping)
        wheel.writestr(PTH_NAME, PTH_LINE.encode("utf-8"))

    def __enter__(self) -> _StrategyWithPth:
        self.inner.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.inner.__exit__(*exc_info)


class EditableWheelWithPth(editable_wheel):
    """`pip install -e .` builds an editable wheel without running build_py's output step, so the
    `.pth` line would be missing and plain Python processes would not be profiled. setuptools has no
    public hook for extra files in an editable wheel; `_select_strategy` is the narrowest one (present
    since setuptools 64). Should it ever disappear, the test of the editable wheel fails loudly."""

    def _select_strategy(self, name: str, tag: str, build_lib: Any) -> Any:
        return _StrategyWithPth(super()._select_strategy(name, tag, build_lib))


SPEEDUPS = Extension(
    "service_profiler.runtime._speedups",
    ["service_profiler/runtime/_speedups.c"],
    optional=True,  # no compiler: install anyway, speedups.HAVE_SPEEDUPS is False
)


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth}, ext_modules=[SPEEDUPS])
