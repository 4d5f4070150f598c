"""The endpoint's own HTTP/1.1 server (services.serving.wire), on a real socket, as clients drive it.

The inference routes are answered by handlers (the real ones take the same Call: the binary-tensor
and serving suites run them through this server); every other route by an ASGI app, here a small
Starlette app with a streaming route. Raw sockets where the bytes matter (pipelining, framing,
malformed requests), httpx where a client's reading of the answer matters (chunked streams).
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from services.serving.intake import Answer, Call
from services.serving.launch import listening_socket
from services.serving.wire import WireServer, inference_route

LIMIT = 1000


class Recorder:
    """What the routes saw, and a gate a test can hold requests at."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.stream_closed = asyncio.Event()
        self.entered = 0  # requests that reached the handler
        self.arrived = asyncio.Condition()

    async def until_entered(self, count: int) -> None:
        async with self.arrived:
            await self.arrived.wait_for(lambda: self.entered >= count)

    async def infer(self, call: Call) -> Answer:
        async with self.arrived:
            self.entered += 1
            self.arrived.notify_all()
        await self.gate.wait()
        self.calls.append(call)
        if call.body == b"boom":
            raise RuntimeError("a handler that fails")
        doc = {"name": call.name, "version": call.version, "size": len(call.body)}
        return Answer(orjson.dumps(doc), headers={"x-kind": "v2"})

    async def predict(self, call: Call) -> Answer:
        return Answer(orjson.dumps({"predict": call.name}))

    def app(self) -> Starlette:
        async def echo(request: Request) -> JSONResponse:
            body = await request.body()
            return JSONResponse({"path": request.url.path, "query": request.url.query, "size": len(body)})

        async def stream(request: Request) -> StreamingResponse:
            count = int(request.query_params.get("n", "3"))

            async def parts():
                try:
                    for i in range(count):
                        yield f"data: {i}\n\n".encode()
                        await asyncio.sleep(0.01)
                finally:
                    self.stream_closed.set()

            return StreamingResponse(parts(), media_type="text/event-stream")

        return Starlette(routes=[Route("/echo", echo, methods=["GET", "POST"]), Route("/stream", stream)])


