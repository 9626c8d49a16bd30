"""The HTTP handlers (engines/vllm/vllm_http.py) in a real uvicorn server, in a real subprocess under the
collection runtime, with the shipped uvicorn entries: one `httpExchange` per request that reached the
engine, its times in order, for both of uvicorn's HTTP parsers, and responses unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from runtime_harness import Workspace

CONFIG = Path(__file__).parent.parent / "service_profiler" / "engines" / "vllm"

SERVER = '''
import asyncio, http.client, json, sys, threading
import uvicorn
from service_profiler.engines.vllm.vllm_http import note_engine_request

async def app(scope, receive, send):
    if scope["type"] != "http":
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/health":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    request = json.loads(body)
    note_engine_request(request["rid"])
    await asyncio.sleep(0.02)  # "the engine"
    if request["stream"]:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for i in range(3):
            await send({"type": "http.response.body", "body": b"data: %d\\n\\n" % i, "more_body": True})
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    else:
        payload = json.dumps({"rid": request["rid"]}).encode()
        await send({"type": "http.response.start", "status": 201,
                    "headers": [(b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})

def client(port, out):
    for i in range(4):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/gen", body=json.dumps({"rid": f"r{i}", "stream": i % 2 == 0}))
        response = conn.getresponse()
        out.append([response.status, response.read().decode()])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/health")
    out.append([conn.getresponse().status, None])

async def main():
    config = uvicorn.Config(app, host="127.0.0.1", port=0, http=sys.argv[1], log_level="warning")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    out = []
    await asyncio.to_thread(client, port, out)
    server.should_exit = True
    await task
    print(json.dumps(out))

asyncio.run(main())
'''


def _http_entries() -> str:
    text = (CONFIG / "vllm_v1.yaml").read_text()
    return text[text.index("# --- HTTP server"):]


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_exchanges_are_recorded_and_responses_unchanged(workspace: Workspace, parser: str) -> None:
    workspace.write_config()
    workspace.write_symbols(_http_entries())
    (workspace.root / "server.py").write_text(SERVER)
    code = f"import runpy, sys; sys.argv = ['server.py', {parser!r}]; runpy.run_path('server.py', run_name='__main__')"
    profiled = json.loads(workspace.run_python(code).stdout.splitlines()[-1])
    plain = json.loads(workspace.run_python(code, SERVICE_PROF_DISABLE="1").stdout.splitlines()[-1])
    assert profiled == plain
    assert [status for status, _ in profiled] == [200, 201, 200, 201, 200]

    run = workspace.single_run()
    patch = [line for line in run.lines if line.get("t") == "patch"][-1]
    assert not patch["failed"]
    events = [r[3] for r in run.spans("httpExchange")]  # event records: [chan, ts, tid, attrs]
    assert sorted(a["rids"] for a in events) == [["r0"], ["r1"], ["r2"], ["r3"]]  # /health handed nothing over
    for attrs in events:
        streamed = attrs["rids"][0] in ("r0", "r2")
        assert attrs["arrival_source"] == "kernel" and attrs["status"] == (200 if streamed else 201)
        assert attrs["chunks"] == (3 if streamed else 1) and attrs["disconnected"] is False
        times = [attrs[k] for k in ("read", "app_start", "body_received", "response_start", "first_body",
                                    "last_body", "end")]
        assert 0 <= times[0] <= times[1] <= times[2] <= times[3] <= times[4] <= times[5] <= times[6], attrs
        assert times[3] >= 20_000_000  # nothing was written before "the engine" answered
        if streamed:  # three chunks 10 ms apart, then the empty last one
            assert times[5] - times[4] >= 30_000_000
