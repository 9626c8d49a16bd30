"""Activation in real subprocesses: the vLLM entry point, failures that must stay inside the profiler,
the log level, lazy imports of packages around a target, and the raw file's header."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest
from runtime_harness import Workspace

import service_profiler

ENTRY_POINT = """
import importlib.metadata as metadata
(ENTRY,) = [ep for ep in metadata.entry_points(group="vllm.general_plugins") if ep.name == "service_profiler"]
"""


def test_vllm_plugin_entry_point_activates_like_the_pth(workspace: Workspace) -> None:
    workspace.write_config()
    workspace.write_symbols("- symbol: toymod:Engine.schedule\n")
    # Started without the variable, so the .pth line stays dormant: only the entry point can activate.
    proc = workspace.run_python(ENTRY_POINT + f"""
import os, sys, toymod
assert "service_profiler.runtime.core" not in sys.modules
plugin = ENTRY.load()
from service_profiler.runtime import bootstrap
assert plugin is bootstrap.vllm_plugin
os.environ["SERVICE_PROF_CONFIG_PATH"] = {str(workspace.config)!r}
plugin()
runtime = bootstrap.current_runtime()
plugin()                              # vLLM may call general plugins more than once
bootstrap.activate_from_startup()     # and the .pth entry reaches the same function
assert runtime is not None and bootstrap.current_runtime() is runtime
e = toymod.Engine()
print(ENTRY.value, e.schedule(1), e.schedule(2))
""", SERVICE_PROF_CONFIG_PATH="")
    assert proc.stdout.split() == ["service_profiler.runtime.bootstrap:vllm_plugin", "1", "2"]
    run = workspace.single_run()
    assert len(run.spans("schedule")) == 2  # wrapped once, whatever the number of activations


def test_vllm_plugin_after_pth_activation_changes_nothing(workspace: Workspace) -> None:
    workspace.write_config()
    workspace.write_symbols("- symbol: toymod:Engine.schedule\n")
    proc = workspace.run_python(ENTRY_POINT + """
import toymod
from service_profiler.runtime import bootstrap
runtime = bootstrap.current_runtime()
assert runtime is not None            # activated by the .pth line at start-up
ENTRY.load()()
assert bootstrap.current_runtime() is runtime
print(toymod.Engine().schedule(3))
""")
    assert proc.stdout.strip() == "3"
    assert len(workspace.single_run().spans("schedule")) == 1


HOST_CODE = """
import toymod
e = toymod.Engine()
print("host", e.schedule(2, scale=3), toymod.forward([1, 2, 3]))
"""


@pytest.mark.parametrize("case", ["garbage_config", "config_is_a_directory", "prof_dir_under_a_file"])
def test_failing_activation_never_reaches_the_host(workspace: Workspace, case: str) -> None:
    workspace.write_symbols("- symbol: toymod:Engine.schedule\n- symbol: toymod:forward\n")
    env: dict[str, str] = {"HOME": str(workspace.root)}
    if case == "garbage_config":
        workspace.config.write_bytes(b"\x00\xff{{ not json")
    elif case == "config_is_a_directory":
        workspace.config.mkdir()
    else:
        blocker = workspace.root / "a_file"
        blocker.write_text("")
        workspace.write_config(prof_dir=str(blocker / "runs"))
    # Through the .pth line at start-up, and through the entry point alone (variable set afterwards).
    plugin_only = (ENTRY_POINT + f"import os\nos.environ['SERVICE_PROF_CONFIG_PATH'] = {str(workspace.config)!r}\n"
                   "ENTRY.load()()\n")
    for code, extra in ((HOST_CODE, {}), (plugin_only + HOST_CODE, {"SERVICE_PROF_CONFIG_PATH": ""})):
        proc = workspace.run_python(code, **env, **extra)  # check=True: exit status 0
        assert proc.stdout.strip() == "host 6 3", proc.stderr
        assert "Traceback" not in proc.stderr


def test_a_start_that_fails_inside_leaves_nothing_behind(workspace: Workspace) -> None:
    workspace.write_config()
    workspace.write_symbols("- symbol: toymod:Engine.schedule\n- symbol: toymod:forward\n")
    proc = workspace.run_python(ENTRY_POINT + f"""
import os, sys, types, toymod
from service_profiler.runtime import bootstrap, patching, core as runtime

def broken(self):
    raise RuntimeError("simulated failure late in start()")