@contextlib.asynccontextmanager
async def serving(recorder: Recorder, **options):
    sock = listening_socket("127.0.0.1", 0)
    handlers = {"v2": recorder.infer, "v1": recorder.predict}
    wire = WireServer(recorder.app(), handlers, max_body=LIMIT, **options)
    stop = asyncio.Event()
    task = asyncio.create_task(wire.serve(sock, stop))
    try:
        yield sock.getsockname()[1], stop, task
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def exchange(port: int, data: bytes, until_closed: bool = False, answers: int = 1) -> bytes:
    """Send raw bytes; read until `answers` complete answers arrived (or the server closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    received = b""
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), 10)
            if not chunk:
                break
            received += chunk
            if not until_closed and complete_answers(received) >= answers:
                break
    finally:
        writer.close()
    return received


def complete_answers(data: bytes) -> int:
    count = 0
    while (end := data.find(b"\r\n\r\n")) >= 0:
        head = data[:end].lower()
        length = 0
        if b"content-length: " in head:
            length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
        if len(data) < end + 4 + length:
            break
        data = data[end + 4 + length:]
        if not head.startswith(b"http/1.1 100"):
            count += 1
    return count


def post(path: str, body: bytes, *extra: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "host: x", f"content-length: {len(body)}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@pytest.mark.parametrize(
    ("method", "path", "route"),
    [
        (b"POST", "/v2/models/m/infer", ("v2", "m", None)),
        (b"POST", "/v2/models/m/versions/3/infer", ("v2", "m", "3")),
        (b"POST", "/v1/models/m/predict", ("v1", "m", None)),
        (b"GET", "/v2/models/m/infer", None),  # the app answers 405
        (b"POST", "/v2/models//infer", None),
        (b"POST", "/v2/models/m/versions//infer", None),
        (b"POST", "/v1/models/m/generate", None),
        (b"POST", "/v2/models/m/ready", None),
    ],
)
def test_which_routes_skip_the_app(method, path, route):
    assert inference_route(method, path) == route


async def test_pipelined_requests_are_answered_in_order_on_one_connection():
    recorder = Recorder()
    async with serving(recorder) as (port, _, _):
        data = post("/v2/models/a/infer", b"x" * 5) + b"GET /echo?q=1 HTTP/1.1\r\nhost: x\r\n\r\n" + post(
            "/v2/models/b%20c/versions/2/infer", b"yy"
        )
        received = await exchange(port, data, answers=3)
    answers = received.split(b"HTTP/1.1 200 OK\r\n")[1:]
    assert len(answers) == 3, received
    assert orjson.loads(answers[0].split(b"\r\n\r\n", 1)[1]) == {"name": "a", "version": None, "size": 5}
    assert orjson.loads(answers[1].split(b"\r\n\r\n", 1)[1]) == {"path": "/echo", "query": "q=1", "size": 0}
    assert orjson.loads(answers[2].split(b"\r\n\r\n", 1)[1]) == {"name": "b c", "version": "2", "size": 2}
    assert b"x-kind: v2\r\n" in answers[0] and b"date: " in answers[0]


async def test_an_inference_answer_is_one_write_with_its_length():
    recorder = Recorder()
    async with serving(recorder) as (port, _, _):
        request = post("/v2/models/a/infer", b"{}", "connection: close")
        received = await exchange(port, request, until_closed=True)
    head, body = received.split(b"\r\n\r\n", 1)
    assert b"content-length: %d" % len(body) in head and b"connection: close" in head
    assert b"content-type: application/json" in head


async def test_bodies_over_the_bound_are_413_and_the_server_keeps_serving():
    recorder = Recorder()
    async with serving(recorder) as (port, _, _):
        declared = await exchange(port, post("/v2/models/a/infer", b"z" * (LIMIT + 1)), until_closed=True)
        chunked = (b"POST /v2/models/a/infer HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
                   + b"%x\r\n%b\r\n" % (LIMIT + 1, b"z" * (LIMIT + 1)) + b"0\r\n\r\n")
        counted = await exchange(port, chunked, until_closed=True)
        after = await exchange(port, post("/v2/models/a/infer", b"ok"))
    for received in (declared, counted):
        assert received.startswith(b"HTTP/1.1 413 "), received
        assert b"over 1000 bytes" in received and b"connection: close" in received
    assert after.startswith(b"HTTP/1.1 200 ") and recorder.calls[-1].body == b"ok"
    assert all(len(c.body) <= LIMIT for c in recorder.calls)  # the oversized bodies never reached a route


async def test_malformed_requests_get_400_and_a_failing_handler_500_without_ending_the_server():
    recorder = Recorder()
    async with serving(recorder) as (port, _, _):
        garbage = await exchange(port, b"NOT HTTP AT ALL\r\n\r\n", until_closed=True)
        recorder.gate.clear()  # a request still being answered when garbage follows it
        pipelined = asyncio.create_task(
            exchange(port, post("/v2/models/a/infer", b"first") + b"\x00garbage\r\n\r\n", until_closed=True))
        await asyncio.wait_for(recorder.until_entered(1), 10)
        recorder.gate.set()
        after_answer = await pipelined
        bad = b"POST /echo HTTP/1.1\r\ncontent-length: x1\r\n\r\n"
        bad_length = await exchange(port, bad, until_closed=True)
        failed = await exchange(port, post("/v2/models/a/infer", b"boom"), until_closed=True)
        after = await exchange(port, post("/v2/models/a/infer", b"ok"))
    assert garbage.startswith(b"HTTP/1.1 400 "), garbage
    assert after_answer.startswith(b"HTTP/1.1 200 ") and after_answer.count(b"HTTP/1.1 ") == 2
    assert after_answer.split(b"HTTP/1.1 ")[2].startswith(b"400 "), after_answer  # in turn, then closed
    assert bad_length.startswith(b"HTTP/1.1 400 "), bad_length
    assert failed.startswith(b"HTTP/1.1 500 ") and b"connection: close" in failed
    assert after.startswith(b"HTTP/1.1 200 ")


async def test_expect_100_continue_is_answered_before_the_body():
    recorder = Recorder()
    async with serving(recorder) as (port, _, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head_only = post("/v2/models/a/infer", b"", "expect: 100-continue")
        writer.write(head_only.replace(b"length: 0", b"length: 3"))
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        writer.write(b"abc")
        final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        writer.close()
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert final.startswith(b"HTTP/1.1 200 ")


async def test_a_stream_is_chunked_and_a_client_leaving_ends_it():
    recorder = Recorder()
    async with serving(recorder) as (port, _, _):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            whole = await client.get("/stream", params={"n": 4})
            assert whole.headers["transfer-encoding"] == "chunked"
            assert whole.text == "".join(f"data: {i}\n\n" for i in range(4))
            recorder.stream_closed.clear()
            async with client.stream("GET", "/stream", params={"n": 100000}) as stream:
                async for _ in stream.aiter_bytes():
                    break  # leave after the first event
        await asyncio.wait_for(recorder.stream_closed.wait(), 10)  # the generator was closed, not run out


async def test_a_token_guards_every_route_but_the_probes():
    recorder = Recorder()
    async with (
        serving(recorder, token="s3cret") as (port, _, _),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client,
    ):
        refused = await client.post("/v2/models/a/infer", content=b"{}")
        wrong = await client.post("/v2/models/a/infer", content=b"{}", headers={"authorization": "Bearer no"})
        app_route = await client.get("/echo")
        probe = await client.get("/healthz")  # open: the app answers (404 here, not 401)
        token = {"authorization": "Bearer s3cret"}
        allowed = await client.post("/v2/models/a/infer", content=b"{}", headers=token)
    assert refused.status_code == wrong.status_code == app_route.status_code == 401
    assert refused.headers["www-authenticate"] == "Bearer"
    assert probe.status_code == 404 and allowed.status_code == 200
    assert [c.body for c in recorder.calls] == [b"{}"]


async def test_a_stop_answers_what_is_in_flight_then_closes():
    recorder = Recorder()
    recorder.gate.clear()  # the request waits inside its handler
    async with serving(recorder) as (port, stop, _):
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
        idle_writer.write(post("/echo", b""))
        await asyncio.wait_for(idle_reader.readuntil(b"\r\n\r\n"), 10)  # answered: now idle
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/v2/models/a/infer", b"late"))
        await asyncio.wait_for(recorder.until_entered(1), 10)
        stop.set()
        rest = await asyncio.wait_for(idle_reader.read(), 10)  # the idle connection closes at once
        recorder.gate.set()
        answer = await asyncio.wait_for(reader.read(), 10)  # the busy one answers, then closes
        writer.close()
        idle_writer.close()
    assert b"connection: close" not in rest and rest.endswith(b'"size":0}')  # only the echo's body was left
    assert answer.startswith(b"HTTP/1.1 200 ") and recorder.calls[0].body == b"late"


async def test_past_the_bound_on_requests_in_flight_the_answer_is_503():
    recorder = Recorder()
    recorder.gate.clear()
    async with serving(recorder, max_in_flight=2) as (port, _, _):
        held = [asyncio.create_task(exchange(port, post("/v2/models/a/infer", b"h"))) for _ in range(2)]
        await asyncio.wait_for(recorder.until_entered(2), 10)
        refused = await exchange(port, post("/v2/models/a/infer", b"r"))
        recorder.gate.set()
        answers = await asyncio.gather(*held)
    assert refused.startswith(b"HTTP/1.1 503 "), refused
    assert all(a.startswith(b"HTTP/1.1 200 ") for a in answers)


async def test_idle_and_stalled_connections_are_closed_after_the_keep_alive_time():
    recorder = Recorder()
    async with serving(recorder, keep_alive_s=1.0) as (port, _, _):
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
        idle_writer.write(post("/v2/models/a/infer", b"ok"))
        answer = await asyncio.wait_for(idle_reader.readuntil(b"\r\n\r\n"), 10)
        stalled_reader, stalled_writer = await asyncio.open_connection("127.0.0.1", port)
        stalled_writer.write(b"POST /v2/models/a/infer HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nabc")
        # Both are closed by the server within a few sweeps (once a second), not left open.
        rest_idle = await asyncio.wait_for(idle_reader.read(), 10)
        rest_stalled = await asyncio.wait_for(stalled_reader.read(), 10)
        idle_writer.close()
        stalled_writer.close()
    assert answer.startswith(b"HTTP/1.1 200 ") and rest_idle.endswith(b"}")  # the body, then the close
    assert rest_stalled == b""  # never answered: the request never arrived whole
    assert [c.body for c in recorder.calls] == [b"ok"]


async def test_a_client_that_half_closes_gets_its_answers_then_the_close():
    recorder = Recorder()
    async with serving(recorder) as (port, _, _):  # keep-alive of 5 s: the close must not wait for it
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/v2/models/a/infer", b"one") + post("/v2/models/a/infer", b"two"))
        writer.write_eof()
        received = await asyncio.wait_for(reader.read(), 3)
        writer.close()
    assert received.count(b"HTTP/1.1 200 ") == 2, received
    assert [c.body for c in recorder.calls] == [b"one", b"two"]
