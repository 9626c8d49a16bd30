"""The vLLM handlers' contract and joins: host-first behaviour, super() overrides, domain filtering,
the API server's request ids, the live console, the shipped YAMLs against the installed vLLM, and the
whole chain inside a real `vllm serve` (CPU build, tiny local model)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import vllm_scheduler_harness as h
from vllm.sampling_params import RequestOutputKind, SamplingParams
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreRequest, FinishReason
from vllm.v1.engine.input_processor import InputProcessor
from vllm.v1.engine.output_processor import OutputProcessor, OutputProcessorOutput
from vllm.v1.request import Request

from service_profiler import record
from service_profiler.engines.vllm import console, vllm_extract, vllm_v1
from service_profiler.runtime import patching, symbols

pytestmark = pytest.mark.vllm

CONFIG = Path(__file__).parent.parent / "service_profiler" / "engines" / "vllm"


@pytest.fixture
def rec() -> Iterator[record.CapturedRecords]:
    with h.capturing() as captured:
        yield captured


attrs = h.attrs


# ------------------------------------------------------------------------------- host-first contract


def test_the_engines_exception_passes_through_unchanged(rec: record.CapturedRecords) -> None:
    scheduler = h.make_scheduler()
    boom = RuntimeError("scheduler bug")

    def failing_schedule(this: Scheduler) -> None:
        raise boom

    with pytest.raises(RuntimeError) as raised:
        vllm_v1.schedule_handler(failing_schedule, scheduler)
    assert raised.value is boom
    assert vllm_v1.STATE.busy == set() and vllm_v1.STATE.current_batch is None
    assert rec.of("BatchSchedule", "batchFrameworkProcessing") == []
    h.add(scheduler, h.make_request("a", h.prompt_of(8)))
    h.step(scheduler)  # the next step is recorded normally
    assert [a["batch_id"] for a in attrs(rec, "BatchSchedule", "batchFrameworkProcessing")] == [1]


def test_a_failing_extraction_is_counted_and_the_result_returned(rec: record.CapturedRecords) -> None:
    scheduler = h.make_scheduler()
    odd = object()  # not a SchedulerOutput: every read fails
    assert vllm_v1.schedule_handler(lambda this: odd, scheduler) is odd
    assert vllm_v1.STATE.failures == {"schedule": 1}
    assert ("meta", "", "vllm_handler_failures", {"value": {"schedule": 1}}) in rec


def test_results_are_the_engines_own(rec: record.CapturedRecords) -> None:
    scheduler = h.make_scheduler()
    h.add(scheduler, h.make_request("a", h.prompt_of(8)))
    out = vllm_v1.schedule_handler(Scheduler.schedule, scheduler)
    model_output = h.made_up_output(scheduler, out)
    expected_ids = list(out.num_scheduled_tokens)
    result = vllm_v1.update_from_output_handler(Scheduler.update_from_output, scheduler, out, model_output)
    assert [o.request_id for o in result[0].outputs] == expected_ids
    assert result[0].outputs[0].new_token_ids == [h.TOKEN]


class SuperCallingScheduler(Scheduler):
    """Like vllm-ascend's BalanceScheduler: overrides `schedule` and calls the base class's."""

    def schedule(self, throttle_prefills: bool = False):  # type: ignore[no-untyped-def]
        return super().schedule(throttle_prefills)


def test_an_override_calling_super_is_recorded_once(rec: record.CapturedRecords) -> None:
    targets = [(Scheduler, "schedule", vllm_v1.schedule_handler),
               (SuperCallingScheduler, "schedule", vllm_v1.schedule_handler)]
    scheduler = h.make_scheduler(scheduler_class=SuperCallingScheduler)
    h.add(scheduler, h.make_request("a", h.prompt_of(8)))
    with h.patched(targets):
        scheduler.schedule()
        scheduler.schedule()
    assert [a["batch_id"] for a in attrs(rec, "BatchSchedule", "batchFrameworkProcessing")] == [0, 1]


def test_filtered_domains_keep_the_joins(rec: record.CapturedRecords) -> None:
    scheduler = h.make_scheduler()
    h.add(scheduler, h.make_request("a", h.prompt_of(8), max_tokens=2))
    with record.capture(domains=frozenset({"Request"})) as only_requests:
        h.step(scheduler)
        h.step(scheduler)
    assert {(kind, domain) for kind, domain, _, _ in only_requests if kind != "meta"} == {("event", "Request")}
    assert attrs(only_requests, "Request", "state") == [
        {"rid": "a", "from": "WAITING", "to": "RUNNING", "batch_id": 0},
        {"rid": "a", "from": "RUNNING", "to": "FINISHED_LENGTH_CAPPED", "reason": "length", "batch_id": 1}]


def test_a_batch_scheduled_before_collection_started_is_not_joined(rec: record.CapturedRecords) -> None:
    scheduler = h.make_scheduler()
    h.add(scheduler, h.make_request("a", h.prompt_of(8), max_tokens=2))
    out = Scheduler.schedule(scheduler)  # not through the handler: collection was off
    vllm_v1.update_from_output_handler(Scheduler.update_from_output, scheduler, out,
                                       h.made_up_output(scheduler, out))
    assert rec.of("ModelExecute", "modelExec") == [] and vllm_v1.STATE.failures == {}


# --------------------------------------------------------------------------------------- API server


def _engine_core_request(api_id: str, max_tokens: int = 3) -> EngineCoreRequest:
    params = SamplingParams(max_tokens=max_tokens, output_kind=RequestOutputKind.DELTA, detokenize=False)
    return EngineCoreRequest(request_id=api_id, prompt_token_ids=[1, 2, 3, 4], mm_features=None,
                             sampling_params=params, pooling_params=None, arrival_time=time.time(),
                             lora_request=None, cache_salt=None, data_parallel_rank=None)


def _process(processor: OutputProcessor, outputs: list[EngineCoreOutput]) -> Any:
    return vllm_v1.api_process_outputs_handler(OutputProcessor.process_outputs, processor, outputs)


def test_api_and_engine_request_ids_join(rec: record.CapturedRecords) -> None:
    processor = OutputProcessor(None, log_stats=False)
    request = _engine_core_request("cmpl-abc-0")
    InputProcessor.assign_request_id(request)  # what AsyncLLM.add_request does
    vllm_v1.api_add_request_handler(OutputProcessor.add_request, processor, request, None, None, 0, None)
    scheduler = h.make_scheduler()
    h.add(scheduler, Request.from_engine_core_request(request, None))  # in the EngineCore

    rid = request.request_id
    assert rid.startswith("cmpl-abc-0-") and len(rid) == len("cmpl-abc-0-") + 8
    http_req = attrs(rec, "Request", "httpReq")
    assert http_req == [{"rid": rid, "api_rid": "cmpl-abc-0", "prompt_tokens": 4, "max_tokens": 3,
                         "stream": True, "arrival_time": request.arrival_time}]
    assert attrs(rec, "Request", "enqueue")[0]["rid"] == http_req[0]["rid"]

    _process(processor, [EngineCoreOutput(request_id=rid, new_token_ids=[5])])
    _process(processor, [EngineCoreOutput(request_id=rid, new_token_ids=[6, 7],
                                          finish_reason=FinishReason.LENGTH)])
    assert attrs(rec, "Request", "tokens") == [{"reqs": [(rid, 1, 0, None)]}, {"reqs": [(rid, 2, 1, "length")]}]
    assert attrs(rec, "Request", "httpRes") == [{"rid": rid, "output_tokens": 3, "finish_reason": "length"}]
    assert vllm_v1.STATE.api_tokens == {}


def test_a_client_abort_ends_the_request_once(rec: record.CapturedRecords) -> None:
    processor = OutputProcessor(None, log_stats=False)
    request = _engine_core_request("chatcmpl-x")
    InputProcessor.assign_request_id(request)
    vllm_v1.api_add_request_handler(OutputProcessor.add_request, processor, request, None, None, 0, None)
    rid = request.request_id
    _process(processor, [EngineCoreOutput(request_id=rid, new_token_ids=[5])])
    vllm_v1.api_abort_handler(OutputProcessor.abort_requests, processor, [rid], True)
    # The engine's own abort output arrives later; vLLM ignores it, and so do the handlers.
    _process(processor, [EngineCoreOutput(request_id=rid, new_token_ids=[], finish_reason=FinishReason.ABORT)])
    assert attrs(rec, "Request", "httpRes") == [{"rid": rid, "output_tokens": 1, "finish_reason": "abort"}]
    assert attrs(rec, "Request", "tokens") == [{"reqs": [(rid, 1, 0, None)]}]


def test_a_stop_string_found_by_the_detokenizer_finishes_with_stop() -> None:
    outputs = [EngineCoreOutput(request_id="r", new_token_ids=[5, 6]),
               EngineCoreOutput(request_id="s", new_token_ids=[8])]
    result = OutputProcessorOutput(request_outputs=[], reqs_to_abort=["r"])
    assert vllm_extract.emitted_tokens(outputs, result, set()) == [("r", 2, 1, "stop"), ("s", 1, 0, None)]


# ------------------------------------------------------------------------------------- live console


def test_console_prints_every_n_steps() -> None:
    lines: list[str] = []
    ticks = iter(range(0, 100))
    window = console.ConsoleWindow(every_n=lambda: 2, write=lines.append, clock=lambda: float(next(ticks)),
                                   min_interval_s=0.0)
    h.reset_state()
    vllm_v1.STATE.console = window
    scheduler = h.make_scheduler()
    h.add(scheduler, h.make_request("a", h.prompt_of(20), max_tokens=3))
    h.add(scheduler, h.make_request("b", h.prompt_of(12, 100), max_tokens=3))
    with record.capture(domains=frozenset()):  # the console does not need any domain recorded
        for _ in range(4):
            h.step(scheduler)
    assert len(lines) == 2  # the clock ticks 1 s per step: 2 steps from the first step's start
    first = lines[0]
    assert first.startswith("[service-profiler] dp0 batch 1 | 2.0 steps/s | 17.0 tok/step (P 16.0 D 1.0) | "
                            "reqs/step P 1.0 D 1.0 | running 2 waiting 0 | KV 0.3% 3/999 | sched ")
    assert first.endswith(" ms")


def test_console_is_rate_limited_and_silent_when_off() -> None:
    lines: list[str] = []
    now = [0.0]
    window = console.ConsoleWindow(every_n=lambda: 1, write=lines.append, clock=lambda: now[0],
                                   min_interval_s=0.2)
    entry = [("a", 1, 1, 10, 10, 0)]
    for _ in range(10):  # ten steps within 0.2 s: a single line, for the whole window
        now[0] += 0.019
        window.on_schedule(9, 0, entry, 1, 0, 1, 10, 0.1, 1000)
    now[0] += 0.1
    window.on_schedule(10, 0, entry, 1, 0, 1, 10, 0.1, 1000)
    # 11 steps from the first (at 0.019 s) to 0.29 s
    assert len(lines) == 1 and "batch 10 | 40.6 steps/s" in lines[0]
    off = console.ConsoleWindow(every_n=lambda: 0, write=lines.append)
    assert not off.recheck() and off.on_schedule(1, 0, entry, 1, 0, 1, 10, 0.1, 1000) is None


def test_a_changed_console_setting_takes_effect_within_the_recheck_interval() -> None:
    # The schedule handler reads the setting every RECHECK_STEPS steps, not at every step.
    lines: list[str] = []
    setting = [0]
    window = console.ConsoleWindow(every_n=lambda: setting[0], write=lines.append, min_interval_s=0.0)
    h.reset_state()
    vllm_v1.STATE.console = window
    scheduler = h.make_scheduler()
    h.add(scheduler, h.make_request("a", h.prompt_of(20), max_tokens=10 * console.RECHECK_STEPS))
    with record.capture(domains=frozenset()):
        h.step(scheduler)
        setting[0] = 1  # the config file changed
        for _ in range(console.RECHECK_STEPS - 1):
            h.step(scheduler)
        assert lines == []  # not yet read again
        h.step(scheduler)
        assert len(lines) == 1
        setting[0] = 0
        for _ in range(console.RECHECK_STEPS):
            h.step(scheduler)
        silent_from = len(lines)
        for _ in range(console.RECHECK_STEPS):
            h.step(scheduler)
        assert len(lines) == silent_from  # off again


# ---------------------------------------------------------------------------------- shipped symbols


@pytest.mark.parametrize("name", ["vllm_v1.yaml", "vllm_ascend.yaml"])
def test_shipped_symbols_resolve(name: str) -> None:
    """Every vLLM symbol exists in the installed vLLM and every handler is importable. vllm-ascend's
    own symbols are checked against its source by `service-profiler check --source` (not installed)."""
    loaded = symbols.load_symbols(CONFIG / name)
    assert loaded.problems == [] and loaded.specs
    for spec in loaded.specs:
        if spec.handler != symbols.TIMER:
            module_name, _, func = spec.handler.partition(":")
            assert callable(getattr(__import__(module_name, fromlist=[func]), func)), spec.handler
        if spec.module.split(".")[0] not in ("vllm", "uvicorn"):  # uvicorn: the HTTP server vLLM runs on
            assert spec.module.startswith("vllm_ascend."), spec.symbol
            continue
        module = __import__(spec.module, fromlist=["_"])
        target = patching.resolve(module, spec.qualname)
        assert target.kind == "method", spec.symbol


def test_vllm_v1_yaml_admits_the_installed_vllm() -> None:
    loaded = symbols.load_symbols(CONFIG / "vllm_v1.yaml")
    gated = {spec.symbol: symbols.version_gate(spec) for spec in loaded.specs}
    assert {symbol: why for symbol, why in gated.items() if why} == {}
    at_033 = {spec.symbol for spec in loaded.specs if symbols.version_gate(spec, "0.33.0", engine="vllm")}
    assert at_033 == {"vllm.v1.executor.ray_executor:RayDistributedExecutor.execute_model"}


# ------------------------------------------------------------------------------- inside vllm serve


@pytest.mark.slow
def test_shipped_symbols_inside_vllm_serve(tiny_model: Path, tmp_path: Path) -> None:
    from vllm_service import LEAVING_MAX_MODEL_LEN, LEAVING_MAX_TOKENS, complete, leave_until_aborted, running_server

    from service_profiler.rawdata.rawfile import read_run

    config, prof_dir = tmp_path / "config.json", tmp_path / "prof"
    config.write_text(json.dumps({"enable": 1, "prof_dir": str(prof_dir), "console_every_n_steps": 5}))
    env = {"SERVICE_PROF_CONFIG_PATH": str(config),
           "PROFILING_SYMBOLS_PATH": str(CONFIG / "vllm_v1.yaml")}
    with running_server(tiny_model, tmp_path / "server.log", profiler_env=env,
                        max_model_len=LEAVING_MAX_MODEL_LEN) as server:
        done = [complete(server, f"request {i} says", 6, stream=i % 2 == 1) for i in range(4)]
        # long enough (> 0.2 s of steps) for the console's first line, which is rate limited
        done.append(complete(server, "a longer answer", 120))
        # a streaming client that goes away after the first chunk, so vLLM aborts the request
        left_early, missed = leave_until_aborted(server, "a client that leaves", after_chunks=1)
        time.sleep(2.5)  # the abort reaches the engine; the last flush
        log = server.log()
    run = read_run(prof_dir)
    assert run.problems == []

    def events(name: str) -> list[dict[str, Any]]:
        return [e.attrs or {} for e in run.events if e.name == name]

    http_req, enqueue, http_res = events("httpReq"), events("enqueue"), events("httpRes")
    assert len(http_req) == len(done) + 1 + len(missed) == len(http_res)
    assert {e["rid"] for e in http_req} == {e["rid"] for e in enqueue} == {e["rid"] for e in http_res}
    for e in http_req:
        assert e["rid"].startswith(e["api_rid"] + "-") and e["api_rid"].startswith("cmpl-")
    def rid_of(client: Any) -> str:  # the API server's id ("cmpl-...") heads its engine request ids
        return next(e["rid"] for e in http_req if e["api_rid"].startswith(client.response_id))

    left = rid_of(left_early)
    finished = {e["rid"]: (e["output_tokens"], e["finish_reason"]) for e in http_res}
    assert finished.pop(left)[1] == "abort"
    for gone_late in missed:  # the client left after its request had ended: a normal finish
        assert finished.pop(rid_of(gone_late)) == (LEAVING_MAX_TOKENS, "length")
    leaving = {left} | {rid_of(c) for c in missed}
    expected = [(6, "length")] * 4 + [(120, "length")]
    assert sorted(finished.values()) == [(c.completion_tokens, c.finish_reason) for c in done] == expected
    tokens = [entry for e in events("tokens") for entry in e["reqs"] if entry[0] not in leaving]
    assert sum(entry[1] for entry in tokens) == 4 * 6 + 120

    spans = {name: [s.attrs or {} for s in run.spans if s.name == name]
             for name in ("batchFrameworkProcessing", "modelExec", "step", "updateFromOutput")}
    batch_ids = [a["batch_id"] for a in spans["batchFrameworkProcessing"]]
    assert batch_ids == sorted(batch_ids) and len(set(batch_ids)) == len(batch_ids)
    assert {a["batch_id"] for a in spans["modelExec"]} == set(batch_ids)
    assert {a["batch_id"] for a in spans["step"] if "batch_id" in a} == set(batch_ids)
    scheduled = {entry[0] for a in spans["batchFrameworkProcessing"] for entry in a["reqs"]}
    assert scheduled == {e["rid"] for e in enqueue}
    states = sorted((e["rid"] == left, e["to"]) for e in events("state"))
    normal = 5 + len(missed)
    assert states == [(False, "FINISHED_LENGTH_CAPPED")] * normal + [(False, "RUNNING")] * normal + [
        (True, "FINISHED_ABORTED"), (True, "RUNNING")]
    assert all(p.meta.get("vllm_handler_failures") is None for p in run.processes)
    assert [p.patch["failed"] for p in run.processes if p.patch] == [[]] * len([p for p in run.processes
                                                                               if p.patch])
    assert "[service-profiler] dp0 batch " in log


def test_request_block_count_is_what_get_blocks_holds() -> None:
    scheduler = h.make_scheduler()
    for i, length in enumerate((20, 33, 70)):
        h.add(scheduler, h.make_request(f"r{i}", h.prompt_of(length, 100 * i + 1), max_tokens=40))
    manager = scheduler.kv_cache_manager
    counts = []
    for _ in range(20):
        h.step(scheduler)
        for rid in ("r0", "r1", "r2", "absent"):
            counts.append(vllm_extract.request_block_count(manager, rid))
            assert counts[-1] == vllm_extract.block_count(manager.get_blocks(rid).blocks), rid
    assert "absent" not in manager.coordinator.single_type_managers[0].req_to_blocks  # nothing added
    assert max(counts) > 2  # the requests grew past their first blocks

    class LaidOutOtherwise:  # a version without `coordinator`: counted through get_blocks
        def get_blocks(self, request_id: str) -> Any:
            return manager.get_blocks(request_id)

    assert vllm_extract.request_block_count(LaidOutOtherwise(), "r2") == counts[-2]  # type: ignore[arg-type]
