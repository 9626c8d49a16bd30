"""Symbol YAMLs written for earlier releases name handlers `service_profiler.handlers.<module>:<function>`.
Those names keep working and give the very objects of `service_profiler.engines.vllm` (an alias, not a
second copy: handler modules hold per-process state)."""

from __future__ import annotations

import importlib
import pkgutil

from runtime_harness import Workspace

import service_profiler.engines.vllm as vllm_package


def test_every_old_handler_module_is_the_new_module_object() -> None:
    names = [info.name for info in pkgutil.iter_modules(vllm_package.__path__)]
    assert {"vllm_v1", "vllm_extract", "vllm_http", "lifecycle", "console"} <= set(names)
    for name in names:
        old = importlib.import_module(f"service_profiler.handlers.{name}")
        assert old is importlib.import_module(f"service_profiler.engines.vllm.{name}"), name
    old_v1 = importlib.import_module("service_profiler.handlers.vllm_v1")
    from service_profiler.engines.vllm import vllm_v1

    assert old_v1.schedule_handler is vllm_v1.schedule_handler
    assert old_v1.STATE is vllm_v1.STATE


def test_a_yaml_naming_an_old_handler_path_loads_it(workspace: Workspace) -> None:
    workspace.write_config(flush_interval_s=0.1)
    workspace.write_symbols("""
    - symbol: toymod:Engine.schedule
      handler: service_profiler.handlers.lifecycle:engine_shutdown_handler
    """)
    proc = workspace.run_python("""
    import sys, toymod
    from service_profiler.runtime import bootstrap
    from service_profiler.engines.vllm import lifecycle
    rt = bootstrap.current_runtime()
    assert rt is not None and rt.enabled
    print(toymod.Engine().schedule(3))
    print(sys.modules["service_profiler.handlers.lifecycle"] is lifecycle)
    """)
    assert proc.stdout.split() == ["3", "True"], proc.stderr
    assert "cannot be loaded" not in proc.stderr, proc.stderr
