"""A request's way in, shared by every route and by both HTTP servers: its body bounded, its JSON
parsed (on v2, with any binary tensors after it read in), the model it names found, its rows
checked; every refusal answered as JSON and counted.

The inference routes work on a `Call` (the model named, the headers, the body) and give an
`Answer` (status, bytes, headers), so the endpoint's own HTTP server (services.serving.wire)
answers them straight from the parsed request, and the Starlette app, under any ASGI server, turns
the same Answer into a Response."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from starlette.requests import Request
from starlette.responses import Response

from services.platform.settings import CairnSettings
from services.serving.binary_tensors import HEADER, BinaryProblem, split_body, with_binary_inputs
from services.serving.champion import Champions, Served
from services.serving.json_columns import FAST_BYTES, read_columns
from services.serving.logic import RequestProblem, checked_rows, version_problem
from services.serving.metrics import EndpointMetrics
from services.serving.records import RequestRecorder

JSON = "application/json"


@dataclass(slots=True)
class Answer:
    """What a route answers, before any server writes it."""

    body: bytes
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    media_type: str = JSON


@dataclass(slots=True)
class Call:
    """An inference request as the routes read it, whichever server parsed it."""

    name: str
    version: str | None  # a /v2/.../versions/{v}/ path's
    headers: Mapping[str, str]  # lower-case names
    body: bytes


def json_answer(doc: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Answer:
    return Answer(orjson.dumps(doc), status, headers or {})


def json_response(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return response(json_answer(doc, status, headers))


def response(answer: Answer) -> Response:
    return Response(answer.body, answer.status, dict(answer.headers), media_type=answer.media_type)


class Intake:
    """What the routes share: the champions, the counters, the request records, the worker's header."""

    def __init__(
        self,
        settings: CairnSettings,
        champions: Champions,
        metrics: EndpointMetrics,
        recorder: RequestRecorder,
        worker: dict[str, str],
    ):
        self.settings = settings
        self.champions = champions
        self.metrics = metrics
        self.recorder = recorder
        self.worker = worker  # which worker process answered

    def error(self, name: str, status: int, message: str, **extra: Any) -> Answer:
        self.metrics.requests.labels(name, str(status)).inc()
        return json_answer({"error": message, **extra}, status)

    async def read_body(self, request: Request, name: str) -> bytes | Answer:
        """The request body, bounded by CAIRN_MAX_REQUEST_BYTES (chunked bodies are counted too)."""
        limit = self.settings.max_request_bytes
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            if length.isdigit():
                return self.error(name, 413, f"body over {limit} bytes")
            return self.error(name, 400, "bad Content-Length")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():  # chunked bodies have no Content-Length: count
            size += len(chunk)
            if size > limit:
                return self.error(name, 413, f"body over {limit} bytes")
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def served(self, name: str, task: str | None, version: str | None = None) -> Served | Answer:
        """The served model a request names; `version` (a v2 path's) must be the one served."""
        models = self.champions.models
        served = models.get(name)
        if served is None:
            return self.error(name, 404, f"no champion for model {name!r}", models=sorted(models))
        if (problem := version_problem(name, version, served.version)) is not None:
            return self.error(name, 404, problem, version=version, served_version=str(served.version))
        is_text = served.task == "text_generation"
        if (task == "text_generation") != is_text:
            verb = "generate" if is_text else "predict"
            return self.error(name, 409, f"model {name!r} is a {served.task} model: use /{verb}")
        return served

    async def request(self, request: Request, task: str | None) -> tuple[str, Served, bytes] | Answer:
        """The model a request names (of `task`, if given) and its body, or the error answer."""
        name = request.path_params["name"]
        served = self.served(name, task)
        if isinstance(served, Answer):
            return served
        body = await self.read_body(request, name)
        if isinstance(body, Answer):
            return body
        return name, served, body

    async def route(self, request: Request, answer: Callable[[Call], Awaitable[Answer]]) -> Response:
        """An inference route under Starlette: the Call read from its request, the Answer as a Response."""
        name = request.path_params["name"]
        body = await self.read_body(request, name)
        if isinstance(body, Answer):
            return response(body)
        return response(await answer(Call(name, request.path_params.get("version"), request.headers, body)))

    @staticmethod
    def parse_json(body: bytes) -> Any:
        """orjson first (fast); the standard parser only for what orjson refuses, so that NaN and
        Infinity are told apart from broken JSON (a 422 about the value, not a 400)."""
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            return json.loads(body)

    async def admitted(self, call: Call, handle: Callable[[Call, Served], Awaitable[Answer]]) -> Answer:
        """A table request, counted in flight on its model's batcher until answered (so a batch
        waits for requests still being parsed, and only for them)."""
        served = self.served(call.name, None, call.version)
        if isinstance(served, Answer):
            return served
        served.batcher.inflight += 1
        try:
            return await handle(call, served)
        finally:
            served.batcher.inflight -= 1

    def rows(self, call: Call, served: Served, v2: bool) -> tuple[Any, np.ndarray, int] | Answer:
        """The request's document, its feature matrix and its row count, or the refusal."""
        name = served.name
        reader = served.reader
        header_length = call.headers.get(HEADER.lower()) if v2 else None
        if v2 and header_length is None and len(call.body) > FAST_BYTES:
            fast = read_columns(call.body, reader.schema)  # a large plain body, no object per value
            if fast is not None and (x := reader.matrix(*fast[1:])) is not None:
                return fast[0], x, fast[1]
        try:
            head, tensors = split_body(call.body, header_length)
            doc = self.parse_json(head)
            if v2:  # binary tensors (Triton's extension) become the JSON data they stand for
                doc = with_binary_inputs(doc, tensors)
        except BinaryProblem as exc:
            return self.error(name, 400, str(exc))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            what = "body" if header_length is None else f"JSON header ({HEADER} bytes)"
            return self.error(name, 400, f"{what} is not JSON")
        try:
            if v2:
                return doc, *reader.v2(doc)
            rows = checked_rows(doc, reader.schema)
            return doc, reader.from_rows(rows), len(rows)
        except RequestProblem as exc:
            return self.error(name, 422, str(exc))
