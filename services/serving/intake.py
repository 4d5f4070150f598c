"""A request's way in, shared by every route: its body bounded, its JSON parsed (on v2, with any
binary tensors after it read in), the model it names found, its rows checked; every refusal
answered as JSON and counted."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from services.platform.ml.transform import input_schema
from services.platform.settings import CairnSettings
from services.serving.binary_tensors import HEADER, BinaryProblem, split_body, with_binary_inputs
from services.serving.champion import Champions, Served
from services.serving.logic import RequestProblem, checked_rows, v2_rows, version_problem
from services.serving.metrics import EndpointMetrics
from services.serving.records import RequestRecorder


def json_response(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(doc), status, headers, media_type="application/json")


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

    def error(self, name: str, status: int, message: str, **extra: Any) -> Response:
        self.metrics.requests.labels(name, str(status)).inc()
        return json_response({"error": message, **extra}, status)

    async def read_body(self, request: Request, name: str) -> bytes | Response:
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

    def served(self, name: str, task: str | None, version: str | None = None) -> Served | Response:
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

    async def request(self, request: Request, task: str | None) -> tuple[str, Served, bytes] | Response:
        """The model a request names (of `task`, if given) and its body, or the error response."""
        name = request.path_params["name"]
        served = self.served(name, task)
        if isinstance(served, Response):
            return served
        body = await self.read_body(request, name)
        if isinstance(body, Response):
            return body
        return name, served, body

    @staticmethod
    def parse_json(body: bytes) -> Any:
        """orjson first (fast); the standard parser only for what orjson refuses, so that NaN and
        Infinity are told apart from broken JSON (a 422 about the value, not a 400)."""
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            return json.loads(body)

    async def admitted(self, request: Request, handle: Callable[..., Any]) -> Response:
        """A table request, counted in flight on its model's batcher until answered (so a batch
        waits for requests still being parsed, and only for them)."""
        served = self.served(request.path_params["name"], None, request.path_params.get("version"))
        if isinstance(served, Response):
            return served
        served.batcher.inflight += 1
        try:
            return await handle(request, served)
        finally:
            served.batcher.inflight -= 1

    async def rows(self, request: Request, served: Served, v2: bool) -> tuple[str, bytes, Any] | Response:
        name = served.name
        body = await self.read_body(request, name)
        if isinstance(body, Response):
            return body
        header_length = request.headers.get(HEADER) if v2 else None
        try:
            head, tensors = split_body(body, header_length)
            doc = self.parse_json(head)
            if v2:  # binary tensors (Triton's extension) become the JSON data they stand for
                doc = with_binary_inputs(doc, tensors)
        except BinaryProblem as exc:
            return self.error(name, 400, str(exc))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            what = "body" if header_length is None else f"JSON header ({HEADER} bytes)"
            return self.error(name, 400, f"{what} is not JSON")
        try:
            schema = input_schema(served.model.spec)
            rows = v2_rows(doc, schema) if v2 else checked_rows(doc, schema)
        except RequestProblem as exc:
            return self.error(name, 422, str(exc))
        return name, body, (doc, rows)
