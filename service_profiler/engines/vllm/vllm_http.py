"""The HTTP side of a request in vLLM's API server: when the request reached the server, when its body
had been read, and when the response's first and last bytes were written, joined to the engine's
request ids.

vLLM's own `arrival_time` is taken once the body is parsed, when its renderer starts on the prompt, so
time a request spends in the server's event loop queue, in body parsing and in validation is invisible
to it. These handlers wrap uvicorn's HTTP protocol (the server `vllm serve` runs on) below the app:

- `*Protocol.data_received`: a request's first bytes were read (the protocol makes a new ASGI scope
  for each request; its arrival is noted under that scope until the app starts). A busy event loop
  reads a socket late, so the arrival is taken from the kernel: TCP_INFO's `last_data_recv` says how
  long ago the connection's last data segment arrived, in whole clock ticks (jiffies, 1-10 ms). The
  tick is learnt from the values seen (their greatest common divisor) and half a tick is taken off,
  so the arrival is never placed more than half a tick before the truth. Where TCP_INFO is not
  available (Unix sockets, other systems) the read's time is used;
- `RequestResponseCycle.run_asgi`: the app runs for one request. A `HttpExchange` is put in a context
  variable for the request's task (child tasks, e.g. a streaming response's, inherit it), and one
  `Request/httpExchange` event is recorded when the app returns;
- `RequestResponseCycle.receive` / `.send`: the body was received; response bytes were written
  (uvicorn's `send` writes to the transport before it returns);
- `note_engine_request` (called by `vllm_v1.api_add_request_handler`, `OutputProcessor.add_request`):
  the engine request ids the exchange handed to the engine (several for n > 1 or a list of prompts).

`httpExchange` attributes: `rids` (engine request ids), `arrival_source` ("kernel": TCP receive time;
"read": when the server read the bytes; "app": the app's start), `read` (ns after the arrival when the
server read the bytes), `status`, `chunks` (non-empty body
writes), `disconnected`, and times in ns after the event's timestamp (the arrival): `app_start`,
`body_received`, `response_start` (status line and headers written), `first_body` (first non-empty
body write), `last_body` (the last body write: the response's last byte), `end` (the app returned).
A write is stamped just before uvicorn's `send` writes it to the transport (after the wait, when the
transport had paused writing): stamping after the write would count the time the writer is preempted
by the woken reader, which a client never sees.
A time that did not happen is absent. Exchanges that handed nothing to the engine (health checks,
/metrics, rejected requests) are not recorded.

The host comes first: each handler calls the original once with its own arguments and returns its
result; everything the profiler does is inside try/except (counted, never raised), and nothing here
changes the scope, the messages or the response.
"""

from __future__ import annotations

import contextvars
import math
import socket
import struct
from collections.abc import Callable
from typing import Any

from service_profiler import record

Original = Callable[..., Any]

_now = record.now_ns
_MAX_PENDING_ARRIVALS = 4096
"""Scopes whose app has not started yet (pipelined requests, a busy loop); oldest dropped first."""
_TCP_INFO = getattr(socket, "TCP_INFO", None)  # Linux only
_LAST_DATA_RECV = struct.Struct("=I")  # struct tcp_info: 8 bytes of u8 fields, 9 u32s, last_data_sent,
_LAST_DATA_RECV_OFFSET = 52            # last_ack_sent, then last_data_recv (ms, whole jiffies)
_TCP_INFO_LEN = 104
_MS = 1_000_000


class HttpExchange:
    """One request/response exchange as the HTTP server saw it (monotonic ns; 0 = not yet)."""

    __slots__ = ("app_start", "arrival", "body_received", "chunks", "first_body", "last_body", "read",
                 "response_start", "rids", "source", "status")

    def __init__(self, arrival: int, read: int, source: str, app_start: int) -> None:
        self.arrival = arrival
        self.read = read
        self.source = source
        self.app_start = app_start
        self.body_received = 0
        self.response_start = 0
        self.first_body = 0
        self.last_body = 0
        self.chunks = 0
        self.status: int | None = None
        self.rids: list[str] = []

    def attrs(self, end: int, disconnected: Any) -> dict[str, Any]:
        t0 = self.arrival
        attrs: dict[str, Any] = {"rids": self.rids, "arrival_source": self.source, "read": self.read - t0,
                                 "status": self.status, "chunks": self.chunks,
                                 "disconnected": bool(disconnected), "app_start": self.app_start - t0,
                                 "end": end - t0}
        for name in ("body_received", "response_start", "first_body", "last_body"):
            ts = getattr(self, name)
            if ts:
                attrs[name] = ts - t0
        return attrs


_CURRENT: contextvars.ContextVar[HttpExchange | None] = contextvars.ContextVar(
    "service_profiler_http_exchange", default=None)


