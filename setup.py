"""Build glue that pyproject.toml cannot express: install `service_profiler.pth` into site-packages.

The .pth line runs at every interpreter start-up and costs three dictionary lookups when
SERVICE_PROF_CONFIG_PATH and the front doors' switches are unset (see service_profiler/bootstrap.py).

It also declares the optional C extension `service_profiler._speedups` (ProbeSwitch, see
service_profiler/speedups.py). `optional=True`: without a working compiler the build only warns and
the package falls back to pure Python. For a development checkout, build it in place with
`python setup.py build_ext --inplace`.
"""

from __future__ import annotations

import os

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

PTH_NAME = "service_profiler.pth"
PTH_LINE = (
    "import os; (os.environ.get('SERVICE_PROF_CONFIG_PATH') or os.environ.get('VLLM_SCHEDULER_LOGGING') or "
    "os.environ.get('VLLM_ENABLE_SCHEDULER_PROFILING')) and "
    "__import__('service_profiler.bootstrap').bootstrap.activate_from_startup()\n"
)


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        with open(os.path.join(self.build_lib, PTH_NAME), "w", encoding="utf-8") as handle:
            handle.write(PTH_LINE)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:  # type: ignore[override]
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH_NAME)]


SPEEDUPS = Extension(
    "service_profiler._speedups",
    ["service_profiler/_speedups.c"],
    optional=True,  # no compiler: install anyway, speedups.HAVE_SPEEDUPS is False
)

# The raw reader's per-record loop (service_profiler/rawentries.py); optional likewise: without it the
# reader runs its pure-Python loop, ~3x slower per record.
RECORDS = Extension(
    "service_profiler._records",
    ["service_profiler/_records.c"],
    optional=True,
)


setup(cmdclass={"build_py": BuildPyWithPth}, ext_modules=[SPEEDUPS, RECORDS])
