"""Request timings as the client sees them, and their breakdown (docs/METRICS.md has the definitions).

`add_breakdown` takes the request table (`request_table.build_request_table`) and, for the requests the
HTTP server recorded (`Request/httpExchange`, see engines/vllm/vllm_http.py), measures TTFT and e2e from
the HTTP arrival to the bytes written; it appends the milestones and a breakdown whose parts add up to
`e2e_ms`:

  http_arrival -> body_received -> handoff -> first_scheduled -> engine_first_token
  -> first_token_sent -> last_byte_sent

  http_receive_ms + preprocess_ms + engine_queue_ms + engine_prefill_ms + first_token_delivery_ms
  (= ttft_ms) + decode_delivery_ms (= e2e_ms).

Milestones come from three processes; a milestone recorded before the one it follows (clocks of two
hosts, an engine step ending after the API server already had the token) is taken at the previous
one, so its part is 0 and the parts still add up. A part whose milestone is missing is empty.

vLLM's own definitions are kept as `engine_ttft_ms` / `engine_e2e_ms` (what its Prometheus
histograms observe): from its `arrival_time` to the API server's output processing of the first /
last token.
"""

from __future__ import annotations

from typing import Any

from service_profiler.columns import BREAKDOWN_COLUMNS, PART_COLUMNS  # noqa: F401 (shared names)
from service_profiler.rawdata.rawfile import SpanRecord

from .tables import MS, RecordIndex, Table

HTTP_EVENT = "httpExchange"



class HttpTimes:
    """One exchange's times in epoch ns (None where it did not happen)."""

    __slots__ = ("arrival", "body_received", "first_body", "last_body", "response_start", "status")

    def __init__(self, ts: int, attrs: dict[str, Any]) -> None:
        def at(key: str) -> int | None:
            offset = attrs.get(key)
            return ts + offset if isinstance(offset, int) and not isinstance(offset, bool) else None

        self.arrival = ts
        self.body_received = at("body_received")
        self.response_start = at("response_start")
        self.first_body = at("first_body")
        self.last_body = at("last_body")
        status = attrs.get("status")
        self.status = status if isinstance(status, int) else None

    def first_token_sent(self, stream: bool) -> int | None:
        """Streamed: the first non-empty body write (vLLM writes nothing before the first output).
        Otherwise the response's first bytes: a client sees no token before them."""
        return self.first_body if stream else (self.response_start or self.first_body)


def http_times_by_rid(idx: RecordIndex) -> dict[Any, HttpTimes]:
    """Engine request id -> the first HTTP exchange that handed it to the engine."""
    found: dict[Any, HttpTimes] = {}
    for e in idx.events("Request", HTTP_EVENT):
        a = e.attrs
        rids = a.get("rids") if a else None
        if not isinstance(rids, list):
            continue
        times = HttpTimes(e.ts_ns, a)  # type: ignore[arg-type]
        for rid in rids:
            if isinstance(rid, str | int) and rid not in found:
                found[rid] = times
    return found


def engine_first_tokens(spans: list[SpanRecord], batches: Table, rids: set[Any]) -> dict[Any, int]:
    """When the engine produced each rid's first token: the end of the step (its update_from_output,
    else its model run, else its schedule span) of the first batch that completed the rid's prefill or
    decoded it. Entries: [rid, phase, scheduled, computed_before, prompt_tokens, ...]."""
    found: dict[Any, int] = {}
    if not rids:
        return found
    need = set(rids)
    c = {name: i for i, name in enumerate(batches.columns)}
    upd, model, end = c["update_end_ns"], c["model_end_ns"], c["end_ns"]
    rows = batches.rows
    for i, span in enumerate(spans):
        reqs = (span.attrs or {}).get("reqs") or ()
        for x in reqs:
            try:
                rid = x[0]
                if rid in need and (x[1] != 0 or (len(x) > 4 and x[3] + x[2] >= x[4])):
                    row = rows[i]
                    found[rid] = row[upd] or row[model] or row[end]
                    need.discard(rid)
            except (TypeError, IndexError):  # a malformed entry costs itself
                continue
        if not need:
            break
    return found


