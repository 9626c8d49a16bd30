"""The collection runtime in real subprocesses: activation, patch orders, every target kind,
threads, fork/spawn children, SIGTERM/SIGKILL, enable/timelimit/domain, bad input, host-first."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from runtime_harness import Workspace, read_records

from service_profiler.runtime import recorder

ALL_KINDS = """
- symbol: toymod:Engine.schedule
  domain: BatchSchedule
  attributes:
    - {name: n, expr: n}
    - {name: result, expr: return | str}
    - {name: batch, expr: this | attr batch | len}
- symbol: toymod:Engine.Inner.step
- symbol: toymod:Engine.build
- symbol: toymod:Engine.helper
- symbol: toymod:Engine.serve
- symbol: toymod:Engine.tokens
- symbol: toymod:Engine.stream
- symbol: toymod:Engine.fail
- symbol: toymod:forward
  attributes:
    - {name: n, expr: len(input_ids)}
    - {name: training, expr: training | bool}
"""

EXERCISE_ALL = """
import asyncio, toymod
e = toymod.Engine()
out = [e.schedule(3), e.schedule(2, scale=5), toymod.Engine.Inner().step(4), toymod.Engine.build(1),
       e.helper(3), asyncio.run(e.serve(9)), list(e.tokens(3)), toymod.forward([1, 2, 3], training=True)]
async def consume():
    return [i async for i in e.stream(3)]
out.append(asyncio.run(consume()))
try:
    e.fail()
except KeyError as exc:
    out.append(("raised", str(exc)))