class HttpProbeState:
    """Arrivals awaiting their app, keyed by the scope's id (the entry holds the scope, so no other
    object can take that id meanwhile), and failure counts. All calls come from the server's event
    loop thread."""

    def __init__(self) -> None:
        self.arrivals: dict[int, tuple[Any, int, int, str]] = {}
        self.failures: dict[str, int] = {}
        self.tick_ms = 0  # the kernel's clock tick as TCP_INFO shows it; 0 = not seen yet

    def note_arrival(self, scope: Any, arrival: int, read: int, source: str) -> None:
        arrivals = self.arrivals
        arrivals[id(scope)] = (scope, arrival, read, source)
        if len(arrivals) > _MAX_PENDING_ARRIVALS:
            del arrivals[next(iter(arrivals))]

    def take_arrival(self, scope: Any) -> tuple[Any, int, int, str] | None:
        found = self.arrivals.pop(id(scope), None)
        return found if found is not None and found[0] is scope else None

    def kernel_arrival(self, transport: Any, read: int) -> int:
        """When the kernel received the connection's last data, or 0 when it cannot say."""
        if _TCP_INFO is None:
            return 0
        sock = transport.get_extra_info("socket")
        if sock is None:
            return 0
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_LEN)
        except OSError:  # not a TCP socket
            return 0
        now = _now()
        if len(info) < _LAST_DATA_RECV_OFFSET + 4:
            return 0
        ago_ms = _LAST_DATA_RECV.unpack_from(info, _LAST_DATA_RECV_OFFSET)[0]
        if ago_ms:
            self.tick_ms = math.gcd(self.tick_ms, ago_ms)
        # `ago_ms` is within one tick of the truth either way; half a tick off keeps the arrival no
        # earlier than half a tick before it.
        ago_ns = ago_ms * _MS - self.tick_ms * (_MS // 2)
        return min(now - ago_ns, read) if ago_ns > 0 else read

    def failed(self, where: str, exc: BaseException) -> None:
        count = self.failures.get(where, 0) + 1
        self.failures[where] = count
        if count & (count - 1) == 0:  # 1, 2, 4, ...: visible in the raw file, never a flood
            record.meta("vllm_http_handler_failures", dict(self.failures))


STATE = HttpProbeState()


def note_engine_request(rid: str) -> None:
    """The current HTTP exchange (if any) handed engine request `rid` to the engine."""
    exchange = _CURRENT.get()
    if exchange is not None:
        exchange.rids.append(rid)


def connection_data_handler(original_func: Original, this: Any, *args: Any, **kwargs: Any) -> Any:
    """`HttpToolsProtocol.data_received` / `H11Protocol.data_received`: a request whose first bytes
    are in this read gets a new scope; its arrival is when the read was handed to the protocol."""
    start = _now()
    before = None
    try:
        before = this.scope
    except Exception as exc:
        STATE.failed("data_received", exc)
    result = original_func(this, *args, **kwargs)
    try:
        scope = this.scope
        if scope is not before and scope is not None:
            kernel = STATE.kernel_arrival(this.transport, start)
            STATE.note_arrival(scope, kernel or start, start, "kernel" if kernel else "read")
    except Exception as exc:
        STATE.failed("data_received", exc)
    return result


async def exchange_handler(original_func: Original, this: Any, *args: Any, **kwargs: Any) -> Any:
    """`RequestResponseCycle.run_asgi`: the app's run for one request; records `Request/httpExchange`."""
    start = _now()
    exchange: HttpExchange | None = None
    try:
        arrival = STATE.take_arrival(this.scope)
        exchange = (HttpExchange(arrival[1], arrival[2], arrival[3], start) if arrival is not None
                    else HttpExchange(start, start, "app", start))
        _CURRENT.set(exchange)  # this task's context: the app and the tasks it starts see it
    except Exception as exc:
        STATE.failed("run_asgi", exc)
    try:
        return await original_func(this, *args, **kwargs)
    finally:
        if exchange is not None:
            end = _now()
            try:
                if exchange.rids and record.enabled("Request"):
                    record.event("Request", "httpExchange",
                                 exchange.attrs(end, getattr(this, "disconnected", False)), exchange.arrival)
            except Exception as exc:
                STATE.failed("run_asgi", exc)


async def receive_handler(original_func: Original, this: Any, *args: Any, **kwargs: Any) -> Any:
    """`RequestResponseCycle.receive`: the app got the request body's last part."""
    message = await original_func(this, *args, **kwargs)
    exchange = _CURRENT.get()
    if exchange is not None and not exchange.body_received:
        try:
            if message["type"] == "http.request" and not message.get("more_body"):
                exchange.body_received = _now()
        except Exception as exc:
            STATE.failed("receive", exc)
    return message


async def send_handler(original_func: Original, this: Any, *args: Any, **kwargs: Any) -> Any:
    """`RequestResponseCycle.send`: response bytes were written (status and headers, or a body part)."""
    now = _now()
    paused = False
    try:
        paused = this.flow.write_paused
    except Exception as exc:
        STATE.failed("send", exc)
    result = await original_func(this, *args, **kwargs)
    if paused:  # the write waited for the transport to drain
        now = _now()
    exchange = _CURRENT.get()
    if exchange is not None:
        try:
            if this.disconnected:  # uvicorn dropped the message: nothing was written
                return result
            message = args[0] if args else kwargs["message"]
            kind = message["type"]
            if kind == "http.response.body":
                if message.get("body"):
                    exchange.chunks += 1
                    if not exchange.first_body:
                        exchange.first_body = now
                exchange.last_body = now
            elif kind == "http.response.start":
                exchange.response_start = now
                exchange.status = message.get("status")
        except Exception as exc:
            STATE.failed("send", exc)
    return result
