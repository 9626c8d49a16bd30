"""What the vLLM handlers record for exactly known scheduler runs: the real v1 Scheduler on CPU, driven
step by step (tests/vllm_scheduler_harness.py), every expected record written out in full."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import vllm_scheduler_harness as h

from service_profiler import record

pytestmark = pytest.mark.vllm

P, D = 0, 1  # phases in `reqs` entries


@pytest.fixture
def rec() -> Iterator[record.CapturedRecords]:
    with h.capturing() as captured:
        yield captured


attrs = h.attrs


def batches(rec: record.CapturedRecords) -> list[dict[str, Any]]:
    return attrs(rec, "BatchSchedule", "batchFrameworkProcessing")


def batch(batch_id: int, reqs: list[tuple[Any, ...]], *, running: int, waiting: int = 0, used: int,
          total: int = 999, preempted: tuple[str, ...] = (), finished: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"batch_id": batch_id, "dp_rank": 0, "reqs": reqs, "running": running, "waiting": waiting,
            "preempted": list(preempted), "finished": list(finished),
            "total_tokens": sum(entry[2] for entry in reqs), "kv_total_blocks": total, "kv_used_blocks": used,
            "kv_usage": used / total}


def state(rid: str, before: str | None, after: str, batch_id: int, reason: str | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {"rid": rid, "from": before, "to": after}
    if reason is not None:
        event["reason"] = reason
    event["batch_id"] = batch_id
    return event


def test_prefill_then_decode(rec: record.CapturedRecords) -> None:
    scheduler = h.make_scheduler()
    h.add(scheduler, h.make_request("a", h.prompt_of(20), max_tokens=3))
    h.add(scheduler, h.make_request("b", h.prompt_of(33, 100), max_tokens=3))
    for _ in range(3):
        h.step(scheduler)
    h.add(scheduler, h.make_request("c", h.prompt_of(5, 500), max_tokens=1))
    h.step(scheduler)

    assert batches(rec) == [
        batch(0, [("a", P, 20, 0, 20, 0), ("b", P, 33, 0, 33, 0)], running=2, used=5),
        batch(1, [("a", D, 1, 20, 20, 0), ("b", D, 1, 33, 33, 0)], running=2, used=5),
        batch(2, [("a", D, 1, 21, 20, 0), ("b", D, 1, 34, 33, 0)], running=2, used=5),
        batch(3, [("c", P, 5, 0, 5, 0)], running=1, used=1, finished=("a", "b")),
    ]
    assert attrs(rec, "BatchSchedule", "updateFromOutput") == [
        {"batch_id": 0, "finished": []},
        {"batch_id": 1, "finished": []},
        {"batch_id": 2, "finished": [("a", "length"), ("b", "length")]},
        {"batch_id": 3, "finished": [("c", "length")]},
    ]
    enqueued = attrs(rec, "Request", "enqueue")
    assert [(e["rid"], e["prompt_tokens"]) for e in enqueued] == [("a", 20), ("b", 33), ("c", 5)]
    assert all(isinstance(e["arrival_time"], float) for e in enqueued)
    assert attrs(rec, "Request", "state") == [
        state("a", "WAITING", "RUNNING", 0), state("b", "WAITING", "RUNNING", 0),
        state("a", "RUNNING", "FINISHED_LENGTH_CAPPED", 2, "length"),
        state("b", "RUNNING", "FINISHED_LENGTH_CAPPED", 2, "length"),
        state("c", "WAITING", "RUNNING", 3),
        state("c", "RUNNING", "FINISHED_LENGTH_CAPPED", 3, "length"),
    ]
    assert attrs(rec, "KVCache", "allocate") == [
        {"rid": "a", "blocks": 2, "batch_id": 0}, {"rid": "b", "blocks": 3, "batch_id": 0},
        {"rid": "c", "blocks": 1, "batch_id": 3}]
    assert attrs(rec, "KVCache", "free") == [
        {"rid": "a", "blocks": 2, "batch_id": 2}, {"rid": "b", "blocks": 3, "batch_id": 2},
        {"rid": "c", "blocks": 1, "batch_id": 3}]
    assert [c["values"] for c in rec.of("KVCache", "kvcache")] == [
        {"total_blocks": 999, "used_blocks": used, "usage": used / 999} for used in (5, 5, 5, 1)]
    assert [c["values"] for c in rec.of("BatchSchedule", "queues")] == [
        {"running": 2, "waiting": 0}] * 3 + [{"running": 1, "waiting": 0}]
    # Prefix caching is off: no cache lookups to report.
    assert attrs(rec, "KVCache", "cacheHit") == []


def test_a_stop_token_finishes_with_stop(rec: record.CapturedRecords) -> None:
    scheduler = h.make_scheduler()
    h.add(scheduler, h.make_request("a", h.prompt_of(8), max_tokens=10))
    h.step(scheduler)
    h.step(scheduler, tokens={"a": h.STOP_TOKEN})
    assert attrs(rec, "BatchSchedule", "updateFromOutput")[1] == {"batch_id": 1, "finished": [("a", "stop")]}
    assert attrs(rec, "Request", "state")[-1] == state("a", "RUNNING", "FINISHED_STOPPED", 1, "stop")


def test_model_exec_and_step_join_by_batch_id(rec: record.CapturedRecords) -> None:
    scheduler = h.make_scheduler()
    h.add(scheduler, h.make_request("a", h.prompt_of(20), max_tokens=2))
    h.step(scheduler)
    h.step(scheduler)

    schedule = rec.of("BatchSchedule", "batchFrameworkProcessing")
    model = rec.of("ModelExecute", "modelExec")
    update = rec.of("BatchSchedule", "updateFromOutput")
    steps = rec.of("EngineCore", "step")
    assert [m["attrs"] for m in model] == [{"batch_id": 0, "dp_rank": 0}, {"batch_id": 1, "dp_rank": 0}]
    assert [s["attrs"] for s in steps] == [{"batch_id": 0, "dp_rank": 0}, {"batch_id": 1, "dp_rank": 0}]
    for sched, run, upd, eng in zip(schedule, model, update, steps, strict=True):
        # schedule, then the model from execute_model to update_from_output, all inside the step
        assert eng["start_ns"] <= sched["start_ns"] <= sched["end_ns"] <= run["start_ns"]
        assert run["end_ns"] <= upd["start_ns"] <= upd["end_ns"] <= eng["end_ns"]


def test_chunked_prefill(rec: record.CapturedRecords) -> None:
    scheduler = h.make_scheduler(max_num_batched_tokens=32)
    h.add(scheduler, h.make_request("L", h.prompt_of(100), max_tokens=2))
    for _ in range(5):
        h.step(scheduler)

    assert batches(rec) == [
        batch(0, [("L", P, 32, 0, 100, 0)], running=1, used=2),
        batch(1, [("L", P, 32, 32, 100, 0)], running=1, used=4),
        batch(2, [("L", P, 32, 64, 100, 0)], running=1, used=6),
        batch(3, [("L", P, 4, 96, 100, 0)], running=1, used=7),
        batch(4, [("L", D, 1, 100, 100, 0)], running=1, used=7),
    ]
    assert attrs(rec, "KVCache", "allocate") == [
        {"rid": "L", "blocks": blocks, "batch_id": i} for i, blocks in enumerate((2, 2, 2, 1))]
    assert attrs(rec, "KVCache", "free") == [{"rid": "L", "blocks": 7, "batch_id": 4}]


def test_preemption_under_a_small_kv_pool(rec: record.CapturedRecords) -> None:
    # 5 blocks, the first is vLLM's null block: 4 usable, both 32-token prompts fill them.
    scheduler = h.make_scheduler(num_blocks=5)
    h.add(scheduler, h.make_request("a", h.prompt_of(32), max_tokens=3))
    h.add(scheduler, h.make_request("b", h.prompt_of(32, 100), max_tokens=3))
    for _ in range(5):
        h.step(scheduler)

    assert batches(rec) == [
        batch(0, [("a", P, 32, 0, 32, 0), ("b", P, 32, 0, 32, 0)], running=2, used=4, total=4),
        # a's 33rd token needs a 3rd block: b (last in the running queue) is preempted and waits
        batch(1, [("a", D, 1, 32, 32, 0)], running=1, waiting=1, used=3, total=4, preempted=("b",)),
        batch(2, [("a", D, 1, 33, 32, 0)], running=1, waiting=1, used=3, total=4),
        # b recomputes its prompt and its first output token, flagged as resumed
        batch(3, [("b", P, 33, 0, 32, 1)], running=1, used=3, total=4, finished=("a",)),
        batch(4, [("b", D, 1, 33, 32, 0)], running=1, used=3, total=4),
    ]
    assert attrs(rec, "Request", "state") == [
        state("a", "WAITING", "RUNNING", 0), state("b", "WAITING", "RUNNING", 0),
        state("b", "RUNNING", "PREEMPTED", 1),
        state("a", "RUNNING", "FINISHED_LENGTH_CAPPED", 2, "length"),
        state("b", "PREEMPTED", "RUNNING", 3),
        state("b", "RUNNING", "FINISHED_LENGTH_CAPPED", 4, "length"),
    ]
    assert attrs(rec, "KVCache", "free") == [
        {"rid": "b", "blocks": 2, "batch_id": 1}, {"rid": "a", "blocks": 3, "batch_id": 2},
        {"rid": "b", "blocks": 3, "batch_id": 4}]
    assert attrs(rec, "KVCache", "allocate") == [
        {"rid": "a", "blocks": 2, "batch_id": 0}, {"rid": "b", "blocks": 2, "batch_id": 0},
        {"rid": "a", "blocks": 1, "batch_id": 1}, {"rid": "b", "blocks": 3, "batch_id": 3}]


def test_abort_of_a_running_and_a_waiting_request(rec: record.CapturedRecords) -> None:
    scheduler = h.make_scheduler(max_num_seqs=1, max_num_batched_tokens=2048)
    h.add(scheduler, h.make_request("a", h.prompt_of(20), max_tokens=5))
    h.add(scheduler, h.make_request("b", h.prompt_of(20, 100), max_tokens=5))
    h.step(scheduler)
    aborted = h.abort(scheduler, ["a", "b", "unknown"])
    h.add(scheduler, h.make_request("c", h.prompt_of(4, 300), max_tokens=1))
    h.step(scheduler)

    assert sorted(request.request_id for request in aborted) == ["a", "b"]
    assert batches(rec) == [
        batch(0, [("a", P, 20, 0, 20, 0)], running=1, waiting=1, used=2),
        batch(1, [("c", P, 4, 0, 4, 0)], running=1, used=1, finished=("a", "b")),
    ]
    aborts = [event for event in attrs(rec, "Request", "state") if event["to"] == "FINISHED_ABORTED"]
    assert sorted(aborts, key=lambda event: event["rid"]) == [
        state("a", "RUNNING", "FINISHED_ABORTED", 0), state("b", "WAITING", "FINISHED_ABORTED", 0)]
    # b never held a block: only a's are freed.
    assert attrs(rec, "KVCache", "free") == [{"rid": "a", "blocks": 2, "batch_id": 0},
                                             {"rid": "c", "blocks": 1, "batch_id": 1}]


def test_prefix_cache_hits(rec: record.CapturedRecords) -> None:
    scheduler = h.make_scheduler(enable_prefix_caching=True)
    shared = h.prompt_of(32)  # two full blocks
    h.add(scheduler, h.make_request("r1", [*shared, *[901] * 8], max_tokens=2, prefix_caching=True))
    h.step(scheduler)
    h.add(scheduler, h.make_request("r2", [*shared, *[902] * 8], max_tokens=2, prefix_caching=True))
    h.step(scheduler)

    assert attrs(rec, "KVCache", "cacheHit") == [
        {"rid": "r1", "hit_tokens": 0, "query_tokens": 40, "batch_id": 0},
        {"rid": "r2", "hit_tokens": 32, "query_tokens": 40, "batch_id": 1},
    ]
    assert batches(rec) == [
        batch(0, [("r1", P, 40, 0, 40, 0)], running=1, used=3),
        # r2 starts after its 32 cached tokens and adds one block of its own
        batch(1, [("r2", P, 8, 32, 40, 0), ("r1", D, 1, 40, 40, 0)], running=2, used=4),
    ]
    assert attrs(rec, "KVCache", "allocate") == [
        {"rid": "r1", "blocks": 3, "batch_id": 0}, {"rid": "r2", "blocks": 3, "batch_id": 1}]


def test_async_scheduling_batches_in_flight(rec: record.CapturedRecords) -> None:
    """AsyncScheduler with a batch queue of 2: the next batch is scheduled before the previous
    output is processed; decode is still recognised (output placeholders) and modelExec joins."""
    scheduler = h.make_async_scheduler()
    h.add(scheduler, h.make_request("a", h.prompt_of(20), max_tokens=3))
    h.run_with_batch_queue(scheduler, steps=4)

    assert batches(rec) == [
        batch(0, [("a", P, 20, 0, 20, 0)], running=1, used=2),
        batch(1, [("a", D, 1, 20, 20, 0)], running=1, used=2),
        batch(2, [("a", D, 1, 21, 20, 0)], running=1, used=2),
        # the third token is in flight, so nothing is left to schedule for a
        batch(3, [], running=1, used=2),
    ]
    assert [m["batch_id"] for m in attrs(rec, "ModelExecute", "modelExec")] == [0, 1, 2, 3]
    assert attrs(rec, "BatchSchedule", "updateFromOutput") == [
        {"batch_id": 0, "finished": []}, {"batch_id": 1, "finished": []},
        {"batch_id": 2, "finished": [("a", "length")]}, {"batch_id": 3, "finished": []}]
    # Each step launches one batch and, once two are in flight, processes the older one's output.
    assert [s["attrs"] for s in rec.of("EngineCore", "step")] == [
        {"batch_id": 0, "dp_rank": 0}, {"batch_id": 1, "output_batch_id": 0, "dp_rank": 0},
        {"batch_id": 2, "output_batch_id": 1, "dp_rank": 0}, {"batch_id": 3, "output_batch_id": 2, "dp_rank": 0}]