print(out)
"""
EXPECTED_OUTPUT = "[3, 10, 8, 2, -3, 9, [0, 1, 2], 3, [0, 1, 2], ('raised', \"'engine-owned'\")]"


def test_every_target_kind_patch_then_import(workspace: Workspace) -> None:
    workspace.write_config()
    workspace.write_symbols(ALL_KINDS)
    proc = workspace.run_python(EXERCISE_ALL)
    assert proc.stdout.strip() == EXPECTED_OUTPUT
    run = workspace.single_run()
    patch = run.of_type("patch")[-1]
    assert sorted(patch["applied"]) == sorted(
        ["toymod:Engine.schedule", "toymod:Engine.Inner.step", "toymod:Engine.build", "toymod:Engine.helper",
         "toymod:Engine.serve", "toymod:Engine.tokens", "toymod:Engine.stream", "toymod:Engine.fail",
         "toymod:forward"])
    assert patch["failed"] == [] and patch["pending"] == []
    schedule = run.spans("schedule")
    assert [r[4] for r in schedule] == [{"n": 3, "result": "3", "batch": 3}, {"n": 2, "result": "10", "batch": 3}]
    assert all(r[2] >= r[1] for r in run.records)
    for name in ("step", "build", "helper", "serve", "tokens", "stream"):
        assert len(run.spans(name)) == 1, name
    assert run.spans("forward")[0][4] == {"n": 3, "training": True}
    assert run.spans("fail")[0][4] == {"error": "KeyError"}
    assert run.header["pid"] > 0 and run.header["clock"]["wall_ns"] > 0


def test_import_then_patch_and_idempotent_activation(workspace: Workspace) -> None:
    workspace.write_config()
    workspace.write_symbols(ALL_KINDS)
    # Activation deferred until after the import: modules already imported are patched at once, and a
    # second activation (vLLM calls its plugins more than once) changes nothing.
    code = """
    import toymod
    from service_profiler.runtime import bootstrap
    first = bootstrap.activate("test")
    assert bootstrap.activate("again") is first
    e = toymod.Engine()
    print(e.schedule(3), e.schedule(3))
    """
    workspace.run_python(code, SERVICE_PROF_CONFIG_PATH="")
    assert workspace.runs() == {}
    proc = workspace.run_python(code.replace("import toymod\n", "import toymod, os\n").replace(
        "from service_profiler.runtime import bootstrap",
        f"os.environ['SERVICE_PROF_CONFIG_PATH'] = {str(workspace.config)!r}\n    "
        "from service_profiler.runtime import bootstrap"), SERVICE_PROF_CONFIG_PATH="")
    assert proc.stdout.split() == ["3", "3"]
    run = workspace.single_run()
    assert len(run.spans("schedule")) == 2


def test_patch_unpatch_patch(workspace: Workspace) -> None:
    workspace.write_config()
    workspace.write_symbols(ALL_KINDS)
    code = """
    import toymod
    from service_profiler.runtime import bootstrap
    rt = bootstrap.current_runtime()
    original = toymod.Engine.__dict__["schedule"]
    e = toymod.Engine()
    e.schedule(1)
    assert rt.unpatch_all() == 9 and rt.unpatch_all() == 0
    assert toymod.Engine.__dict__["schedule"] is not original  # restored the raw original
    assert toymod.Engine.schedule.__name__ == "schedule" and not hasattr(toymod.Engine.schedule, "__wrapped__")
    assert isinstance(toymod.Engine.__dict__["build"], classmethod)
    e.schedule(2)                      # not recorded
    assert rt.repatch() == 9 and rt.repatch() == 0
    e.schedule(3)                      # recorded again
    print("ok")
    """
    workspace.run_python(code)
    run = workspace.single_run()
    assert [r[4]["n"] for r in run.spans("schedule")] == [1, 3]


def test_threads_record_exactly_n_times_m(workspace: Workspace) -> None:
    workspace.write_config()
    workspace.write_symbols("- symbol: toymod:Engine.schedule\n")
    proc = workspace.run_python("""
    import threading, toymod
    e = toymod.Engine()
    start = threading.Barrier(8)   # all alive at once, so their thread ids are distinct
    def work():
        start.wait()
        for i in range(2500):
            e.schedule(i)
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads: t.start()
    for t in threads: t.join()
    import glob
    print(sorted(open(p).read().strip() for p in glob.glob("/proc/self/task/*/comm")))
    """)
    run = workspace.single_run()
    spans = run.spans("schedule")
    assert len(spans) == 8 * 2500
    assert len({r[3] for r in spans}) == 8
    # The writer encodes a flush in bounded chunks (one GIL-holding C call each), one "rec" line apiece.
    (raw,) = workspace.prof_dir.rglob("*.sprof.jsonl")
    chunks = [len(json.loads(line)["r"]) for line in raw.read_text().splitlines() if line.startswith('{"t":"rec"')]
    assert sum(chunks) == 8 * 2500 and max(chunks) <= recorder._RECORDS_PER_LINE
    # Kernel thread names say which threads are the profiler's (top -H, py-spy, /proc).
    assert "'sprof-writer'" in proc.stdout and "'sprof-control'" in proc.stdout


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_children_write_their_own_files_into_one_run_dir(workspace: Workspace, method: str) -> None:
    workspace.write_config()
    workspace.write_symbols("- symbol: toymod:Engine.schedule\n")
    workspace.run_python(f"""
    import multiprocessing as mp, toymod
    def child(k):
        e = toymod.Engine()
        for i in range(k):
            e.schedule(i)
    if __name__ == "__main__":
        toymod.Engine().schedule(-1)
        ctx = mp.get_context({method!r})
        # a forked child that records nothing leaves no file (a spawned one patches, and reports it)
        procs = [ctx.Process(target=child, args=(k,)) for k in ((0, 3, 5) if {method!r} == "fork" else (3, 5))]
        for p in procs: p.start()
        for p in procs: p.join()
        assert all(p.exitcode == 0 for p in procs)
    """)
    runs = workspace.runs()
    assert len(runs) == 3
    assert len({run.path.parent for run in runs.values()}) == 1
    counts = sorted(len(run.spans("schedule")) for run in runs.values())
    assert counts == [1, 3, 5]  # the forked children do not repeat the parent's record


def test_sigterm_flushes_and_exits_as_sigterm(workspace: Workspace) -> None:
    workspace.write_config(flush_interval_s=10)
    workspace.write_symbols("- symbol: toymod:Engine.schedule\n")
    proc = subprocess.Popen([sys.executable, "-c", (
        "import toymod, sys\n"
        "e = toymod.Engine()\n"
        "for i in range(1000): e.schedule(i)\n"
        "print('ready', flush=True)\n"
        "import time\n"
        "while True: time.sleep(0.01)\n")], cwd=workspace.root, env=workspace.env(), stdout=subprocess.PIPE,
        text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    run = workspace.single_run()
    assert len(run.spans("schedule")) == 1000


def test_sigkill_loses_at_most_the_last_interval(workspace: Workspace) -> None:
    workspace.write_config(flush_interval_s=0.2)
    workspace.write_symbols("- symbol: toymod:Engine.schedule\n")
    proc = subprocess.Popen([sys.executable, "-c", (
        "import toymod, time\n"
        "e = toymod.Engine()\n"
        "for i in range(500): e.schedule(i)\n"
        "time.sleep(1.0)\n"                 # several flush intervals pass
        "print('flushed', flush=True)\n"
        "while True:\n"
        "    e.schedule(0)\n"
        "    time.sleep(0.001)\n")], cwd=workspace.root, env=workspace.env(), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "flushed"
        time.sleep(0.5)
        killed_ns = time.perf_counter_ns()  # CLOCK_MONOTONIC: the clock the records carry, machine-wide
        proc.kill()
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    run = workspace.single_run()
    spans = run.spans("schedule")
    assert len(spans) >= 500 + 100  # the burst, and the steady calls of the flushed intervals after it
    # Calls ran every ~1 ms until the kill: what is lost is at most the last flush interval (0.2 s),
    # plus scheduling slack on a busy machine.
    lost_s = (killed_ns - max(span[2] for span in spans)) / 1e9
    assert lost_s < 0.2 + 0.5, lost_s


def test_enable_flip_and_domain_filter_while_running(workspace: Workspace) -> None:
    workspace.write_config(enable=0)
    workspace.write_symbols("""
    - symbol: toymod:Engine.schedule
      domain: BatchSchedule
    - symbol: toymod:forward
      domain: ModelExecute
    """)
    config = str(workspace.config)
    workspace.run_python(f"""
    import json, os, time, toymod
    e = toymod.Engine()
    def phase(tag, enable, **extra):
        data = {{"enable": enable, "prof_dir": {str(workspace.prof_dir)!r}, **extra}}
        with open({config!r}, "w") as f: json.dump(data, f)
        os.utime({config!r}, ns=(time.time_ns(), time.time_ns() + tag))   # a distinct mtime
        time.sleep(1.2)                                                  # within about a second
        e.schedule(tag); toymod.forward([tag])
    e.schedule(0)                        # enable 0 at start: not recorded
    phase(1, 1)                          # on: both recorded
    phase(2, 0)                          # off: neither
    phase(3, 1, domain="ModelExecute")   # on, one domain kept
    """, timeout=60)
    run = workspace.single_run()
    assert [r[4] for r in run.spans("schedule")] == [None]
    assert len(run.spans("schedule")) == 1 and len(run.spans("forward")) == 2
    states = [(s["enabled"], s["reason"]) for s in run.of_type("state")]
    assert states == [(False, "startup"), (True, "config"), (False, "config"), (True, "config")]


def test_timelimit_stops_collection(workspace: Workspace) -> None:
    workspace.write_config(timelimit=1)
    workspace.write_symbols("- symbol: toymod:Engine.schedule\n")
    workspace.run_python("""
    import time, toymod
    e = toymod.Engine()
    e.schedule(1)
    time.sleep(1.8)
    e.schedule(2)
    """)
    run = workspace.single_run()
    assert len(run.spans("schedule")) == 1
    assert [s["reason"] for s in run.of_type("state")] == ["startup", "timelimit"]


def test_bad_inputs_are_reported_and_the_rest_works(workspace: Workspace) -> None:
    workspace.write_config(host_system_usage_freq=80)
    workspace.write_symbols("""
    - symbol: toymod:Engine.schedule
      attributes:
        - {name: good, expr: n}
        - {name: broken, expr: "len(n"}
        - {name: fails_at_runtime, expr: "n[0]"}
    - symbol: toymod:Engine.missing
    - symbol: "not a symbol"
    - symbol: toymod:forward
      handler: no_such_module:handler
    - symbol: yaml:safe_load
      min_version: "99.0"
    """)
    proc = workspace.run_python("""
    import toymod
    e = toymod.Engine()
    print(e.schedule(4), e.schedule(5), toymod.forward([1]))
    """)
    assert proc.stdout.split() == ["4", "5", "1"]
    err = proc.stderr
    assert "host_system_usage_freq" in err and "80" in err
    assert "len(n" in err and "column" in err
    assert "no_such_module:handler" in err and "timer" in err
    assert "Engine.missing" in err
    run = workspace.single_run()
    assert [r[4] for r in run.spans("schedule")] == [{"good": 4}, {"good": 5}]
    assert len(run.spans("forward")) == 1  # fell back to the timer
    failing = [(w["msg"], w["count"]) for w in run.of_type("warn") if "fails_at_runtime" in w["msg"]]
    # One report when it first fails, then its final count (written at exit) under the same message.
    assert [count for _, count in failing] == [1, 2] and len({msg for msg, _ in failing}) == 1
    patch = run.of_type("patch")[-1]
    assert [f["symbol"] for f in patch["failed"]] == ["toymod:Engine.missing"]
    assert [s["symbol"] for s in patch["skipped"]] == ["yaml:safe_load"]
    assert "99.0" in patch["skipped"][0]["reason"]


HANDLERS = '''
calls = []

def raises_before(original, this, *args, **kwargs):
    raise RuntimeError("handler bug before the call")

def raises_after(original, this, *args, **kwargs):
    original(this, *args, **kwargs)
    raise RuntimeError("handler bug after the call")

def swallows(original, this, *args, **kwargs):
    try:
        return original(this, *args, **kwargs)
    except Exception:
        return "swallowed"

def calls_twice(original, this, *args, **kwargs):
    original(this, *args, **kwargs)
    return original(this, *args, **kwargs)

def replaces_result(original, this, *args, **kwargs):
    original(this, *args, **kwargs)
    return "not the engine's result"

def records(original, this, *args, **kwargs):
    from service_profiler import record
    t0 = record.now_ns()
    result = original(this, *args, **kwargs)
    record.span("Custom", "schedule", t0, record.now_ns(), {"n": args[0], "calls": this.calls})
    return result

def on_function(original, this, *args, **kwargs):
    calls.append(this)
    return original(this, *args, **kwargs)
'''


@pytest.mark.parametrize(("handler", "code", "expected"), [
    ("raises_before", "print(e.schedule(2), e.calls)", "2 1"),
    ("raises_after", "print(e.schedule(2), e.calls)", "2 1"),
    ("calls_twice", "print(e.schedule(2), e.calls)", "2 1"),
    ("replaces_result", "print(e.schedule(2), e.calls)", "2 1"),
    ("swallows", "\ntry:\n    e.fail()\nexcept KeyError as exc:\n    print('engine error passes', exc)",
     "engine error passes 'engine-owned'"),
])
def test_custom_handlers_never_change_the_engine(workspace: Workspace, handler: str, code: str,
                                                 expected: str) -> None:
    (workspace.root / "myhandlers.py").write_text(HANDLERS)
    workspace.write_config()
    target = "fail" if handler == "swallows" else "schedule"
    workspace.write_symbols(f"- symbol: toymod:Engine.{target}\n  handler: myhandlers:{handler}\n")
    proc = workspace.run_python("import toymod\ne = toymod.Engine()\n" + code)
    assert proc.stdout.strip() == expected


def test_custom_handler_records_through_the_public_api(workspace: Workspace) -> None:
    (workspace.root / "myhandlers.py").write_text(HANDLERS)
    workspace.write_config()
    workspace.write_symbols("""
    - symbol: toymod:Engine.schedule
      handler: myhandlers:records
    - symbol: toymod:forward
      handler: myhandlers:on_function
    """)
    proc = workspace.run_python("""
    import toymod, myhandlers
    e = toymod.Engine()
    print(e.schedule(7), toymod.forward([1, 2]), myhandlers.calls)
    """)
    assert proc.stdout.strip() == "7 2 [None]"
    run = workspace.single_run()
    assert [r[4] for r in run.spans("schedule")] == [{"n": 7, "calls": 1}]


def test_dormant_without_the_variable(workspace: Workspace) -> None:
    workspace.write_config()
    workspace.write_symbols("- symbol: toymod:Engine.schedule\n")
    proc = workspace.run_python("""
    import sys, toymod
    toymod.Engine().schedule(1)
    print(sorted(m for m in sys.modules if m.startswith("service_profiler")))
    """, SERVICE_PROF_CONFIG_PATH="")
    assert proc.stdout.strip() == "[]"
    assert not workspace.prof_dir.exists()


def test_missing_config_is_created_with_defaults_and_collection_off(workspace: Workspace) -> None:
    workspace.write_symbols("- symbol: toymod:Engine.schedule\n")
    assert not workspace.config.exists()
    workspace.run_python("import toymod\ntoymod.Engine().schedule(1)\n",
                         HOME=str(workspace.root))
    created = json.loads(workspace.config.read_text())
    assert created["enable"] in (0, False)
    # The process still writes its patch report (for `inspect`), but no span.
    runs = read_records(workspace.root / ".ms_service_profiler")
    assert len(runs) == 1
    run = next(iter(runs.values()))
    assert run.of_type("patch")[-1]["applied"] == ["toymod:Engine.schedule"]
    assert run.records == []


def test_sitecustomize_dir_activates_and_chains_user_sitecustomize(workspace: Workspace) -> None:
    from service_profiler.runtime.bootstrap import SITECUSTOMIZE_DIR

    user_dir = workspace.root / "usersite"
    user_dir.mkdir()
    (user_dir / "sitecustomize.py").write_text("import os\nos.environ['USER_SITECUSTOMIZE_RAN'] = '1'\n")
    workspace.write_config()
    workspace.write_symbols("- symbol: toymod:Engine.schedule\n")
    # -S skips site and with it the installed .pth: only the sitecustomize directory can activate the
    # profiler here (with -S, importing sitecustomize is left to the program, as site would do it).
    import sysconfig

    import service_profiler

    installed_at = os.path.dirname(os.path.dirname(service_profiler.__file__))
    env = workspace.env()
    env["PYTHONPATH"] = os.pathsep.join([SITECUSTOMIZE_DIR, str(user_dir), str(workspace.root), installed_at,
                                         sysconfig.get_paths()["purelib"]])
    code = ("import sitecustomize, os\n"
            "import toymod\n"
            "toymod.Engine().schedule(1)\n"
            "print(os.environ.get('USER_SITECUSTOMIZE_RAN'))\n")
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=workspace.root, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1"
    run = workspace.single_run()
    assert len(run.spans("schedule")) == 1


def test_inherited_method_of_a_patched_base_is_not_wrapped_twice(workspace: Workspace) -> None:
    workspace.write_config()
    workspace.write_symbols("""
    - symbol: toymod:Engine.schedule
    - symbol: toymod:SubEngine.schedule
    - symbol: toymod:SubEngine.build
    """)
    proc = workspace.run_python("""
    import toymod
    print(toymod.SubEngine().schedule(2), toymod.SubEngine.build(1), toymod.Engine.build(1))
    """)
    assert proc.stdout.split() == ["2", "2", "2"]
    run = workspace.single_run()
    assert len(run.spans("schedule")) == 1
    assert len(run.spans("build")) == 1  # patched on the subclass only
    patch = run.of_type("patch")[-1]
    assert [s["symbol"] for s in patch["skipped"]] == ["toymod:SubEngine.schedule"]
    assert "already wrapped" in patch["skipped"][0]["reason"]


def test_host_sampling_and_device_memory_reported_unavailable_on_cpu(workspace: Workspace) -> None:
    workspace.write_config(host_system_usage_freq=20, npu_memory_usage_freq=10)
    workspace.write_symbols("- symbol: toymod:Engine.schedule\n")
    proc = workspace.run_python("""
    import time, toymod
    toymod.Engine().schedule(1)
    time.sleep(1.0)
    """)
    run = workspace.single_run()
    samples = [r[2] for r in run.spans("host")]  # counter records: [chan, ts, values]
    assert 10 <= len(samples) <= 30, len(samples)
    assert all(0 <= s["cpu_percent"] <= 100 * os.cpu_count() and s["mem_used_bytes"] > 0 for s in samples)
    kinds = {chan["name"]: chan["kind"] for chan in run.channels.values()}
    assert kinds["host"] == "counter" and "device_memory" not in kinds
    assert "npu_memory_usage_freq" in proc.stderr


def test_domain_filter_applies_per_record_for_custom_handlers(workspace: Workspace) -> None:
    (workspace.root / "myhandlers.py").write_text(HANDLERS)
    workspace.write_config(domain="Custom")
    workspace.write_symbols("""
    - symbol: toymod:Engine.schedule
      handler: myhandlers:records
      domain: BatchSchedule
    - symbol: toymod:forward
      domain: BatchSchedule
    """)
    workspace.run_python("import toymod\ntoymod.Engine().schedule(3)\ntoymod.forward([1])\n")
    run = workspace.single_run()
    # The handler's probe stays on (it records into the kept "Custom" domain); the timer is filtered.
    assert [r[4] for r in run.spans("schedule")] == [{"n": 3, "calls": 1}]
    assert run.spans("forward") == []


def test_buffer_overflow_is_counted_and_recorded(workspace: Workspace) -> None:
    workspace.write_config(max_buffered_records=1000, flush_interval_s=10)
    workspace.write_symbols("- symbol: toymod:Engine.schedule\n")
    workspace.run_python("""
    import toymod
    e = toymod.Engine()
    for i in range(5000):   # well within one flush interval
        e.schedule(i)
    """)
    run = workspace.single_run()
    spans = run.spans("schedule")
    dropped = sum(line["count"] for line in run.of_type("dropped"))
    assert len(spans) == 1000 and dropped == 4000
    assert [r[4] for r in spans][:1] == [None] and spans[-1][1] >= spans[0][1]
