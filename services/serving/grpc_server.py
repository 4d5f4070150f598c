"""The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`, as KServe and Triton
serve it) and gRPC health checking (`grpc.health.v1.Health`, for Kubernetes' `grpc:` probe), on
CAIRN_SERVE_GRPC_PORT beside the HTTP routes.

The server runs on the HTTP server's event loop and answers from the same champions, batchers,
counters and request records (services.serving.intake.Intake), so a hot swap is seen by both
protocols at once and a gRPC request shares predict calls with HTTP ones. A request reads as the
HTTP v2 route's JSON (services.serving.grpc_tensors) and is answered by the same functions.
Refusals are gRPC status codes: NOT_FOUND (no such model, or not the version asked for),
INVALID_ARGUMENT (tensors that do not make rows), FAILED_PRECONDITION (a text model asked to
infer); each is counted under `status` = the code's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc

from services.platform.ml.transform import input_schema
from services.serving.auth import TokenInterceptor
from services.serving.binary_tensors import BinaryProblem
from services.serving.champion import Served
from services.serving.grpc_tensors import request_doc, response
from services.serving.grpc_v2 import health_v1_pb2 as health_pb
from services.serving.grpc_v2 import predict_v2_pb2 as pb
from services.serving.intake import Intake
from services.serving.logic import RequestProblem, model_tensors, v2_outputs, version_problem

SERVICE = "inference.GRPCInferenceService"  # the protocol's name for it, whatever our proto package
HEALTH = "grpc.health.v1.Health"
LIVENESS = "liveness"  # the health service name a liveness probe asks for: SERVING while the process answers
STOP_GRACE_S = 10.0  # in-flight calls get this long to finish at shutdown
WATCH_POLL_S = 1.0  # how often a health Watch looks at readiness (it changes with NATS, not on an event)


class GrpcV2:
    """inference.GRPCInferenceService's six unary calls, answered from the endpoint's champions."""

    def __init__(self, intake: Intake):
        self.intake = intake
        self.worker = tuple(intake.worker.items())  # which worker process answered (trailing metadata)

    async def server_live(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.intake.champions.is_ready())

    async def server_metadata(
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="cairn", version="1")

    async def model_ready(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        served = self.intake.champions.models.get(request.name)
        ready = (
            served is not None
            and version_problem(request.name, request.version or None, served.version) is None
        )
        return pb.ModelReadyResponse(ready=ready)

    async def model_metadata(
        self, request: pb.ModelMetadataRequest, context: Any
    ) -> pb.ModelMetadataResponse:
        served = await self._served(request.name, request.version, context, count=False)
        spec = served.model.spec
        schema = input_schema(spec) if served.task != "text_generation" else {}
        inputs, outputs = model_tensors(served.task, schema, spec.get("classes") or [])
        return pb.ModelMetadataResponse(
            name=served.name, versions=[str(served.version)],
            platform=f"cairn-{served.model.manifest['family']}",
            inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in inputs],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in outputs],
        )  # fmt: skip

    async def model_infer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        start = time.perf_counter()
        served = await self._served(request.model_name, request.model_version, context, count=True)
        if served.batcher is None:
            await self._refuse(
                context, served.name, grpc.StatusCode.FAILED_PRECONDITION,
                f"model {served.name!r} is a {served.task} model: use POST /v1/models/{served.name}/generate",
            )  # fmt: skip
        served.batcher.inflight += 1  # counted while parsed, as the HTTP routes do (batching.py)
        try:
            return await self._infer(request, served, start, context)
        finally:
            served.batcher.inflight -= 1

    async def _infer(self, request: pb.ModelInferRequest, served: Served, start: float, context: Any):
        intake, name = self.intake, served.name
        try:
            doc = request_doc(request)
            x, n = served.reader.v2(doc)
            if not n:
                raise RequestProblem("no rows")
        except (RequestProblem, BinaryProblem) as exc:
            await self._refuse(context, name, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        out = await served.batcher(x)
        outputs = v2_outputs(served.task, served.model.spec["classes"], out)
        wanted = {o["name"] for o in doc["outputs"]}
        if wanted:
            outputs = [o for o in outputs if o["name"] in wanted]
        intake.metrics.answered(name, start, grpc.StatusCode.OK.name)
        request_id = request.id  # the request's, if any, as over HTTP: a uuid4 only for a record
        if intake.recorder.rate > 0:
            request_id = request_id or uuid.uuid4().hex
            intake.recorder.record(served, "infer", request.SerializeToString(), n, outputs, start,
                                   request_id)
        context.set_trailing_metadata(self.worker)
        answer = {
            "model_name": name,
            "model_version": str(served.version),
            "id": request_id,
            "outputs": outputs,
            "parameters": {"sha256": served.model.ref.sha256},
        }
        return response(answer, raw=bool(request.raw_input_contents))

    async def _served(self, name: str, version: str, context: Any, count: bool) -> Served:
        """The champion a call names, or the call ends NOT_FOUND (counted, for inference)."""
        models = self.intake.champions.models
        served = models.get(name)
        if served is None:
            message = f"no champion for model {name!r}; served: {sorted(models)}"
        elif (problem := version_problem(name, version or None, served.version)) is not None:
            message = problem
        else:
            return served
        if count:
            self.intake.metrics.requests.labels(name, grpc.StatusCode.NOT_FOUND.name).inc()
        await context.abort(grpc.StatusCode.NOT_FOUND, message)

    async def _refuse(self, context: Any, name: str, code: grpc.StatusCode, message: str) -> NoReturn:
        self.intake.metrics.requests.labels(name, code.name).inc()
        await context.abort(code, message)


class Health:
    """grpc.health.v1.Health: "" and the inference service are SERVING while the endpoint is ready
    (champions loaded, NATS connected: what /readyz says), "liveness" while the process answers."""

    def __init__(self, intake: Intake):
        self.champions = intake.champions

    def status(self, service: str) -> int | None:
        if service == LIVENESS:
            return health_pb.HealthCheckResponse.SERVING
        if service in ("", SERVICE):
            ready = self.champions.is_ready()
            return (
                health_pb.HealthCheckResponse.SERVING if ready else health_pb.HealthCheckResponse.NOT_SERVING
            )
        return None

    async def check(
        self, request: health_pb.HealthCheckRequest, context: Any
    ) -> health_pb.HealthCheckResponse:
        status = self.status(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb.HealthCheckResponse(status=status)

    async def watch(self, request: health_pb.HealthCheckRequest, context: Any) -> AsyncIterator[Any]:
        """The status now, then each change, until the caller leaves."""
        last = None
        while True:
            status = self.status(request.service)
            status = health_pb.HealthCheckResponse.SERVICE_UNKNOWN if status is None else status
            if status != last:
                yield health_pb.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(WATCH_POLL_S)


def _unary(method: Any, request: Any, reply: Any) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(
        method, request_deserializer=request.FromString, response_serializer=reply.SerializeToString
    )


def handlers(intake: Intake) -> list[grpc.GenericRpcHandler]:
    """Both services under their protocol names, with cairn's messages (predict_v2.proto says why)."""
    v2, health = GrpcV2(intake), Health(intake)
    return [
        grpc.method_handlers_generic_handler(SERVICE, {
            "ServerLive": _unary(v2.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": _unary(v2.server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ServerMetadata": _unary(v2.server_metadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse),
            "ModelReady": _unary(v2.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ModelMetadata": _unary(v2.model_metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
            "ModelInfer": _unary(v2.model_infer, pb.ModelInferRequest, pb.ModelInferResponse),
        }),
        grpc.method_handlers_generic_handler(HEALTH, {
            "Check": _unary(health.check, health_pb.HealthCheckRequest, health_pb.HealthCheckResponse),
            "Watch": grpc.unary_stream_rpc_method_handler(
                health.watch, request_deserializer=health_pb.HealthCheckRequest.FromString,
                response_serializer=health_pb.HealthCheckResponse.SerializeToString,
            ),
        }),
    ]  # fmt: skip


@contextlib.asynccontextmanager
async def grpc_endpoint(
    intake: Intake, host: str, port: int, shared_port: bool, token: str | None = None
) -> AsyncIterator[int]:
    """The gRPC server on `host:port` while the context lasts. `shared_port`: several worker
    processes bind the one port (SO_REUSEPORT; the kernel spreads connections over them), as
    uvicorn's workers share the HTTP port. Requests larger than CAIRN_MAX_REQUEST_BYTES are
    refused by gRPC itself (RESOURCE_EXHAUSTED). With `token`, calls without it are UNAUTHENTICATED."""
    server = grpc.aio.server(
        interceptors=[TokenInterceptor(token)] if token else None,
        options=[
            ("grpc.so_reuseport", int(shared_port)),
            ("grpc.max_receive_message_length", intake.settings.max_request_bytes),
        ]
    )
    server.add_generic_rpc_handlers(handlers(intake))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise RuntimeError(f"cannot serve gRPC on {address} (CAIRN_SERVE_GRPC_PORT): {exc}") from None
    await server.start()
    try:
        yield bound
    finally:
        await server.stop(STOP_GRACE_S)
