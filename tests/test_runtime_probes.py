"""Probes in real subprocesses: caller_filter, whole-iteration generator spans, a target that keeps
raising, failure counts in the raw file, expressions checked at load, and the patch report."""

from __future__ import annotations

from runtime_harness import Workspace

from service_profiler.rawdata.inspect_run import describe_run, format_report
from service_profiler.rawdata.rawfile import read_run


def test_caller_filter_matches_the_direct_caller_and_never_raises(workspace: Workspace) -> None:
    workspace.write_config()
    workspace.write_symbols("""
    - symbol: toymod:Engine.schedule
      caller_filter: step
      attributes: [{name: n, expr: n}]
    - symbol: toymod:forward
      caller_filter: outer
    - symbol: toymod:Engine.serve
      caller_filter: consume
    - symbol: toymod:Engine.helper
      handler: filtered_handlers:counting
      caller_filter: step
    """)
    (workspace.root / "filtered_handlers.py").write_text(
        "seen = []\n"
        "def counting(original, this, *args, **kwargs):\n"
        "    seen.append(args)\n"
        "    return original(this, *args, **kwargs)\n")
    proc = workspace.run_python("""
    import _thread, asyncio, sys, threading, toymod, filtered_handlers
    e = toymod.Engine()

    def step(n):
        e.helper(n)                      # a custom handler honours the filter too
        return e.schedule(n)             # `step` is the direct caller

    def elsewhere(n):
        e.helper(n)
        return e.schedule(n)

    def outer():
        return inner()

    def inner():
        return toymod.forward([1, 2])    # `outer` is two frames up

    async def consume():
        return await e.serve(4)

    async def other():
        return await e.serve(5)

    results = [step(1), elsewhere(2), outer(), toymod.forward([1])]
    try:
        results.append(e.schedule(3))    # module level: a stack only one frame deep
    except Exception as exc:
        results.append(repr(exc))
    results += [asyncio.run(consume()), asyncio.run(other())]

    # No Python frame at all below the wrapper: the wrapped function is a raw thread's target.
    escaped = []
    sys.unraisablehook = lambda unraisable: escaped.append(repr(unraisable.exc_value))
    done = threading.Event()

    class Ids(list):
        def __len__(self):
            done.set()
            return 7

    _thread.start_new_thread(toymod.forward, (Ids(),))
    results.append(done.wait(10))
    print(results, escaped, filtered_handlers.seen)
    """)
    assert proc.stdout.strip() == "[1, 2, 2, 1, 3, 4, 5, True] [] [(1,)]"
    run = workspace.single_run()
    assert [r[4] for r in run.spans("schedule")] == [{"n": 1}]
    assert len(run.spans("forward")) == 1  # from outer(); not the direct call, not the raw thread
    assert len(run.spans("serve")) == 1


def test_generator_spans_cover_the_whole_iteration(workspace: Workspace) -> None:
    workspace.write_config()
    workspace.write_symbols("- symbol: toymod:Engine.tokens\n- symbol: toymod:Engine.stream\n")
    proc = workspace.run_python("""
    import asyncio, time, toymod
    e = toymod.Engine()
    PAUSE = 0.05

    t0 = time.perf_counter_ns()
    for _ in e.tokens(3):
        time.sleep(PAUSE)                   # the consumer's time inside the loop
    sync_ns = time.perf_counter_ns() - t0

    async def consume():
        async for _ in e.stream(3):
            await asyncio.sleep(PAUSE)

    async def timed():
        t0 = time.perf_counter_ns()
        await consume()
        return time.perf_counter_ns() - t0

    print(sync_ns, asyncio.run(timed()))
    """)
    sync_ns, async_ns = map(int, proc.stdout.split())
    run = workspace.single_run()
    for name, consumer_ns in (("tokens", sync_ns), ("stream", async_ns)):
        (span,) = run.spans(name)
        duration = span[2] - span[1]
        assert duration >= 3 * 50_000_000, (name, duration)  # all three pauses fall inside the span
        assert duration <= consumer_ns, (name, duration, consumer_ns)


FLAKY = '''
def parse(x):
    if x < 0:
        raise ValueError(f"bad {x}")
    return x

def parse_with_attrs(x):
    return parse(x)
'''


