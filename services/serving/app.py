"""The inference endpoint: serves each model name's champion on raw rows, hot-swapped on deploy.

This module assembles it: the champions (services.serving.champion) kept current by the
deployment watch (services.serving.watch), and the routes that answer from them: cairn's own
(/v1/models..., services.serving.v1), text generation (services.serving.generate), and the Open
Inference Protocol v2 (/v2/..., services.serving.v2) that KServe, Triton and MLServer clients
speak, and the same protocol over gRPC on CAIRN_SERVE_GRPC_PORT (services.serving.grpc_server), on
this event loop so that it answers from these champions. Several worker processes
(CAIRN_SERVE_WORKERS) each run one InferenceServer with its own deployment watch, so each swaps by
itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.platform import model_signatures
from services.platform.bus.connection import connect
from services.platform.endpoint_token import read_token
from services.platform.ml.families import import_tree_library
from services.platform.settings import CairnSettings
from services.serving.auth import RequireToken
from services.serving.champion import Champions
from services.serving.generate import Generation
from services.serving.grpc_server import grpc_endpoint
from services.serving.intake import Intake
from services.serving.metrics import EndpointMetrics
from services.serving.records import RequestRecorder
from services.serving.v1 import V1
from services.serving.v2 import V2
from services.serving.watch import watch_deployments

log = logging.getLogger(__name__)


def warm_compiled_forest() -> None:
    """numba imported and the walk compiled off the event loop, and only where the compiled forest
    is on (numba's import alone is 100 MiB of a worker's memory)."""
    from services.serving.forest import warm

    warm()


class InferenceServer:
    def __init__(self, settings: CairnSettings):
        self.settings = settings
        self.metrics = EndpointMetrics()
        self.champions = Champions(settings, self.metrics)
        self.recorder = RequestRecorder(settings)
        worker = {"x-cairn-worker": str(os.getpid())}  # which worker process answered
        self.intake = Intake(settings, self.champions, self.metrics, self.recorder, worker)
        self._watch: asyncio.Task[Any] | None = None
        self.watching = asyncio.Event()
        self._grpc = contextlib.AsyncExitStack()  # the gRPC server, when CAIRN_SERVE_GRPC_PORT is set
        self.grpc_port: int | None = None  # the port it bound
        self.token = read_token(settings)  # a tenant's endpoint answers its token's holders only
        self.v1, self.v2, self.text = V1(self.intake), V2(self.intake), Generation(self.intake)

    async def startup(self) -> None:
        champions = self.champions
        # A verify key that is set but missing or not an EC public key stops the start, loudly.
        champions.verify_key = await asyncio.to_thread(model_signatures.verify_key, self.settings)
        if champions.verify_key is None:
            log.warning("model signatures are not checked: no CAIRN_MODEL_VERIFY_KEY and none under home")
        else:
            log.info("serving only models whose signature verifies with %s", champions.verify_key)
        champions.nc = await connect(self.settings, "serve", persistent=True)
        self._watch = asyncio.create_task(
            watch_deployments(champions.nc, self.settings, champions.on_deployment, self.watching)
        )
        self.recorder.start(champions.nc)
        await asyncio.to_thread(import_tree_library)
        if self.settings.serve_compiled_trees:
            await asyncio.to_thread(warm_compiled_forest)
        await champions.load_champions()
        # What start-up made (libraries, the champions) lives as long as the worker: frozen, the
        # collector stops walking it on every pass (one-row throughput +35-45 %, p99 45 ms -> 10-20
        # ms in docs/SERVING.md's alternated runs).
        gc.freeze()
        champions.loaded.set()
        if port := self.settings.serve_grpc_port:  # several workers share the port, as HTTP's
            shared = self.settings.serve_workers != 1
            endpoint = grpc_endpoint(self.intake, self.settings.serve_host, port, shared, self.token)
            self.grpc_port = await self._grpc.enter_async_context(endpoint)
            log.info("Open Inference Protocol over gRPC on %s:%d", self.settings.serve_host, self.grpc_port)

    async def shutdown(self) -> None:
        await self._grpc.aclose()  # in-flight calls finish (STOP_GRACE_S) before the batchers close
        if self._watch:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self.recorder.stop()
        await self.champions.close()
        if self.champions.nc:
            await self.champions.nc.close()

    async def metrics_page(self, _: Request) -> Response:
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    def inference_handlers(self) -> dict[str, Any]:
        """The routes services.serving.wire answers without the app, by `inference_route`'s kind."""
        return {"v1": self.v1.answer, "v2": self.v2.answer}

    def app(self) -> Starlette:
        """Every route as an ASGI app, for any ASGI server. services.serving.wire serves it with the
        inference routes answered before it; the lifespan here is for the other servers (tests)."""

        @contextlib.asynccontextmanager
        async def lifespan(_: Starlette):
            try:  # a startup that fails half-way (MLflow unreachable) still closes NATS and the watch
                await self.startup()
                yield
            finally:
                await self.shutdown()

        v1, v2, text = self.v1, self.v2, self.text
        return Starlette(
            routes=[
                Route("/v1/models", v1.list_models),
                Route("/v1/models/{name}/predict", v1.predict, methods=["POST"]),
                Route("/v1/models/{name}/generate", text.generate, methods=["POST"]),
                Route("/v2", v2.server),
                Route("/v2/health/live", v2.live),
                Route("/v2/health/ready", v2.ready),
                Route("/v2/models/{name}", v2.model),
                Route("/v2/models/{name}/ready", v2.model_ready),
                Route("/v2/models/{name}/versions/{version}", v2.model),
                Route("/v2/models/{name}/versions/{version}/ready", v2.model_ready),
                Route("/v2/models/{name}/infer", v2.infer, methods=["POST"]),
                Route("/v2/models/{name}/versions/{version}/infer", v2.infer, methods=["POST"]),
                Route("/healthz", v1.healthz),
                Route("/readyz", v1.readyz),
                Route("/metrics", self.metrics_page),
            ],
            middleware=[Middleware(RequireToken, token=self.token)] if self.token else [],
            lifespan=lifespan,
        )


