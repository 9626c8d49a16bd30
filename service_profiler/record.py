"""The public recording API for handlers: spans, instant events, counters and process metadata.

```python
from service_profiler import record
t0 = record.now_ns()
...
record.span("BatchSchedule", "batchFrameworkProcessing", t0, record.now_ns(), {"batch_id": 7})
record.event("Request", "enqueue", {"rid": "r1"})
record.counter("KVCache", "kvcache", {"usage": 0.42})
record.meta("role", "EngineCore")
record.process_ending("engine_shutdown")   # on the engine's shutdown path: flush now, with `close`
```

Every call is a cheap no-op while collection is off or its domain is filtered out, and none ever
raises. Timestamps are `now_ns()` (the monotonic clock every raw file is anchored to). Tests (and
tools) can see what would be recorded with `capture()`.

`span`, `event`, `counter` and `enabled` are the sink's own functions where it offers them
(`direct_functions`: the runtime's, in C, which do in one call what the functions below do in three),
so call them as `record.span(...)`: a name imported from here keeps the function of that moment.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Protocol

now_ns = time.perf_counter_ns
_get_ident = threading.get_ident


class RecordSink(Protocol):
    """Where records go: the runtime's recorder in an engine process, a list under `capture()`."""

    def domain_enabled(self, domain: str) -> bool: ...

    def span(self, domain: str, name: str, start_ns: int, end_ns: int, tid: int, attrs: Any) -> None: ...

    def event(self, domain: str, name: str, ts_ns: int, tid: int, attrs: Any) -> None: ...

    def counter(self, domain: str, name: str, ts_ns: int, values: Mapping[str, float]) -> None: ...

    def meta(self, key: str, value: object) -> None: ...


class _Span(Protocol):
    def __call__(self, domain: str, name: str, start_ns: int, end_ns: int,
                 attrs: Mapping[str, Any] | None = None) -> None: ...


class _Event(Protocol):
    def __call__(self, domain: str, name: str, attrs: Mapping[str, Any] | None = None,
                 ts_ns: int | None = None) -> None: ...


class _Counter(Protocol):
    def __call__(self, domain: str, name: str, values: Mapping[str, float], ts_ns: int | None = None) -> None: ...


class _Enabled(Protocol):
    def __call__(self, domain: str) -> bool: ...


RecordFunctions = tuple[_Span, _Event, _Counter, _Enabled]

_sink: RecordSink | None = None


def set_sink(sink: RecordSink | None) -> RecordSink | None:
    """Install the sink (the runtime does this on activation); returns the previous one. A sink with
    `direct_functions()` gives `span`, `event`, `counter` and `enabled` their own implementation (None
    where it has none)."""
    global _sink, span, event, counter, enabled
    previous, _sink = _sink, sink
    direct: RecordFunctions | None = None
    offer = getattr(sink, "direct_functions", None)
    if offer is not None:
        direct = offer()
    span, event, counter, enabled = direct or _through_sink
    return previous


def _enabled_py(domain: str) -> bool:
    """True when collection is on and `domain` is kept: skip building attributes otherwise."""
    sink = _sink
    return sink is not None and sink.domain_enabled(domain)


def _span_py(domain: str, name: str, start_ns: int, end_ns: int, attrs: Mapping[str, Any] | None = None) -> None:
    sink = _sink
    if sink is None or not sink.domain_enabled(domain):
        return
    try:
        sink.span(domain, name, start_ns, end_ns, _get_ident(), attrs)
    except Exception:
        pass  # the host comes first


def _event_py(domain: str, name: str, attrs: Mapping[str, Any] | None = None, ts_ns: int | None = None) -> None:
    sink = _sink
    if sink is None or not sink.domain_enabled(domain):
        return
    try:
        sink.event(domain, name, now_ns() if ts_ns is None else ts_ns, _get_ident(), attrs)
    except Exception:
        pass


def _counter_py(domain: str, name: str, values: Mapping[str, float], ts_ns: int | None = None) -> None:
    sink = _sink
    if sink is None or not sink.domain_enabled(domain):
        return
    try:
        sink.counter(domain, name, now_ns() if ts_ns is None else ts_ns, values)
    except Exception:
        pass


_through_sink: RecordFunctions = (_span_py, _event_py, _counter_py, _enabled_py)
span: _Span
event: _Event
counter: _Counter
enabled: _Enabled
"""`enabled(domain)`: True when collection is on and `domain` is kept: skip building attributes otherwise."""
span, event, counter, enabled = _through_sink


def meta(key: str, value: object) -> None:
    """Process metadata (`role`, `dp_rank`, `device`, ...); written even while collection is off."""
    sink = _sink
    if sink is None:
        return
    try:
        sink.meta(key, value)
    except Exception:
        pass


def process_ending(reason: str) -> None:
    """The process is about to end (`reason`, e.g. "engine_shutdown"): write everything recorded so far,
    with a `close` line, now, before a supervisor that force-kills slow shutdowns can cut it off.
    Blocks for one flush; call it from the engine's own shutdown path, not a hot path. Never raises."""
    sink = _sink
    flush_final = getattr(sink, "flush_final", None)
    if flush_final is None:
        return
    try:
        flush_final(reason)
    except Exception:
        pass


class CapturedRecords(list):
    """What `capture()` collected: `(kind, domain, name, payload)` tuples, in order."""

    def of(self, domain: str, name: str) -> list[dict[str, Any]]:
        """Payloads recorded under one domain/name."""
        return [payload for _, d, n, payload in self if d == domain and n == name]


class _ListSink:
    def __init__(self, into: CapturedRecords, domains: frozenset[str] | None) -> None:
        self._into = into
        self._domains = domains

    def domain_enabled(self, domain: str) -> bool:
        return self._domains is None or domain in self._domains

    def span(self, domain: str, name: str, start_ns: int, end_ns: int, tid: int, attrs: Any) -> None:
        payload = {"start_ns": start_ns, "end_ns": end_ns, "tid": tid, "attrs": dict(attrs or {})}
        self._into.append(("span", domain, name, payload))

    def event(self, domain: str, name: str, ts_ns: int, tid: int, attrs: Any) -> None:
        self._into.append(("event", domain, name, {"ts_ns": ts_ns, "tid": tid, "attrs": dict(attrs or {})}))

    def counter(self, domain: str, name: str, ts_ns: int, values: Mapping[str, float]) -> None:
        self._into.append(("counter", domain, name, {"ts_ns": ts_ns, "values": dict(values)}))

    def meta(self, key: str, value: object) -> None:
        self._into.append(("meta", "", key, {"value": value}))

    def flush_final(self, reason: str) -> None:
        self._into.append(("close", "", reason, {}))


@contextmanager
def capture(domains: frozenset[str] | None = None) -> Iterator[CapturedRecords]:
    """Collect records in memory instead of the runtime's files (for tests and tools)."""
    captured = CapturedRecords()
    previous = set_sink(_ListSink(captured, domains))
    try:
        yield captured
    finally:
        set_sink(previous)
