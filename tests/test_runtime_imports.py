"""The runtime lives inside engine processes: activating it, patching, recording and flushing must
import no heavy package (the analysis side's numpy/pandas/scipy/matplotlib/duckdb, orjson, the engine
itself), and no module of the offline side. Every module of `service_profiler/runtime/` is held to it."""

from __future__ import annotations

import json
import subprocess
import sys

from runtime_harness import Workspace

HEAVY = ("numpy", "scipy", "matplotlib", "pandas", "duckdb", "polars", "pyarrow", "orjson", "torch", "vllm")
# The engine side: the runtime package, and the handler API `record` that it serves.
ENGINE_SIDE = ("service_profiler", "service_profiler.record", "service_profiler.runtime")


def _offline(modules: list[str]) -> list[str]:
    return sorted(name for name in modules if name.startswith("service_profiler")
                  and name not in ENGINE_SIDE and not name.startswith("service_profiler.runtime."))


def test_an_active_runtime_imports_no_heavy_package(workspace: Workspace) -> None:
    workspace.write_config(flush_interval_s=0.1)
    workspace.write_symbols("""
    - symbol: toymod:Engine.schedule
      attributes:
        - {name: n, expr: n}
    """)
    proc = workspace.run_python("""
    import json, sys, time, toymod
    from service_profiler.runtime import bootstrap
    rt = bootstrap.current_runtime()
    assert rt is not None and rt.enabled
    print(toymod.Engine().schedule(3))
    deadline = time.monotonic() + 30
    while not (rt.recorder.path.exists() and '"t":"rec"' in rt.recorder.path.read_text()):
        assert time.monotonic() < deadline, "the writer never flushed"
        time.sleep(0.01)
    print(json.dumps(sorted(sys.modules)))
    """)
    result, modules_json = proc.stdout.splitlines()
    assert result == "3"
    modules = json.loads(modules_json)
    loaded = sorted({name.split(".")[0] for name in modules} & set(HEAVY))
    assert loaded == [], loaded
    assert _offline(modules) == []
    assert "yaml" in modules and "service_profiler.runtime.core" in modules
    run = next(iter(workspace.runs().values()))
    assert [record[4] for record in run.spans("schedule")] == [{"n": 3}]


def test_every_engine_side_module_imports_nothing_heavy_nor_offline() -> None:
    # A fresh interpreter with the profiler off (the .pth line does nothing): import every module of the
    # package, the start-up shim and the front doors' tap included, and look at what came with them.
    code = """
import importlib, json, pkgutil, sys
import service_profiler.runtime as package
names = [info.name for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
for name in names:
    importlib.import_module(name)
print(json.dumps({"imported": names, "modules": sorted(sys.modules)}))
"""
    env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    assert {"service_profiler.runtime.core", "service_profiler.runtime.bootstrap",
            "service_profiler.runtime.frontdoors.tap", "service_profiler.runtime.recorder"} <= set(report["imported"])
    modules = report["modules"]
    assert sorted({name.split(".")[0] for name in modules} & set(HEAVY)) == []
    assert _offline(modules) == []
