"""Drive a running OpenAI-compatible server (`vllm serve`) over HTTP with a request workload.

The arrival schedule is computed before the first request is sent (from the arrival process and its
seed, or the trace's own `arrival_s`), so a run is reproducible: the same workload and seed send the same
requests at the same offsets. Open loop (poisson, gamma, burst, trace): each request is sent at its
offset from the start, on its own thread, whatever is still in flight. Closed loop: `concurrency` clients,
each sending its next request when the previous one has finished.

Each request is a streamed `/v1/completions` call whose prompt is the request's token ids (so prefix
sharing is exact) with `min_tokens` = `max_tokens` = its output length and `ignore_eos`, timed on the
client with the monotonic clock: sent (just before the request is written, its connection open), first
token (the first server-sent event carrying a choice, i.e. tokens) and done (the stream's end).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .requests import ArrivalSpec, WorkloadError, WorkloadRequest

# Open loop: at most this many requests in flight; a server this far behind is saturated, and more
# threads would only measure the client.
MAX_IN_FLIGHT = 512


@dataclass(frozen=True)
class HttpTarget:
    """The server to drive: host, port and the model name it serves."""

    host: str
    port: int
    model: str = ""
    path: str = "/v1/completions"

    @classmethod
    def from_url(cls, url: str) -> HttpTarget:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname:
            raise WorkloadError(f"--server {url!r}: give the server as http://HOST:PORT (plain HTTP)")
        try:
            port = parts.port or 80
        except ValueError as exc:
            raise WorkloadError(f"--server {url!r}: {exc}") from exc
        return cls(parts.hostname, port)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def connection(self, timeout_s: float) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout_s)


def served_model(target: HttpTarget, timeout_s: float = 10.0) -> tuple[str, str]:
    """(id, root) of the first model the server lists at /v1/models; `root` is its path for a local model."""
    conn = target.connection(timeout_s)
    try:
        conn.request("GET", "/v1/models")
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise WorkloadError(f"{target.url}/v1/models answered HTTP {response.status}: is it an "
                                "OpenAI-compatible server (vllm serve)?")
        data = json.loads(body)["data"][0]
        return str(data["id"]), str(data.get("root") or data["id"])
    except (OSError, http.client.HTTPException) as exc:
        raise WorkloadError(f"{target.url}: cannot reach the server ({exc}); start it first "
                            "(vllm serve MODEL --host 127.0.0.1 --port PORT)") from exc
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise WorkloadError(f"{target.url}/v1/models: no model listed ({exc})") from exc
    finally:
        conn.close()


@dataclass
class ClientTiming:
    """One request as the client saw it; times in ns of `time.perf_counter_ns()`."""

    rid: str
    scheduled_s: float
    prompt_tokens: int
    output_tokens_asked: int
    sent_ns: int = 0
    first_token_ns: int | None = None
    done_ns: int | None = None
    output_tokens: int | None = None
    status: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200 and self.done_ns is not None

    def to_dict(self, origin_ns: int) -> dict[str, Any]:
        def ms(ns: int | None) -> float | None:
            return None if ns is None else round((ns - self.sent_ns) / 1e6, 3)

        out_tokens = self.output_tokens or 0
        ttft, e2e = ms(self.first_token_ns), ms(self.done_ns)
        return {"rid": self.rid, "scheduled_s": round(self.scheduled_s, 6),
                "sent_s": round((self.sent_ns - origin_ns) / 1e9, 6), "prompt_tokens": self.prompt_tokens,
                "output_tokens": self.output_tokens, "ttft_ms": ttft, "e2e_ms": e2e,
                "tpot_ms": (round((e2e - ttft) / (out_tokens - 1), 3)
                            if ttft is not None and e2e is not None and out_tokens > 1 else None),
                "status": self.status, "error": self.error}


def request_body(model: str, request: WorkloadRequest) -> dict[str, Any]:
    return {"model": model, "prompt": list(request.token_ids or ()), "max_tokens": request.output_tokens,
            "min_tokens": request.output_tokens, "ignore_eos": True, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}


def send_one(target: HttpTarget, request: WorkloadRequest, timing: ClientTiming, timeout_s: float) -> None:
    """Send one request and fill `timing`; a failure is recorded in it, never raised."""
    conn = target.connection(timeout_s)
    try:
        payload = json.dumps(request_body(target.model, request)).encode()
        timing.sent_ns = time.perf_counter_ns()  # taken again once connected: a refused connection has a time
        conn.connect()
        timing.sent_ns = time.perf_counter_ns()
        conn.request("POST", target.path, body=payload, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        timing.status = response.status
        if response.status != 200:
            timing.error = f"HTTP {response.status}: {response.read()[:300].decode(errors='replace')}"
            return
        chunks = 0
        for raw in response:
            if not raw.startswith(b"data: {"):
                continue
            event = json.loads(raw[6:])
            # Every chunk with a choice carries new tokens (vLLM sends none for an empty step), even when
            # their text is still held back (a partial UTF-8 sequence); the usage chunk has no choice.
            if event.get("choices"):
                if timing.first_token_ns is None:
                    timing.first_token_ns = time.perf_counter_ns()
                chunks += 1
            usage = event.get("usage")
            if usage:
                timing.output_tokens = int(usage.get("completion_tokens") or 0)
        timing.done_ns = time.perf_counter_ns()
        if timing.output_tokens is None:
            timing.output_tokens = chunks
    except (OSError, http.client.HTTPException, ValueError) as exc:
        timing.error = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()


def run_over_http(target: HttpTarget, requests: Sequence[WorkloadRequest], arrival: ArrivalSpec,
                  timeout_s: float = 300.0, progress: Callable[[str], None] | None = None
                  ) -> tuple[list[ClientTiming], int]:
    """Send `requests` on the arrival schedule (their `arrival_s`, or a closed loop); returns the timings in
    request order and the schedule's origin (perf_counter ns)."""
    timings = [ClientTiming(r.rid, 0.0 if arrival.process == "closed" else r.arrival_s, r.prompt_tokens,
                            r.output_tokens) for r in requests]
    origin = time.perf_counter_ns()
    threads: list[threading.Thread] = []
    if arrival.process == "closed":
        order = iter(range(len(requests)))
        lock = threading.Lock()

        def client() -> None:
            while True:
                with lock:
                    index = next(order, None)
                if index is None:
                    return
                send_one(target, requests[index], timings[index], timeout_s)

        threads = [threading.Thread(target=client, daemon=True) for _ in range(min(arrival.concurrency,
                                                                                   len(requests)))]
        for thread in threads:
            thread.start()
    else:
        slots = threading.BoundedSemaphore(MAX_IN_FLIGHT)

        def one(index: int) -> None:
            try:
                send_one(target, requests[index], timings[index], timeout_s)
            finally:
                slots.release()

        for index in sorted(range(len(requests)), key=lambda i: requests[i].arrival_s):
            delay = origin / 1e9 + requests[index].arrival_s - time.perf_counter_ns() / 1e9
            if delay > 0:
                time.sleep(delay)
            slots.acquire()
            thread = threading.Thread(target=one, args=(index,), daemon=True)
            thread.start()
            threads.append(thread)
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    late = [t for t in timings if t.done_ns is None and t.error is None]
    for timing in late:
        timing.error = f"no complete response within {timeout_s:.0f}s"
    if progress is not None:
        failed = sum(1 for t in timings if not t.ok)
        progress(f"{len(timings) - failed}/{len(timings)} requests answered by {target.url}")
    return timings, origin
