"""The host comes first and nothing is lost silently: SIGTERM while the main thread holds a recorder lock,
handlers raising BaseException, classes / partials / builtins as targets, values the encoder cannot
write, a write that fails (file size limit standing in for a full disk), an unwritable prof_dir.

Real subprocesses with the installed profiler, as in an engine process.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from runtime_harness import Workspace, read_records

from service_profiler.runtime import patching, probes
from service_profiler.runtime.recorder import SPAN, Recorder


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path)


# ------------------------------------------------------------------------------------------ item 1

SIGTERM_PROGRAM = """
import os, sys, time
from service_profiler.runtime import bootstrap
from service_profiler import record
rt = bootstrap.current_runtime()
assert rt is not None and rt.enabled
rec = rt.recorder
print("ready", flush=True)
i = 0
while True:
    # The main thread spends most of its time inside the recorder's locks: declaring new channels
    # (its lock) and flushing a full buffer (the exit-flush path: its I/O lock, then its lock).
    i += 1
    record.event("Loop", f"channel{i % 5000}", {"i": i})
    if i % 200 == 0:
        for k in range(2000):
            rec.buffer.append((0, k, k, 1, None))
        rec.flush()
"""


def test_sigterm_while_the_main_thread_holds_a_recorder_lock_ends_the_process(ws: Workspace) -> None:
    ws.write_symbols("[]")
    ws.write_config(flush_interval_s=0.1)
    script = ws.root / "main.py"
    script.write_text(SIGTERM_PROGRAM)
    for attempt in range(8):
        proc = subprocess.Popen([sys.executable, str(script)], cwd=ws.root, env=ws.env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", proc.stderr
        time.sleep(0.05 + 0.037 * attempt)  # land in different phases of the loop
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"attempt {attempt}: the process hung after SIGTERM")
        assert proc.returncode == -signal.SIGTERM, (attempt, proc.returncode, proc.stderr.read())
        (run,) = [r for r in read_records(ws.prof_dir).values() if r.header["pid"] == proc.pid]
        assert run.lines[-1]["t"] == "close" and run.lines[-1]["reason"] == "signal:SIGTERM", run.lines[-3:]


# ------------------------------------------------------------------------------------------ item 4


def _probe() -> probes.Probe:
    recorder = Recorder(Path("/nonexistent-never-written"))
    return probes.Probe("m:f", "D", "f", 0, recorder.buffer, 1000, recorder.count_dropped, lambda message: None)


@pytest.mark.parametrize("raised", [SystemExit(3), KeyboardInterrupt(), GeneratorExit(), ValueError("x")])
@pytest.mark.parametrize("when", ["before", "after"])
def test_a_handler_raising_any_base_exception_never_reaches_the_host(raised: BaseException, when: str) -> None:
    calls: list[int] = []

    def original(x: int) -> int:
        calls.append(x)
        return x * 10

    def handler(original_func: Any, this: Any, *args: Any, **kwargs: Any) -> Any:
        if when == "after":
            original_func(this, *args, **kwargs)
        raise raised

    probe = _probe()
    probe.active = True
    wrapper = probes.make_sync_handler_wrapper_for_kind(original, probe, handler, False)
    assert wrapper(4) == 40 and calls == [4]  # ran exactly once, its result is the host's
    assert sum(probe.errors.values()) == 1


def test_the_originals_own_base_exception_still_reaches_the_host() -> None:
    def original() -> None:
        raise KeyboardInterrupt("the engine's own")

    def handler(original_func: Any, this: Any) -> None:
        original_func(this)

    probe = _probe()
    probe.active = True
    with pytest.raises(KeyboardInterrupt, match="the engine's own"):
        probes.make_handler_wrapper(original, probe, handler, False)()


def test_an_async_handler_raising_system_exit_never_reaches_the_host() -> None:
    calls: list[int] = []

    async def original(x: int) -> int:
        calls.append(x)
        return x + 1

    async def handler(original_func: Any, this: Any, x: int) -> None:
        await original_func(this, x)
        raise SystemExit(2)

    probe = _probe()
    probe.active = True
    wrapper = probes.make_async_handler_wrapper(original, probe, handler, False)
    assert asyncio.run(wrapper(1)) == 2 and calls == [1]


# ------------------------------------------------------------------------------------------ item 3


def test_a_sync_handler_keeps_the_kind_of_async_and_generator_targets() -> None:
    async def coroutine(x: int) -> int:
        return x

    def generator(n: int) -> Any:
        yield from range(n)
        return "done"

    async def async_generator(n: int) -> Any:
        for i in range(n):
            yield i

    def handler(original_func: Any, this: Any, *args: Any) -> Any:
        return original_func(this, *args)

    probe = _probe()
    probe.active = True
    wrapped = [probes.make_sync_handler_wrapper_for_kind(fn, probe, handler, False)
               for fn in (coroutine, generator, async_generator)]
    assert inspect.iscoroutinefunction(wrapped[0]) and asyncio.run(wrapped[0](5)) == 5
    assert inspect.isgeneratorfunction(wrapped[1]) and list(wrapped[1](3)) == [0, 1, 2]

    async def collect() -> list[int]:
        return [i async for i in wrapped[2](3)]

    assert inspect.isasyncgenfunction(wrapped[2]) and asyncio.run(collect()) == [0, 1, 2]
    assert not probe.errors


TARGETS = '''
import functools

class Scheduler:
    def schedule(self):
        return "scheduled"

def _add(a, b):
    return a + b

add_one = functools.partial(_add, 1)
absolute = abs

class Holder:
    add_one = functools.partial(_add, 1)
    absolute = abs
'''


def test_classes_are_refused_and_partials_and_builtins_keep_their_binding(ws: Workspace) -> None:
    (ws.root / "targets.py").write_text(TARGETS)
    ws.write_symbols("""
        - symbol: targets:Scheduler
        - symbol: targets:add_one
        - symbol: targets:absolute
        - symbol: targets:Holder.add_one
        - symbol: targets:Holder.absolute
    """)
    for enable in (0, 1):
        ws.write_config(enable=enable)
        proc = ws.run_python("""
            import json, targets
            class Mine(targets.Scheduler):  # subclassing works: the class is left alone
                pass
            holder = targets.Holder()
            class Copy:  # a copy put on another class binds as the original did: not at all
                add_one = targets.add_one
            out = {"isinstance": isinstance(Mine(), targets.Scheduler), "is_class": isinstance(targets.Scheduler, type),
                   "module": [targets.add_one(2), targets.absolute(-3)],
                   "holder": [holder.add_one(2), holder.absolute(-3), targets.Holder.add_one(5)],
                   "copy": Copy().add_one(4)}
            print(json.dumps(out))
        """)
        out = json.loads(proc.stdout.splitlines()[-1])
        assert out == {"isinstance": True, "is_class": True, "module": [3, 3], "holder": [3, 3, 6], "copy": 5}
        assert "targets.Scheduler is a class, which cannot be wrapped; name its constructor " \
               "(targets.Scheduler.__init__) or one of its methods instead" in proc.stderr
    (run,) = [r for r in ws.runs().values() if r.of_type("state")[0]["enabled"]]
    patch = run.of_type("patch")[-1]
    assert [f["symbol"] for f in patch["failed"]] == ["targets:Scheduler"]
    assert sorted(patch["applied"]) == ["targets:Holder.absolute", "targets:Holder.add_one", "targets:absolute",
                                        "targets:add_one"]
    # Module and Holder entries share the span names; the copy on `Copy` is the module's wrapper.
    assert len(run.spans("add_one")) == 4 and len(run.spans("absolute")) == 2


def test_resolve_classifies_each_kind_of_target() -> None:
    import types

    module = types.ModuleType("kinds")
    exec(TARGETS, module.__dict__)
    with pytest.raises(patching.PatchError, match=r"kinds\.Scheduler is a class"):
        patching.resolve(module, ("Scheduler",))
    for qualname in (("add_one",), ("absolute",), ("Holder", "add_one"), ("Holder", "absolute")):
        target = patching.resolve(module, qualname)
        assert target.kind == "callable" and not target.is_method
        installed = patching.install(target, functools.partial(lambda *a: "wrapped"))
        assert isinstance(installed, staticmethod)
        assert patching.uninstall(target, installed)
    assert isinstance(module.Holder.__dict__["add_one"], functools.partial)


def test_check_reports_a_class_symbol_as_not_wrappable(tmp_path: Path) -> None:
    from service_profiler.checker import NOT_WRAPPABLE, OK, check_symbols

    path = tmp_path / "s.yaml"
    path.write_text("- symbol: vllm.v1.core.sched.scheduler:Scheduler\n"
                    "- symbol: vllm.v1.core.sched.scheduler:Scheduler.__init__\n")
    report = check_symbols(path)
    assert [e.status for e in report.entries] == [NOT_WRAPPABLE, OK] and not report.ok
    assert "Scheduler is a class" in report.entries[0].detail
    assert "vllm.v1.core.sched.scheduler:Scheduler.__init__" in report.entries[0].detail
    assert "1 not wrappable" in report.format()


# ------------------------------------------------------------------------------------------ item 5


def test_one_unencodable_value_costs_only_its_own_attributes(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path)
    chan = recorder.channel(SPAN, "D", "work")
    for i in range(1000):
        recorder.buffer.append((chan, i, i + 1, 1, {"i": i}))
    deep: Any = []
    for _ in range(100_000):
        deep = [deep]
    recorder.buffer.append((chan, 5000, 5001, 1, {("tuple", "key"): 1}))
    recorder.buffer.append((chan, 5002, 5003, 1, {"deep": deep}))
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic  # the encoder does not look for cycles: one fails at the depth limit
    recorder.buffer.append((chan, 5004, 5005, 1, {"cyclic": cyclic}))
    recorder.flush()
    lines = [json.loads(line) for line in recorder.path.read_text().splitlines()]
    assert [line["t"] for line in lines[:2]] == ["header", "chan"]
    records = [r for line in lines if line["t"] == "rec" for r in line["r"]]
    assert len(records) == 1003 and [r[4]["i"] for r in records[:1000]] == list(range(1000))
    assert records[1000][4]["unencodable"].startswith("TypeError: keys must be")
    assert records[1001][4]["unencodable"].startswith("RecursionError")
    assert records[1002][4]["unencodable"].startswith(("RecursionError", "ValueError: Circular"))
    (warn,) = [line for line in lines if line["t"] == "warn"]
    assert warn["count"] == 3
    assert lines[-1]["t"] == "flushed" and lines[-1]["until"] >= 5005
    recorder.close()
    assert json.loads(recorder.path.read_text().splitlines()[-1])["reason"] == "exit"


# ------------------------------------------------------------------------------------------ item 7


def test_a_failed_write_is_counted_said_once_and_leaves_no_torn_line(ws: Workspace) -> None:
    ws.write_symbols("[]")
    ws.write_config(flush_interval_s=10)
    # RLIMIT_FSIZE stands in for a full disk: writes past it fail (EFBIG) exactly as ENOSPC would.
    proc = ws.run_python("""
        import resource, signal, json
        from service_profiler.runtime import bootstrap
        from service_profiler import record
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        rt = bootstrap.current_runtime()
        rec = rt.recorder
        record.span("D", "work", 1, 2, {"i": -1})
        rec.flush()
        size = rec.path.stat().st_size
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 3000, resource.RLIM_INFINITY))
        for i in range(5000):
            record.span("D", "work", 100 + i, 200 + i, {"i": i, "pad": "x" * 20})
        rec.flush()
        rec.flush()  # still full: nothing more is lost (the buffer is empty), nothing written
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        record.span("D", "work", 9000, 9001, {"i": 5000})
        rec.flush()
    """)
    text = ws.single_run().path.read_text()
    lines = [json.loads(line) for line in text.splitlines()]  # every line parses: nothing torn
    records = [r for line in lines if line["t"] == "rec" for r in line["r"]]
    assert [r[4]["i"] for r in records] == [-1, 5000]
    (lost,) = [line for line in lines if line["t"] == "lost"]
    assert lost["count"] == 5000 and lost["reason"] == "write_error"
    assert (lost["from_ts"], lost["to_ts"]) == (100, 5199) and "File too large" in lost["msg"]
    assert proc.stderr.count("cannot write to") == 1, proc.stderr
    assert lines[-1]["t"] == "close"


# ----------------------------------------------------------------------------------------- item 11


def test_an_unwritable_prof_dir_keeps_collection_off_and_says_why(ws: Workspace) -> None:
    blocker = ws.root / "a-file"
    blocker.write_text("not a directory")
    ws.write_symbols("- symbol: toymod:forward\n")
    ws.config.write_text(json.dumps({"enable": 1, "prof_dir": str(blocker / "prof")}))
    proc = ws.run_python("""
        from service_profiler.runtime import bootstrap
        import toymod
        toymod.forward([1])
        print(bootstrap.current_runtime().enabled)
    """)
    assert proc.stdout.strip() == "False"
    assert f'"prof_dir" = "{blocker / "prof"}": cannot write the run directory' in proc.stderr
    assert "collection stays off" in proc.stderr and "Traceback" not in proc.stderr


def test_a_reload_that_fails_never_turns_collection_on(ws: Workspace) -> None:
    ws.write_symbols("- symbol: toymod:forward\n")
    ws.write_config(enable=0)
    proc = ws.run_python(f"""
        import json, time, os
        from service_profiler.runtime import bootstrap
        rt = bootstrap.current_runtime()
        config = {str(ws.config)!r}
        seen = []
        def settle(text):
            with open(config, "w") as handle:
                handle.write(text)
            os.utime(config, ns=(time.time_ns(), time.time_ns() + len(seen)))
            time.sleep(0.8)
            seen.append(rt.enabled)
        settle('{{"enable": 0, "timelimit": ' + "9" * 5000 + '}}')    # a huge number: that key only
        settle('{{"enable": 1}}')
        settle("[" * 100000 + "]" * 100000)                          # unreadable: keep what was read
        settle('{{"enable": 0, "prof_dir": "a\\\\u0000b"}}')           # NUL in prof_dir: that key only
        settle("\\x00\\x0c")
        print(json.dumps(seen))
    """)
    assert json.loads(proc.stdout.splitlines()[-1]) == [False, True, True, False, False]
    assert "Traceback" not in proc.stderr
    assert '"timelimit" = 999999999999... (an integer of 5000 digits) is out of range' in proc.stderr
    assert "contains a NUL or control character" in proc.stderr
    assert "keeping the settings read before (collection on)" in proc.stderr


def test_a_partial_of_an_async_function_stays_a_coroutine_function(ws: Workspace) -> None:
    (ws.root / "asynctargets.py").write_text(
        "import functools\n"
        "async def _fetch(base, n):\n    return base + n\n"
        "fetch = functools.partial(_fetch, 10)\n"
        "class Holder:\n    fetch = functools.partial(_fetch, 20)\n")
    ws.write_symbols("- symbol: asynctargets:fetch\n- symbol: asynctargets:Holder.fetch\n")
    ws.write_config()
    proc = ws.run_python("""
        import asyncio, inspect, json, asynctargets as t
        out = [inspect.iscoroutinefunction(t.fetch), inspect.iscoroutinefunction(t.Holder.fetch),
               inspect.iscoroutinefunction(t.Holder().fetch), asyncio.run(t.fetch(1)), asyncio.run(t.Holder().fetch(1))]
        print(json.dumps(out))
    """)
    assert json.loads(proc.stdout.splitlines()[-1]) == [True, True, True, 11, 21]
    assert len(ws.single_run().spans("fetch")) == 2


@pytest.mark.vllm
def test_naming_vllms_scheduler_class_leaves_get_scheduler_cls_working(ws: Workspace) -> None:
    ws.write_symbols("- symbol: vllm.v1.core.sched.scheduler:Scheduler\n"
                     "- symbol: vllm.v1.core.sched.scheduler:Scheduler.__init__\n")
    ws.write_config()  # the symbol is patched (or refused) whether collection is on or off
    proc = ws.run_python("""
        from vllm.config import SchedulerConfig
        from vllm.v1.core.sched.scheduler import Scheduler
        config = SchedulerConfig.__new__(SchedulerConfig)
        config.scheduler_cls, config.async_scheduling = None, True
        cls = config.get_scheduler_cls()  # imports AsyncScheduler, a subclass of Scheduler
        print(cls.__name__, issubclass(cls, Scheduler), isinstance(Scheduler, type))
    """, timeout=240)
    assert proc.stdout.split()[-3:] == ["AsyncScheduler", "True", "True"], proc.stderr[-2000:]
    assert "Scheduler is a class, which cannot be wrapped" in proc.stderr
