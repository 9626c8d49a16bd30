"""Request lifecycles for the trace's per-request tracks.

The exporter feeds batch membership (`RequestLifecycle.changed`, `.preempted`, from the scheduler spans)
and the Request events (`read_request_events`); `request_phases` turns one lifecycle into adjacent
queued / prefill / decode / preempted slices. Kept apart from `chrome.py` so the rules for when a phase
starts are in one place, next to their reasons.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from service_profiler.analyze.request_breakdown import HTTP_EVENT, HttpTimes

if TYPE_CHECKING:
    from service_profiler.rawdata.rawfile import EventRecord


class RequestLifecycle:
    """What the batches and events say about one request. Instants follow the request table
    (`analyze/tables.py`): the first token is the API's first `tokens` event with new tokens for it,
    else the end of the step that completed its prefill; completion is the API's finishing `tokens`
    event, else `httpRes`, else the FINISHED state change, else the end of its last step."""

    # slots: the trace's membership loop reads and writes these once per batch entry
    __slots__ = ("args", "arrival", "batches", "done", "done_rank", "first_batch", "first_decode", "first_token",
                 "http", "last_done", "marks", "phase", "stream")

    def __init__(self) -> None:
        self.args: dict[str, Any] = {}
        self.arrival: int | None = None
        self.first_token: int | None = None
        self.done: int | None = None
        self.done_rank = 3
        self.marks: list[tuple[int, str]] = []  # (ts, state entered), in time order per source
        self.first_decode = -1  # index in marks of the first prefill -> decode change
        self.phase = -1  # of the last batch that ran it: 0 prefill, 1 decode, -1 none or preempted
        self.last_done = 0  # when the step of that batch ended
        self.batches = 0
        self.first_batch: tuple[int, int, int, int] | None = None  # pid, tid, start, end
        self.http: HttpTimes | None = None  # the HTTP server's view (service_profiler/engines/vllm/vllm_http.py)
        self.stream = False

    def changed(self, start: int, phase: int) -> None:
        """A batch starting at `start` runs it in a new phase (or resumes its prefill)."""
        if phase == 0:
            self.marks.append((start, "prefill"))
        elif self.phase == 0:
            if self.first_decode < 0:
                self.first_decode = len(self.marks)
            self.marks.append((min(self.last_done, start), "decode"))
        else:
            self.marks.append((start, "decode"))
        self.phase = phase

    def preempted(self, ts: int) -> None:
        self.marks.append((ts, "preempted"))
        self.phase = -1

    def finished_at(self, ts: int, rank: int) -> None:
        """Completion from the most trusted source seen: rank 0 API tokens, 1 httpRes, 2 state."""
        if self.done is None or rank < self.done_rank:
            self.done, self.done_rank = ts, rank


def read_request_events(life: dict[Any, RequestLifecycle], events: Iterable[EventRecord]) -> None:
    """Arrival, first token, preemptions and completion from the Request-domain events."""
    for e in events:
        if e.domain != "Request" or not e.attrs:
            continue
        a = e.attrs
        if e.name == "tokens":
            ts = e.ts_ns
            for entry in a.get("reqs") or ():
                # _hashable inlined: this loop runs once per request per step
                kind = entry.__class__
                if (kind is tuple or kind is list) and len(entry) > 2 and ((rid := entry[0]).__class__ is str
                                                                           or rid.__class__ is int):
                    lc = life[rid]
                    if entry[1] and lc.first_token is None:
                        lc.first_token = ts
                    if entry[2]:
                        lc.finished_at(ts, 0)
            continue
        if e.name == HTTP_EVENT:
            _read_http(life, e.ts_ns, a)
            continue
        if not _hashable(a.get("rid")):
            continue
        lc = life[a["rid"]]
        to = str(a.get("to", "")).upper()
        if e.name == "httpReq":
            lc.arrival = e.ts_ns
            lc.stream = a.get("stream") is True
            lc.args.update(api_rid=a.get("api_rid"), prompt_tokens=a.get("prompt_tokens"))
        elif e.name == "enqueue":
            lc.arrival = e.ts_ns if lc.arrival is None else lc.arrival
            lc.args.setdefault("prompt_tokens", a.get("prompt_tokens"))
        elif e.name == "state" and to == "PREEMPTED":
            lc.marks.append((e.ts_ns, "preempted"))
        elif e.name == "state" and to.startswith("FINISHED"):
            lc.finished_at(e.ts_ns, 2)
        elif e.name == "httpRes":
            lc.finished_at(e.ts_ns, 1)
            lc.args.update(output_tokens=a.get("output_tokens"), finish_reason=a.get("finish_reason"))


def _read_http(life: dict[Any, RequestLifecycle], ts: int, attrs: dict[str, Any]) -> None:
    rids = attrs.get("rids")
    if not isinstance(rids, list):
        return
    times = HttpTimes(ts, attrs)
    for rid in rids:
        if _hashable(rid) and life[rid].http is None:
            life[rid].http = times


def http_marks(lc: RequestLifecycle) -> tuple[int, int | None, int | None] | None:
    """(HTTP arrival, first token sent, last byte sent) of a request the HTTP server recorded."""
    http = lc.http
    if http is None:
        return None
    return http.arrival, http.first_token_sent(lc.stream), http.last_body


def _hashable(rid: Any) -> bool:
    """Request ids as recorded (str, or int from a custom handler), never converted: str() per batch
    entry would cost more than the rest of the membership loop."""
    return type(rid) is str or type(rid) is int


def first_seen(lc: RequestLifecycle) -> int:
    """Sort key for the request tracks: arrival order."""
    if lc.arrival is not None:
        return lc.arrival
    return lc.marks[0][0] if lc.marks else 0


def request_phases(lc: RequestLifecycle) -> list[tuple[str, int, int]]:
    """Adjacent (state, start, end) slices covering a request's life, in time order."""
    marks = list(lc.marks)
    if lc.first_token is not None and lc.first_decode >= 0:
        marks[lc.first_decode] = (lc.first_token, "decode")
    elif lc.first_token is not None and marks:  # one output token: no decode batch ever ran it
        marks.append((lc.first_token, "decode"))
    marks.sort(key=lambda m: m[0])  # stable: batch order kept at equal times
    if lc.arrival is not None:
        marks.insert(0, (lc.arrival, "queued"))
    if not marks:
        return []
    end = lc.done if lc.done is not None else (lc.last_done or marks[-1][0])
    states: list[tuple[str, int]] = []
    for ts, state in marks:
        # Clock skew between hosts must not make a slice start before the previous one.
        ts = max(ts, states[-1][1]) if states else ts
        if not states or states[-1][0] != state:
            states.append((state, ts))
    end = max(end, states[-1][1])
    bounds: Sequence[int] = [s for _, s in states[1:]] + [end]
    phases = [(state, start, stop) for (state, start), stop in zip(states, bounds, strict=True)]
    return _with_http(lc.http, phases) if lc.http is not None else phases


def _with_http(http: HttpTimes, phases: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """The HTTP server's part before the engine's phases (`http receive`: until the body was read;
    `preprocess`: until the hand-off to the engine) and after them (`respond`: until the last byte was
    written). Slices stay adjacent and in order; an empty one is left out."""
    first, last = phases[0][1], phases[-1][2]
    arrival = min(http.arrival, first)
    body = min(max(http.body_received or arrival, arrival), first)
    before = [("http receive", arrival, body), ("preprocess", body, first)]
    after = [("respond", last, http.last_body)] if http.last_body is not None and http.last_body > last else []
    return [p for p in before if p[2] > p[1]] + phases + after
