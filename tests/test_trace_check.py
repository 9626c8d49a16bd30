"""The strict trace validator must accept a well-formed trace and catch each kind of malformed one."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
from trace_check import MAX_PROBLEMS, validate_trace

Trace = dict[str, Any]


def _valid() -> Trace:
    """Every phase the exporter writes, plus B/E and async pairs, all well formed."""
    return {"displayTimeUnit": "ms", "traceEvents": [
        {"ph": "M", "name": "process_name", "pid": 1, "tid": 0, "args": {"name": "engine_core h:1"}},
        {"ph": "M", "name": "process_sort_index", "pid": 1, "tid": 0, "args": {"sort_index": 2}},
        {"ph": "M", "name": "process_labels", "pid": 1, "tid": 0, "args": {"labels": "dropped 1 records"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "main 7"}},
        {"ph": "M", "name": "thread_sort_index", "pid": 1, "tid": 7, "args": {"sort_index": 0}},
        {"ph": "X", "name": "step", "pid": 1, "tid": 7, "ts": 10.0, "dur": 10.0},
        {"ph": "X", "name": "schedule", "pid": 1, "tid": 7, "ts": 10.0, "dur": 2.5},
        {"ph": "X", "name": "model", "pid": 1, "tid": 7, "ts": 12.5, "dur": 7.5},  # ends with its parent
        {"ph": "X", "name": "next", "pid": 1, "tid": 7, "ts": 20.0, "dur": 0.0},
        {"ph": "B", "name": "b", "pid": 1, "tid": 7, "ts": 30.0},
        {"ph": "E", "pid": 1, "tid": 7, "ts": 31.0},
        {"ph": "i", "s": "t", "name": "enqueue", "pid": 1, "tid": 7, "ts": 11.0, "args": {"rid": "r"}},
        {"ph": "i", "s": "p", "name": "collection on", "pid": 1, "tid": 7, "ts": 0.0},
        {"ph": "C", "name": "kvcache", "pid": 1, "ts": 10.0, "args": {"usage": 0.5, "used_blocks": 3}},
        {"ph": "s", "name": "first batch", "cat": "request", "id": 1, "pid": 1, "tid": 7, "ts": 11.0},
        {"ph": "t", "name": "first batch", "cat": "request", "id": 1, "pid": 1, "tid": 7, "ts": 12.0},
        {"ph": "f", "bp": "e", "name": "first batch", "cat": "request", "id": 1, "pid": 1, "tid": 7,
         "ts": 13.0},
        {"ph": "b", "name": "req", "cat": "request", "id": "0x1", "pid": 1, "ts": 10.0},
        {"ph": "e", "name": "req", "cat": "request", "id": "0x1", "pid": 1, "ts": 15.0},
    ]}


def test_valid_trace_has_no_problems() -> None:
    assert validate_trace(_valid()) == []


def _event(trace: Trace, name: str) -> dict[str, Any]:
    return next(e for e in trace["traceEvents"] if e.get("name") == name or e.get("ph") == name)


def _set(name: str, **fields: Any) -> Callable[[Trace], None]:
    return lambda t: _event(t, name).update(fields)


def _drop(name: str, key: str) -> Callable[[Trace], None]:
    return lambda t: _event(t, name).pop(key)


def _remove(name: str) -> Callable[[Trace], None]:
    return lambda t: t["traceEvents"].remove(_event(t, name))


def _append(**event: Any) -> Callable[[Trace], None]:
    return lambda t: t["traceEvents"].append(event)


CASES: list[tuple[str, Callable[[Trace], None], str]] = [
    ("partial overlap", _set("model", dur=8.0), "partially overlaps"),
    ("X without dur", _drop("schedule", "dur"), "X needs dur"),
    ("negative dur", _set("schedule", dur=-1.0), "X needs dur"),
    ("string tid", _set("step", tid="Schedule(1)"), "tid must be an integer"),
    ("bool pid", _set("step", pid=True), "pid must be an integer"),
    ("B without E", _remove("E"), "B without a matching E"),
    ("E without B", _remove("b"), "E without an open B"),
    ("flow without id", _drop("s", "id"), "flow needs an id"),
    ("flow without cat", _drop("f", "cat"), "flow needs a cat"),
    ("bp on a flow start", _set("s", bp="e"), "bp is only allowed on f"),
    ("flow never finished", _remove("f"), "never finished"),
    ("flow finish without start", _remove("s"), "expected one s first"),
    ("flow finish before start", _set("f", ts=5.0), "expected one s first"),
    ("counter with a string", _set("kvcache", args={"usage": "50%"}), "series must be finite numbers"),
    ("counter without args", _drop("kvcache", "args"), "counter needs a non-empty args"),
    ("thread_name without args.name", _set("thread_name", args={}), "metadata needs args.name"),
    ("unknown metadata", _append(ph="M", name="thread_colour", pid=1, tid=7, args={"name": "x"}),
     "unknown metadata name"),
    ("instant scope", _set("enqueue", s="x"), "instant scope"),
    ("negative ts", _set("step", ts=-1.0), "ts must be a finite number >= 0"),
    ("infinite ts", _set("step", ts=float("inf")), "ts must be a finite number >= 0"),
    ("missing ts", _drop("enqueue", "ts"), "ts must be a finite number >= 0"),
    ("unnamed process", _append(ph="X", name="x", pid=2, tid=7, ts=1.0, dur=1.0), "no process_name"),
    ("unnamed thread", _append(ph="X", name="x", pid=1, tid=8, ts=1.0, dur=1.0), "no thread_name"),
    ("unknown phase", _append(ph="Z", name="x", pid=1, tid=7, ts=1.0), "unknown phase"),
    ("unbalanced async", _remove("e"), "unbalanced b/e"),
    ("sort index not an integer", _set("process_sort_index", args={"sort_index": "2"}),
     "sort_index must be an integer"),
    ("bad displayTimeUnit", lambda t: t.update(displayTimeUnit="s"), "displayTimeUnit"),
]


@pytest.mark.parametrize(("mutate", "expected"), [(m, e) for _, m, e in CASES], ids=[c[0] for c in CASES])
def test_validator_catches(mutate: Callable[[Trace], None], expected: str) -> None:
    trace = copy.deepcopy(_valid())
    mutate(trace)
    problems = validate_trace(trace)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("obj", [[], {"events": []}, {"traceEvents": {}}, "x"])
def test_top_level_must_be_an_object_with_a_trace_event_list(obj: Any) -> None:
    assert validate_trace(obj)


def test_problems_are_capped() -> None:
    trace = _valid()
    trace["traceEvents"] += [{"ph": "X", "name": "x", "pid": 1, "tid": 7, "ts": 1.0}] * (MAX_PROBLEMS + 5)
    problems = validate_trace(trace)
    assert len(problems) == MAX_PROBLEMS + 1
    assert problems[-1] == "... and 5 more problems"


def test_nesting_is_checked_in_integer_ns_not_float_sums() -> None:
    # 0.1 + 0.2 != 0.3 in floats; in ns the child ends exactly with its parent.
    trace = _valid()
    trace["traceEvents"] += [{"ph": "X", "name": "p", "pid": 1, "tid": 7, "ts": 100.1, "dur": 0.3},
                             {"ph": "X", "name": "c", "pid": 1, "tid": 7, "ts": 100.2, "dur": 0.2}]
    assert validate_trace(trace) == []
