"""The runtime lives inside engine processes: activating it, patching, recording and flushing must
import no heavy package (the analysis side's numpy/pandas/scipy/matplotlib, orjson, the engine itself)."""

from __future__ import annotations

import json

from runtime_harness import Workspace

HEAVY = ("numpy", "scipy", "matplotlib", "pandas", "orjson", "torch", "vllm")


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
    assert "yaml" in modules and "service_profiler.runtime.core" in modules
    run = next(iter(workspace.runs().values()))
    assert [record[4] for record in run.spans("schedule")] == [{"n": 3}]
