"""The endpoint's HTTP/1.1 server: httptools parsing on the event loop, one socket write per answer.

A one-row inference spends most of its CPU on the way in and out, not in the model
(docs/SERVING.md, "Where the time goes"): under uvicorn and Starlette, a quarter in the HTTP
protocol (the head and the body written in two calls), a seventh in routing and middleware. Here
the inference routes (`inference_route`) are answered straight from the parsed request by the
same code the Starlette routes call (services.serving.intake.Call and Answer), head and body in
one write; every other route (health, metadata, generation with its server-sent events, metrics)
goes to the Starlette app through a small ASGI 3 bridge. Keep-alive, pipelined requests (answered
in order), `Expect: 100-continue`, bodies bounded by CAIRN_MAX_REQUEST_BYTES before they are held,
a bound on requests in flight (503 past it), idle connections closed after `keep_alive_s`, and a
graceful stop: the listener closes, requests in flight are answered, then the connections close.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hmac
import http
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import httptools

from services.serving.auth import OPEN_PATHS, REFUSAL
from services.serving.intake import Answer, Call, json_answer

log = logging.getLogger(__name__)

Handler = Callable[[Call], Awaitable[Answer]]

PIPELINE_DEPTH = 16  # complete requests held per connection before it stops reading
GRACE_S = 10.0  # how long a stop waits for requests in flight (as gRPC's STOP_GRACE_S)


def inference_route(method: bytes, path: str) -> tuple[str, str, str | None] | None:
    """("v1" | "v2", model name, version or None) for the routes answered without the ASGI app:
    POST /v1/models/{name}/predict, /v2/models/{name}/infer, /v2/models/{name}/versions/{v}/infer."""
    if method != b"POST":
        return None
    parts = path.split("/")
    if len(parts) == 5 and parts[2] == "models" and parts[3]:
        if parts[1] == "v2" and parts[4] == "infer":
            return "v2", parts[3], None
        if parts[1] == "v1" and parts[4] == "predict":
            return "v1", parts[3], None
    elif (len(parts) == 7 and parts[1] == "v2" and parts[2] == "models" and parts[4] == "versions"
          and parts[6] == "infer" and parts[3] and parts[5]):
        return "v2", parts[3], parts[5]
    return None


_STATUS_LINES: dict[int, bytes] = {}


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {phrase}\r\n".encode()
    return line


@dataclass(slots=True)
class Parsed:
    """One request as the parser gave it."""

    method: bytes
    url: bytes
    headers: list[tuple[bytes, bytes]]  # names lower-case
    body: bytes
    keep_alive: bool
    refused: Answer | None  # answered without the app (a body over the bound)


class Connection(asyncio.Protocol):
    """One client connection: requests parsed as bytes arrive, answered one at a time in order."""

    def __init__(self, server: WireServer):
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.client: tuple[str, int] | None = None
        self.local: tuple[str, int] | None = None
        self.pending: deque[Parsed] = deque()
        self.busy = False
        self.closed = False
        self.reading = True
        self.idle_since: float | None = server.loop.time()
        self.gone: asyncio.Future[None] | None = None  # resolved when the client leaves (ASGI disconnect)
        self.drained: asyncio.Event | None = None  # set while the transport takes writes
        self.eof = False  # the client has sent all it will send
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.size = 0
        self.refused: Answer | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.client = transport.get_extra_info("peername")
        self.local = transport.get_extra_info("sockname")
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self.gone is not None and not self.gone.done():
            self.gone.set_result(None)
        if self.drained is not None:
            self.drained.set()

    def pause_writing(self) -> None:
        if self.drained is None:
            self.drained = asyncio.Event()
        self.drained.clear()

    def resume_writing(self) -> None:
        if self.drained is not None:
            self.drained.set()

    def data_received(self, data: bytes) -> None:
        if not self.busy:  # bytes of a request not yet whole: silence for keep_alive_s closes it too
            self.idle_since = self.server.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse_the_rest("protocol upgrades are not served here")
        except httptools.HttpParserError as exc:
            self._refuse_the_rest(f"not HTTP/1.1: {exc}")

    def eof_received(self) -> bool | None:
        self.eof = True
        if not self.busy and not self.pending:
            return None  # close
        return True  # half-closed: answer what was asked, then close

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._reset()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        limit = self.server.max_body
        for name, value in self.headers:
            if name == b"content-length":
                if not value.isdigit():
                    self.refused = self.server.refusal(400, "bad Content-Length")
                elif int(value) > limit:
                    self.refused = self.server.refusal(413, f"body over {limit} bytes")
            elif (name == b"expect" and value.lower() == b"100-continue" and self.refused is None
                  and not self.busy and not self.pending):  # never between a pipelined answer's bytes
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # type: ignore[union-attr]

    def on_body(self, body: bytes) -> None:
        if self.refused is not None:
            return  # read and dropped: the answer is the refusal
        self.size += len(body)
        if self.size > self.server.max_body:
            self.refused = self.server.refusal(413, f"body over {self.server.max_body} bytes")
            self.body = []
            return
        self.body.append(body)

    def on_message_complete(self) -> None:
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self.pending.append(Parsed(self.parser.get_method(), self.url, self.headers, body,
                                   self.parser.should_keep_alive(), self.refused))
        self._reset()
        if not self.busy:
            self.next()
        elif len(self.pending) >= PIPELINE_DEPTH and self.reading:
            self.reading = False
            self.transport.pause_reading()  # type: ignore[union-attr]

    # answering
    def next(self) -> None:
        """Answer the next request held, or go idle."""
        if self.closed:
            return
        if not self.pending:
            if self.eof:
                self.close()
                return
            self.busy = False
            self.idle_since = self.server.loop.time()
            if not self.reading:
                self.reading = True
                self.transport.resume_reading()  # type: ignore[union-attr]
            return
        self.busy = True
        self.idle_since = None
        self.server.dispatch(self, self.pending.popleft())

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)  # type: ignore[union-attr]

    async def drain(self) -> None:
        if self.drained is not None and not self.drained.is_set() and not self.closed:
            await self.drained.wait()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.close()

    def _refuse_the_rest(self, message: str) -> None:
        """Bytes that are not HTTP: a 400, in turn after the answers owed, and nothing more read."""
        if self.reading:
            self.reading = False
            self.transport.pause_reading()  # type: ignore[union-attr]
        self.pending.append(Parsed(b"", b"", [], b"", False, self.server.refusal(400, message)))
        if not self.busy:
            self.next()


class WireServer:
    """Serves one worker's connections: the inference routes by `handlers`, the rest by `app`."""

    def __init__(
        self,
        app: Any,
        handlers: Mapping[str, Handler],
        *,
        max_body: int,
        max_in_flight: int = 256,
        keep_alive_s: float = 5.0,
        token: str | None = None,
    ):
        self.app = app
        self.handlers = handlers
        self.max_body = max_body
        self.max_in_flight = max_in_flight
        self.keep_alive_s = keep_alive_s
        self.expected_token = f"Bearer {token}".encode() if token else None
        self.loop = asyncio.get_running_loop()
        self.connections: set[Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.date = b""
        self._refresh_date()

    # what every answer carries
    def _refresh_date(self) -> None:
        self.date = b"date: " + email.utils.formatdate(usegmt=True).encode() + b"\r\n"

    def head(self, status: int, media_type: str, length: int, headers: Mapping[str, str], keep_alive: bool
             ) -> bytes:
        parts = [status_line(status), self.date, b"content-type: ", media_type.encode(),
                 b"\r\ncontent-length: ", str(length).encode(), b"\r\n"]
        for name, value in headers.items():
            parts.append(f"{name}: {value}\r\n".encode("latin-1"))
        if not keep_alive:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    @staticmethod
    def refusal(status: int, message: str) -> Answer:
        return json_answer({"error": message}, status)

    # serving
    async def serve(self, sock: Any, stop: asyncio.Event) -> None:
        """Accept on `sock` until `stop` is set, then stop gracefully."""
        server = await self.loop.create_server(lambda: Connection(self), sock=sock, backlog=2048)
        sweeper = self.loop.create_task(self._sweep(stop))
        try:
            await stop.wait()
        finally:
            server.close()  # no new connections
            sweeper.cancel()
            await self.drain_and_close()

    async def drain_and_close(self) -> None:
        """Requests in flight get GRACE_S to be answered; then every connection closes."""
        for conn in list(self.connections):
            if not conn.busy:
                conn.close()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=GRACE_S)
        for conn in list(self.connections):
            conn.close()

    async def _sweep(self, stop: asyncio.Event) -> None:
        """Once a second: the Date header, and idle keep-alive connections closed."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            self._refresh_date()
            expired = self.loop.time() - self.keep_alive_s
            for conn in list(self.connections):  # idle, or silent half-way through a request
                if not conn.busy and conn.idle_since is not None and conn.idle_since < expired:
                    conn.close()

    def dispatch(self, conn: Connection, request: Parsed) -> None:
        task = self.loop.create_task(self._answer(conn, request))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _answer(self, conn: Connection, request: Parsed) -> None:
        keep_alive = request.keep_alive
        try:
            raw_path, _, query = request.url.partition(b"?")
            path = unquote(raw_path.decode("latin-1"), errors="surrogateescape")
            if request.refused is not None:
                keep_alive = False  # the rest of an oversized body is not read
                self._write(conn, request.refused, keep_alive)
            elif len(self.tasks) > self.max_in_flight:
                self._write(conn, self.refusal(503, "too many requests in flight"), keep_alive)
            elif self.expected_token is not None and path not in OPEN_PATHS and not self._token_ok(request):
                answer = Answer(REFUSAL, 401, {"www-authenticate": "Bearer"})
                self._write(conn, answer, keep_alive)
            elif (route := inference_route(request.method, path)) is not None:
                kind, name, version = route
                headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in request.headers}
                answer = await self.handlers[kind](Call(name, version, headers, request.body))
                self._write(conn, answer, keep_alive)
            else:
                keep_alive = await self._asgi(conn, request, path, raw_path, query) and keep_alive
        except Exception:  # noqa: BLE001 - one request's failure is its 500, not the worker's end
            log.exception("request %s %s failed", request.method.decode(), request.url[:200])
            keep_alive = False
            if not conn.closed:
                self._write(conn, self.refusal(500, "internal error"), False)
        if keep_alive and not conn.closed:
            conn.next()
        else:
            conn.close()

    def _token_ok(self, request: Parsed) -> bool:
        for name, value in request.headers:
            if name == b"authorization":
                return hmac.compare_digest(value, self.expected_token)  # type: ignore[arg-type]
        return False

    def _write(self, conn: Connection, answer: Answer, keep_alive: bool) -> None:
        conn.write(self.head(answer.status, answer.media_type, len(answer.body), answer.headers, keep_alive)
                   + answer.body)

    async def _asgi(self, conn: Connection, request: Parsed, path: str, raw_path: bytes, query: bytes
                    ) -> bool:
        """Run the ASGI app for one request; False when the connection cannot be kept."""
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},  # 2.4: send raises once the client left
            "http_version": "1.1",
            "method": request.method.decode("latin-1"),
            "scheme": "http",
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": request.headers,
            "client": conn.client,
            "server": conn.local,
        }
        head_only = request.method == b"HEAD"
        sent_body = False
        state: dict[str, Any] = {"start": None, "chunked": False, "done": False}

        async def receive() -> dict[str, Any]:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": request.body, "more_body": False}
            if conn.gone is None:
                conn.gone = self.loop.create_future()
                if conn.closed:
                    conn.gone.set_result(None)
            await conn.gone
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if conn.closed:
                raise OSError("the client closed the connection")
            kind = message["type"]
            if kind == "http.response.start":
                state["start"] = message
                return
            if kind != "http.response.body" or state["done"]:
                return
            body = b"" if head_only else message.get("body", b"")
            more = message.get("more_body", False)
            start = state["start"]
            if start is not None:  # the head goes with the first body bytes
                state["start"] = None
                state["written"] = True
                names = {name.lower() for name, _ in start.get("headers", [])}
                lines = [status_line(start["status"]), self.date]
                lines += [name + b": " + value + b"\r\n" for name, value in start.get("headers", [])]
                if b"content-length" not in names:
                    if more:
                        state["chunked"] = True
                        lines.append(b"transfer-encoding: chunked\r\n")
                    else:
                        lines.append(b"content-length: " + str(len(body)).encode() + b"\r\n")
                lines.append(b"\r\n")
                head = b"".join(lines)
            else:
                head = b""
            if state["chunked"]:
                if body:
                    body = b"%x\r\n%b\r\n" % (len(body), body)
                if not more:
                    body += b"0\r\n\r\n"
            conn.write(head + body)
            if not more:
                state["done"] = True
            await conn.drain()

        try:
            await self.app(scope, receive, send)
        except OSError:
            return False  # the client left mid-answer
        except Exception:
            if conn.closed:
                return False  # the client left (Starlette says so with its own ClientDisconnect)
            if not state.get("written"):
                raise  # answered as a 500
            log.exception("%s %s failed mid-answer", scope["method"], path)
            return False
        if not state["done"]:
            if state.get("written"):
                return False  # an answer cut short: the connection cannot carry another
            self._write(conn, self.refusal(500, "no answer"), False)
            return False
        return True