runtime.Runtime._start_control_thread = broken    # after the hook is installed and toymod is patched
original = toymod.Engine.__dict__["schedule"]
os.environ["SERVICE_PROF_CONFIG_PATH"] = {str(workspace.config)!r}
ENTRY.load()()
ENTRY.load()()                                   # a failed start is not retried
assert bootstrap.current_runtime() is None
assert toymod.Engine.__dict__["schedule"] is original
assert type(toymod.forward) is types.FunctionType and not hasattr(toymod.forward, "__wrapped__")
assert not any(isinstance(f, patching.PostImportHook) for f in sys.meta_path)
print("host", toymod.Engine().schedule(2))
""", SERVICE_PROF_CONFIG_PATH="")
    assert proc.stdout.strip() == "host 2"
    assert proc.stderr.count("simulated failure late in start()") == 1


def test_invalid_log_level_falls_back_to_info_and_still_activates(workspace: Workspace) -> None:
    workspace.write_config(host_system_usage_freq=80)  # one ordinary warning, to see the logger work
    workspace.write_symbols("- symbol: toymod:Engine.schedule\n")
    proc = workspace.run_python(HOST_CODE, SERVICE_PROF_LOG_LEVEL="LOUD")
    assert proc.stdout.strip() == "host 6 3"
    assert proc.stderr.count("LOUD") == 1
    assert "SERVICE_PROF_LOG_LEVEL" in proc.stderr and "using INFO" in proc.stderr
    assert "1 awaiting import" in proc.stderr  # INFO: the one-line summary is logged
    assert "host_system_usage_freq" in proc.stderr
    assert len(workspace.single_run().spans("schedule")) == 1


@pytest.mark.parametrize(("level", "summary_logged"), [("", True), ("warning", False), ("10", True)])
def test_log_level_default_is_info(workspace: Workspace, level: str, summary_logged: bool) -> None:
    workspace.write_config()
    workspace.write_symbols("- symbol: toymod:Engine.schedule\n")
    proc = workspace.run_python(HOST_CODE, SERVICE_PROF_LOG_LEVEL=level)
    assert ("awaiting import" in proc.stderr) is summary_logged, proc.stderr
    assert "not a log level" not in proc.stderr


def test_importing_the_profiler_or_a_parent_package_never_imports_the_target(workspace: Workspace) -> None:
    package = workspace.root / "tinypkg"
    package.mkdir()
    (package / "__init__.py").write_text("VALUE = 1\n")
    (package / "sub.py").write_text("def f(x):\n    return x + 1\n")
    workspace.write_config()
    workspace.write_symbols("- symbol: tinypkg.sub:f\n")
    proc = workspace.run_python("""
    import sys
    import service_profiler, service_profiler.runtime.core
    import service_profiler.runtime.patching, service_profiler.runtime.probes
    from service_profiler.runtime import bootstrap
    runtime = bootstrap.current_runtime()
    assert runtime is not None and runtime.report.pending == ["tinypkg.sub:f"]
    print("profiler", "tinypkg" in sys.modules, "tinypkg.sub" in sys.modules)
    import tinypkg
    print("parent", "tinypkg.sub" in sys.modules, runtime.report.applied)
    from tinypkg.sub import f            # the consumer's own binding gets the wrapper
    print("target", hasattr(f, "__wrapped__"), runtime.report.applied, f(1))
    """)
    assert proc.stdout.splitlines() == ["profiler False False", "parent False []",
                                        "target True ['tinypkg.sub:f'] 2"]
    run = workspace.single_run()
    assert len(run.spans("f")) == 1
    assert run.of_type("patch")[-1]["applied"] == ["tinypkg.sub:f"]


def test_raw_file_header_written_by_the_runtime(workspace: Workspace) -> None:
    workspace.write_config()
    workspace.write_symbols("- symbol: toymod:Engine.schedule\n")
    before = time.time_ns()
    proc = workspace.run_python("""
    import os, toymod
    toymod.Engine().schedule(1)
    print(os.getpid())
    """)
    after = time.time_ns()
    pid = int(proc.stdout)
    run = workspace.single_run()
    header = run.header
    host = socket.gethostname()
    assert run.path.name == f"{host}-{pid}.sprof.jsonl"
    assert run.path.parent.parent == workspace.prof_dir
    assert header["format"] == 1
    assert header["hostname"] == host
    assert header["pid"] == pid
    assert header["ppid"] == os.getpid()  # started straight from this test process
    assert header["role"] == "main"
    assert header["profiler_version"] == service_profiler.__version__
    assert header["argv"][0].endswith("main.py")
    clock = header["clock"]
    assert before <= clock["wall_ns"] <= after
    assert isinstance(clock["mono_ns"], int) and clock["mono_ns"] > 0
    # The anchor is taken when the file is opened: the span it anchors was recorded just before.
    (span,) = run.spans("schedule")
    assert 0 <= clock["mono_ns"] - span[2] < 60 * 10**9
    assert json.loads(run.path.read_text().splitlines()[0])["t"] == "header"