def _ms(a: int | None, b: int | None) -> float | None:
    return None if a is None or b is None else (b - a) / MS


def _parts(milestones: list[int | None]) -> list[float | None]:
    """Consecutive differences, each milestone taken no earlier than the one before it."""
    parts: list[float | None] = []
    prev: int | None = milestones[0]
    for ts in milestones[1:]:
        if ts is None or prev is None:
            parts.append(None)
            prev = ts if prev is None else (None if ts is None else max(ts, prev))
            continue
        ts = max(ts, prev)
        parts.append((ts - prev) / MS)
        prev = ts
    return parts


def add_breakdown(idx: RecordIndex, requests: Table, batches: Table, spans: list[SpanRecord]) -> Table:
    """The request table with client-facing `arrival_ns`/`ttft_ms`/`e2e_ms` where the HTTP server was
    recorded, and BREAKDOWN_COLUMNS appended (a new Table; rows in the same order)."""
    c = {name: i for i, name in enumerate(requests.columns)}
    rid_i, arrival_i, eng_arr_i = c["rid"], c["arrival_ns"], c["engine_arrival_ns"]
    sched_i, first_i, done_i = c["first_scheduled_ns"], c["first_token_ns"], c["completion_ns"]
    ttft_i, e2e_i, src_i = c["ttft_ms"], c["e2e_ms"], c["timing_source"]
    http = http_times_by_rid(idx)
    handoffs: dict[Any, tuple[int, dict[str, Any]]] = {}
    for e in reversed(idx.events("Request", "httpReq")):
        if e.attrs:
            handoffs[e.attrs.get("rid")] = (e.ts_ns, e.attrs)
    engine_first = engine_first_tokens(spans, batches, {r[rid_i] for r in requests.rows if r[rid_i] in http})
    rows: list[tuple[Any, ...]] = []
    for row in requests.rows:
        rid = row[rid_i]
        handoff, req_attrs = handoffs.get(rid, (None, {}))
        stream = req_attrs.get("stream") if isinstance(req_attrs.get("stream"), bool) else None
        vllm_arrival = _epoch_ns(req_attrs.get("arrival_time"))
        api_side = row[src_i] == "api"
        engine_ttft = _ms(vllm_arrival, row[first_i]) if api_side else None
        engine_e2e = _ms(vllm_arrival, row[done_i]) if api_side else None
        times = http.get(rid)
        if times is None:
            source = "api" if handoff is not None else ("engine" if row[eng_arr_i] is not None else None)
            extra: tuple[Any, ...] = (source, stream, None, None, None, handoff, None, None, None, vllm_arrival,
                                      None, None, None, None, None, None, engine_ttft, engine_e2e)
            rows.append(row + extra)
            continue
        first_sent = times.first_token_sent(bool(stream))
        milestones = [times.arrival, times.body_received, handoff, row[sched_i], engine_first.get(rid),
                      first_sent, times.last_body]
        parts = _parts(milestones)
        new = list(row)
        new[arrival_i] = times.arrival
        new[ttft_i] = _ms(times.arrival, first_sent)
        new[e2e_i] = _ms(times.arrival, times.last_body)
        rows.append((*new, "http", stream, times.status, times.arrival, times.body_received, handoff,
                     engine_first.get(rid), first_sent, times.last_body, vllm_arrival, *parts, engine_ttft,
                     engine_e2e))
    return Table(requests.name, [*requests.columns, *BREAKDOWN_COLUMNS], rows)


def _epoch_ns(seconds: Any) -> int | None:
    """vLLM's `arrival_time` (epoch seconds, float) in epoch ns."""
    if isinstance(seconds, int | float) and not isinstance(seconds, bool) and seconds > 0:
        return round(seconds * 1e9)
    return None