def test_a_target_that_raises_ten_times_in_a_row_stays_patched(workspace: Workspace) -> None:
    (workspace.root / "flaky.py").write_text(FLAKY)
    workspace.write_config()
    workspace.write_symbols("""
    - symbol: flaky:parse
    - symbol: flaky:parse_with_attrs
      attributes: [{name: x, expr: x}]
    """)
    proc = workspace.run_python("""
    import flaky
    seen = []
    for fn in (flaky.parse, flaky.parse_with_attrs):
        for i in range(1, 11):
            try:
                fn(-i)
            except ValueError as exc:       # the engine's own exception, unchanged
                seen.append(str(exc) == f"bad {-i}")
        seen.append([fn(k) for k in (1, 2, 3)])
    print(seen.count(True), seen[10], seen[21], hasattr(flaky.parse, "__wrapped__"))
    """)
    assert proc.stdout.split("\n")[0] == "20 [1, 2, 3] [1, 2, 3] True"
    run = workspace.single_run()
    plain = run.spans("parse")
    # parse_with_attrs calls parse, so parse has its own 13 calls plus 13 nested ones.
    assert len(plain) == 26
    assert [r[4] for r in plain[:10]] == [{"error": "ValueError"}] * 10
    assert [r[4] for r in plain[10:13]] == [None] * 3
    with_attrs = run.spans("parse_with_attrs")
    assert [r[4] for r in with_attrs] == [{"error": "ValueError"}] * 10 + [{"x": k} for k in (1, 2, 3)]
    patch = run.of_type("patch")[-1]
    assert sorted(patch["applied"]) == ["flaky:parse", "flaky:parse_with_attrs"] and patch["failed"] == []


HANDLERS = '''
def broken(original, this, *args, **kwargs):
    result = original(this, *args, **kwargs)
    raise RuntimeError("handler bug")
'''


def test_failure_counts_reach_the_raw_file(workspace: Workspace) -> None:
    (workspace.root / "myhandlers.py").write_text(HANDLERS)
    workspace.write_config()
    workspace.write_symbols("""
    - symbol: toymod:forward
      attributes:
        - {name: first, expr: "input_ids[0]"}
        - {name: n, expr: "len(input_ids)"}
    - symbol: toymod:Engine.schedule
      handler: myhandlers:broken
    """)
    proc = workspace.run_python("""
    import toymod
    e = toymod.Engine()
    out = [toymod.forward([]) for _ in range(10)] + [toymod.forward([7])]
    out += [e.schedule(i) for i in range(4)]
    print(out)
    """)
    assert proc.stdout.strip() == "[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 2, 3]"
    assert proc.stderr.count("input_ids[0]") == 1  # the log says it once
    data = read_run(workspace.prof_dir)
    (process,) = data.processes
    first = [w for w in process.warnings if "'first'" in w]
    handler = [w for w in process.warnings if "handler" in w]
    assert len(first) == 1 and first[-1].endswith("(x10)") and "IndexError" in first[-1], first
    assert handler[-1].endswith("(x4)") and "handler bug" in handler[-1], handler
    # `inspect` shows each warning once, with its final count.
    info = describe_run(data)
    (warnings,) = [p["warnings"] for p in info["processes"]]
    assert [w for w in warnings if "'first'" in w] == [first[-1]]
    report = format_report(info)
    assert report.count("input_ids[0]") == 1 and "(x10)" in report and "(x4)" in report


def test_bad_expression_is_reported_at_load_before_the_target_is_imported(workspace: Workspace) -> None:
    workspace.write_config()
    workspace.write_symbols("""
    - symbol: toymod:forward
    - symbol: toymod:Engine.schedule
      attributes:
        - {name: good, expr: n}
        - {name: broken, expr: "len(n"}
    """)
    proc = workspace.run_python("""
    import sys
    print("toymod" in sys.modules)
    import toymod
    print(toymod.Engine().schedule(4))
    """)
    assert proc.stdout.split() == ["False", "4"]
    (line,) = [text for text in proc.stderr.splitlines() if "'broken'" in text]
    assert str(workspace.symbols) in line
    assert "entry 2" in line and "toymod:Engine.schedule" in line
    assert "column 6" in line and 'in "len(n"' in line
    # Reported before the import: the warning precedes the start-up summary; the probe keeps `good`.
    lines = proc.stderr.splitlines()
    assert lines.index(line) < next(i for i, text in enumerate(lines) if "awaiting import" in text)
    run = workspace.single_run()
    assert [r[4] for r in run.spans("schedule")] == [{"good": 4}]
    assert sum("'broken'" in w["msg"] for w in run.of_type("warn")) == 1


def test_patch_report_written_when_only_skipped(workspace: Workspace) -> None:
    workspace.write_config()
    workspace.write_symbols('- symbol: yaml:safe_load\n  min_version: "99.0"\n')
    workspace.run_python("print('nothing to profile here')\n")
    run = workspace.single_run()
    (patch,) = run.of_type("patch")
    assert patch["applied"] == [] and patch["failed"] == [] and patch["pending"] == []
    assert [s["symbol"] for s in patch["skipped"]] == ["yaml:safe_load"] and "99.0" in patch["skipped"][0]["reason"]
    (process,) = describe_run(read_run(workspace.prof_dir))["processes"]
    assert process["patch"]["skipped"] == patch["skipped"]


