"""A client that measures TTFT and e2e itself, precisely, to check a server's own figures against.

Bytes are stamped by the kernel when they reach the client's socket (Linux `SO_TIMESTAMPNS`), so a
client process that waits for a CPU (a busy machine) still measures when the bytes arrived, not when
it got round to reading them; elsewhere each read is stamped as the selector reports it. One thread,
non-blocking sockets and a selector; each request opens its own connection (`Connection: close`).
A read's stamp is that of the newest segment it returns, and the kernel merges a segment that
arrives while the one before is still unread into it, newest stamp kept: the client must keep up
(see the acceptance test for how it is given the CPU on a busy machine); if it falls behind, its
times come out late, never early.
Times are `time.perf_counter_ns()` (the monotonic clock the profiler uses too). The kernel stamps
the wall clock, which a clock service may step or slew; a stamp is moved onto the monotonic clock by
the two clocks' difference read right after it, so only a wall-clock step between a segment's
arrival and its read can err.

- start: just before the request is written (its connection already open);
- TTFT: streamed, when the first server-sent event (`data:`) arrived; otherwise when the response's
  first byte arrived (a client sees no token before);
- e2e: when the response's last byte arrived.
"""

from __future__ import annotations

import json
import selectors
import socket
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

_SO_TIMESTAMPNS = 35  # Linux; the socket module does not name it
_TIMESPEC = struct.Struct("=qq")
_ANCILLARY = socket.CMSG_SPACE(_TIMESPEC.size)


@dataclass
class TimedRequest:
    path: str  # "/v1/completions" or "/v1/chat/completions"
    body: dict[str, Any]

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


@dataclass
class TimedResponse:
    request: TimedRequest
    start_ns: int = 0
    first_byte_ns: int = 0
    first_event_ns: int = 0
    first_read_events: int = 0  # the events ("data:" lines) in the read that delivered the first event
    last_byte_ns: int = 0
    raw: bytearray = field(default_factory=bytearray)

    @property
    def ttft_ms(self) -> float:
        first = self.first_event_ns if self.request.stream else self.first_byte_ns
        return (first - self.start_ns) / 1e6

    @property
    def e2e_ms(self) -> float:
        return (self.last_byte_ns - self.start_ns) / 1e6

    def status(self) -> int:
        return int(bytes(self.raw).split(b" ", 2)[1])

    def body(self) -> bytes:
        head, _, body = bytes(self.raw).partition(b"\r\n\r\n")
        return _dechunk(body) if b"transfer-encoding: chunked" in head.lower() else body

    def response_id(self) -> str:
        """The API server's id of the response ("cmpl-...", "chatcmpl-...")."""
        body = self.body()
        if not self.request.stream:
            return str(json.loads(body)["id"])
        for line in body.split(b"\n"):
            if line.startswith(b"data: {"):
                return str(json.loads(line[6:])["id"])
        raise ValueError(f"no event in the stream: {body[:300]!r}")


def _dechunk(data: bytes) -> bytes:
    out, pos = bytearray(), 0
    while True:
        end = data.index(b"\r\n", pos)
        size = int(data[pos:end].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += data[end + 2:end + 2 + size]
        pos = end + 4 + size


def run_timed(port: int, requests: Sequence[TimedRequest], concurrency: int,
              timeout_s: float = 300.0) -> list[TimedResponse]:
    """Send `requests` to 127.0.0.1:`port`, at most `concurrency` at a time, in order; the responses
    in the same order."""
    responses = [TimedResponse(r) for r in requests]
    selector = selectors.DefaultSelector()
    pending = iter(range(len(requests)))
    in_flight = 0
    deadline = time.monotonic() + timeout_s
    stamped = sys.platform == "linux"

    def start_next() -> bool:
        index = next(pending, None)
        if index is None:
            return False
        request = requests[index]
        payload = json.dumps(request.body).encode()
        message = (f"POST {request.path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                           f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                           "Connection: close\r\n\r\n").encode() + payload
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        if stamped:
            sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        # Stamped right before the write: a wait for the CPU between the two would count against
        # the server.
        responses[index].start_ns = time.perf_counter_ns()
        sock.sendall(message)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, index)
        return True

    try:
        while in_flight < concurrency and start_next():
            in_flight += 1
        while in_flight:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{in_flight} responses still open after {timeout_s:.0f}s")
            for key, _events in selector.select(timeout=1.0):
                sock, index = key.fileobj, key.data
                assert isinstance(sock, socket.socket)
                response = responses[index]
                data, now = _read(sock, 1 << 16, stamped)
                if data:
                    if not response.first_byte_ns:
                        response.first_byte_ns = now
                    response.raw += data
                    if not response.first_event_ns and b"\ndata:" in response.raw:
                        response.first_event_ns = now
                        # a read carries the stamp of its newest segment: with later events in it, the
                        # first one's own arrival is unknown
                        response.first_read_events = data.count(b"data:")
                    response.last_byte_ns = now
                    continue
                selector.unregister(sock)
                sock.close()
                in_flight -= 1
                if start_next():
                    in_flight += 1
    finally:
        for key in list(selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        selector.close()
    return responses


def _read(sock: socket.socket, size: int, stamped: bool) -> tuple[bytes, int]:
    """Up to `size` bytes and when they arrived (the kernel's stamp of the last segment read)."""
    if not stamped:
        data = sock.recv(size)
        return data, time.perf_counter_ns()
    data, ancillary, _flags, _addr = sock.recvmsg(size, _ANCILLARY)
    mono = time.perf_counter_ns()
    wall_minus_mono = time.time_ns() - mono
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(payload) >= _TIMESPEC.size:
            seconds, nanoseconds = _TIMESPEC.unpack_from(payload)
            return data, min(seconds * 1_000_000_000 + nanoseconds - wall_minus_mono, mono)
    return data, mono
