"""Config options that have no effect on this backend, switched on while the process runs: each is
reported at the reload that turns it on, once per process, however often the file is edited after."""

from __future__ import annotations

import json

from runtime_harness import Workspace

from service_profiler.runtime.core import detect_backend
from service_profiler.runtime.settings import shipped_default_text


def test_option_switched_on_while_running_is_reported_once(workspace: Workspace) -> None:
    assert detect_backend() == "cpu"  # this machine: acl_* and profiler_level have no effect here
    defaults = json.loads(shipped_default_text())
    workspace.config.write_text(json.dumps({**defaults, "prof_dir": str(workspace.prof_dir)}))
    workspace.write_symbols("- symbol: toymod:Engine.schedule\n")
    proc = workspace.run_python(f"""
    import json, os, time, toymod
    from service_profiler.runtime import bootstrap
    rt = bootstrap.current_runtime()
    defaults = {defaults!r}
    e = toymod.Engine()

    def edit(tag, **fields):
        # `console_every_n_steps` marks each edit, so the test waits for the control thread's reload
        # of exactly this edit instead of sleeping.
        data = {{**defaults, "prof_dir": {str(workspace.prof_dir)!r}, "console_every_n_steps": tag, **fields}}
        with open({str(workspace.config)!r}, "w") as f: json.dump(data, f)
        os.utime({str(workspace.config)!r}, ns=(time.time_ns(), time.time_ns() + tag))   # a distinct mtime
        deadline = time.monotonic() + 30
        while rt.settings.console_every_n_steps != tag:
            assert time.monotonic() < deadline, "config not reloaded"
            time.sleep(0.01)
        e.schedule(tag)

    e.schedule(0)
    edit(1, acl_task_time=1)                          # switched on while running: reported now
    edit(2, acl_task_time=2, enable=1)                # another value: not again
    edit(3, acl_task_time=3, acl_prof_task_time_level="L1", profiler_level="DEBUG", enable=1)
    edit(4, acl_task_time=1, acl_prof_task_time_level="L0,5", profiler_level="TRACE", enable=0)
    edit(5)                                           # back to the defaults
    edit(6, acl_task_time=2, profiler_level="DEBUG")  # on again: still once per process
    print("done")
    """)
    assert proc.stdout.split() == ["done"]
    runs = workspace.runs()
    assert len(runs) == 1
    warnings = [line["msg"] for line in next(iter(runs.values())).of_type("warn")]
    for key, first_value in (("acl_task_time", "1"), ("acl_prof_task_time_level", '"L1"'),
                             ("profiler_level", '"DEBUG"')):
        reported = [msg for msg in warnings if msg.startswith(f'"{key}" = ')]
        assert reported == [f'"{key}" = {first_value} has no effect on cpu: ' + reported[0].split(": ", 1)[1]], \
            warnings
        logged = [line for line in proc.stderr.splitlines() if f'"{key}" = ' in line]
        assert len(logged) == 1, proc.stderr
    assert len(next(iter(runs.values())).spans("schedule")) == 2  # edits 2 and 3: collection was on


def test_forked_child_notes_the_report_in_its_own_file_without_logging_it_again(workspace: Workspace) -> None:
    workspace.write_config(acl_task_time=1)
    workspace.write_symbols("- symbol: toymod:Engine.schedule\n")
    proc = workspace.run_python("""
    import os, sys, toymod
    e = toymod.Engine()
    e.schedule(1)
    for records in (True, False):   # a child that records, and a helper child that records nothing
        pid = os.fork()
        if pid == 0:
            if records:
                e.schedule(2)
            sys.exit(0)             # a normal exit: the final flush runs in both children
        os.waitpid(pid, 0)
    """)
    runs = workspace.runs()
    assert len(runs) >= 2, runs  # the parent and the recording child (the recorder decides about the idle one)
    for run in runs.values():
        reported = [line["msg"] for line in run.of_type("warn") if line["msg"].startswith('"acl_task_time" = 1')]
        assert len(reported) == 1, (run.header["pid"], run.lines)
    assert proc.stderr.count('"acl_task_time" = 1') == 1, proc.stderr