def test_patch_report_at_start_is_updated_by_lazy_patches(workspace: Workspace) -> None:
    workspace.write_config()
    workspace.write_symbols("""
    - symbol: toymod:Engine.schedule
    - symbol: yaml:safe_load
      min_version: "99.0"
    """)
    workspace.run_python("""
    import toymod
    toymod.Engine().schedule(1)
    """)
    run = workspace.single_run()
    start, *_, last = run.of_type("patch")
    assert start["applied"] == [] and start["pending"] == ["toymod:Engine.schedule"]
    assert [s["symbol"] for s in start["skipped"]] == ["yaml:safe_load"]
    assert last["applied"] == ["toymod:Engine.schedule"] and last["pending"] == []
    assert last["skipped"] == start["skipped"]


def test_patch_report_of_a_process_where_nothing_matched_yet(workspace: Workspace) -> None:
    workspace.write_config(host_system_usage_freq=80)  # a warning: this process writes a file
    workspace.write_symbols("- symbol: toymod:Engine.schedule\n")
    workspace.run_python("print('toymod never imported')\n")
    run = workspace.single_run()
    (patch,) = run.of_type("patch")
    assert patch["pending"] == ["toymod:Engine.schedule"] and patch["applied"] == []
    (process,) = read_run(workspace.prof_dir).processes
    assert process.patch is not None and process.patch["applied"] == []


ASYNC_TARGETS = '''
import asyncio

class Server:
    def __init__(self):
        self.calls = 0

    async def handle(self, v):
        self.calls += 1
        await asyncio.sleep(0)
        return v * 2

    async def fail(self, v):
        self.calls += 1
        await asyncio.sleep(0)
        raise KeyError("engine-owned")
'''

ASYNC_HANDLERS = '''
from service_profiler import record

async def records(original, this, *args, **kwargs):
    t0 = record.now_ns()
    result = await original(this, *args, **kwargs)
    record.span("Custom", "handle", t0, record.now_ns(), {"v": args[0], "result": result})
    record.event("Custom", "handled", {"v": args[0]})
    record.counter("Custom", "calls", {"calls": this.calls})
    record.meta("server", "asyncsrv")
    return result

async def raises_before(original, this, *args, **kwargs):
    raise RuntimeError("handler bug")

async def calls_twice(original, this, *args, **kwargs):
    await original(this, *args, **kwargs)
    return await original(this, *args, **kwargs)

async def swallows(original, this, *args, **kwargs):
    try:
        return await original(this, *args, **kwargs)
    except Exception:
        return "swallowed"
'''


def test_async_custom_handlers_record_through_the_api_and_never_change_the_engine(workspace: Workspace) -> None:
    # The reference's handler contract for an async target: `await handler(original, this, *args)`.
    # Whatever the handler does, the engine's coroutine runs once, returns its own result and raises its
    # own exception; the recording API (span, event, counter, meta) works from inside the handler.
    (workspace.root / "asyncsrv.py").write_text(ASYNC_TARGETS)
    (workspace.root / "asynchandlers.py").write_text(ASYNC_HANDLERS)
    results = {}
    for handler, method in (("records", "handle"), ("raises_before", "handle"), ("calls_twice", "handle"),
                            ("swallows", "fail")):
        workspace.write_config()
        workspace.write_symbols(f"- symbol: asyncsrv:Server.{method}\n  handler: asynchandlers:{handler}\n")
        proc = workspace.run_python(f"""
        import asyncio, asyncsrv
        async def main():
            s = asyncsrv.Server()
            try:
                out = [await s.{method}(3), await s.{method}(4)]
            except KeyError as exc:
                out = ["engine error passes", str(exc)]
            print(out, s.calls)
        asyncio.run(main())
        """)
        results[handler] = proc.stdout.strip()
        if handler == "records":
            run = workspace.single_run()
            spans = run.spans("handle")
            assert [s[4] for s in spans] == [{"v": 3, "result": 6}, {"v": 4, "result": 8}]
            assert [r[3] for r in run.spans("handled")] == [{"v": 3}, {"v": 4}]
            assert [r[2] for r in run.spans("calls")] == [{"calls": 1}, {"calls": 2}]
            assert {"t": "meta", "key": "server", "value": "asyncsrv"}.items() <= run.of_type("meta")[-1].items()
        if handler == "raises_before":
            warnings = [w["msg"] for w in workspace.single_run().of_type("warn")]
            assert any("handler bug" in w for w in warnings), warnings
        for path in workspace.prof_dir.rglob("*.sprof.jsonl"):
            path.unlink()
    assert results == {
        "records": "[6, 8] 2",
        "raises_before": "[6, 8] 2",  # the original still runs once per call
        "calls_twice": "[6, 8] 2",  # a second `await original` gets the first result, not a second run
        "swallows": "['engine error passes', \"'engine-owned'\"] 1",
    }
