"""The inference endpoint: serves each model name's champion on raw rows, hot-swapped on deploy.

A request takes a reference to the model it started with; a swap replaces the reference only
after the new bundle is loaded and verified, so in-flight requests finish on the old model and
no request sees a half-loaded one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from contracts import ArtifactRef, ContractError, ModelDeployed, decode, subject_for
from services.bus.connection import connect
from services.ml.bundle import BUNDLE_MEDIA_TYPE, LoadedModel
from services.ml.transform import input_schema
from services.model_loading import load_champion, load_from_store
from services.serving.logic import GenerateRequest, RequestProblem, newer, parse_rows
from services.settings import CairnSettings
from services.tracking import Tracker

log = logging.getLogger(__name__)
WATCH_HEARTBEAT_S = 2.0


@dataclass(frozen=True)
class Served:
    name: str
    version: int
    model: LoadedModel


class InferenceServer:
    def __init__(self, settings: CairnSettings):
        self.settings = settings
        self.models: dict[str, Served] = {}
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "cairn_inference_requests_total",
            "Inference requests.",
            ["model", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "cairn_inference_seconds", "Inference latency.", ["model"], registry=self.registry
        )
        self.swaps = Counter("cairn_model_swaps_total", "Champion swaps.", ["model"], registry=self.registry)
        self.refused = Counter(
            "cairn_models_refused_total",
            "Champions refused (hash mismatch, outside the store, not a bundle).",
            ["model"],
            registry=self.registry,
        )
        self.nc = None
        self._watch: asyncio.Task[Any] | None = None
        self.loaded = asyncio.Event()
        self.watching = asyncio.Event()

    # Model state --------------------------------------------------------------------------
    def _load(self, name: str, version: int, uri: str, sha256: str) -> Served:
        """Only from the artifact store, only bytes that match their hash, never a pickle.

        The URIs come from events: the bundle's and its estimator's are checked against the store
        before anything is fetched (no request to an address an event names), then every byte is
        hash-verified and parsed as JSON / XGBoost UBJSON (services.model_loading).
        """
        ref = ArtifactRef(uri=uri, sha256=sha256, size=0, media_type=BUNDLE_MEDIA_TYPE)
        return Served(name, version, load_from_store(ref, self.settings))

    async def swap(
        self, name: str, version: int, uri: str, sha256: str, load: Callable[[], LoadedModel] | None = None
    ) -> None:
        """`load` overrides where the bundle comes from (a registry champion may live in MLflow)."""
        if not newer(self.models.get(name), version):
            return
        if load is None:
            served = await asyncio.to_thread(self._load, name, version, uri, sha256)
        else:
            served = Served(name, version, await asyncio.to_thread(load))
        self.models = {**self.models, name: served}
        self.swaps.labels(name).inc()
        log.info("serving %s v%d (%s)", name, version, sha256[:12])

    async def load_champions(self) -> None:
        """Every registry champion, from cairn's store or through MLflow when only MLflow has it."""
        tracker = await asyncio.to_thread(Tracker.from_settings, self.settings)
        champions = await asyncio.to_thread(tracker.champions)
        for name, champ in champions.items():
            try:
                await self.swap(
                    name,
                    champ.version,
                    champ.model_uri,
                    champ.model_sha256,
                    functools.partial(load_champion, champ, tracker, self.settings),
                )
            except Exception:  # noqa: BLE001 - one unusable champion must not keep the others down
                self.refused.labels(name).inc()
                log.exception("refusing champion %s v%d", name, champ.version)

    async def on_deployment(self, data: bytes) -> None:
        try:
            event = decode(data, {ModelDeployed.EVENT_TYPE})
        except ContractError as exc:
            log.warning("ignoring malformed deployment event: %s", exc.reason[:300])
            return
        except Exception as exc:  # noqa: BLE001 - hostile bytes never stop the watch
            log.warning("ignoring undecodable deployment event: %s", type(exc).__name__)
            return
        d = event.data
        try:
            await self.swap(d.model_name, d.version, d.model.uri, d.model.sha256)
        except Exception as exc:  # noqa: BLE001
            self.refused.labels(d.model_name).inc()
            log.error(
                "refusing %s v%d, still serving the previous champion: %s", d.model_name, d.version, exc
            )

    async def watch_deployments(self) -> None:
        """Every replica sees every deployment, from 'now', through a consumer of its own.

        Not nats-py's ordered consumer: that one is created without a name, through an API
        subject that no permission can pin to a filter. This is the same idea with a name: a
        push consumer (no acks, in memory) filtered on the deployed subject, re-created from the
        next unseen stream sequence whenever heartbeats stop (nats-server restarted, connection
        lost). Permissions: `$JS.API.CONSUMER.CREATE.<stream>.*.cairn.model.deployed.v1` only.
        """
        js = self.nc.jetstream()
        subject = subject_for(ModelDeployed, self.settings.namespace)
        next_seq: int | None = None
        while True:
            sub = None
            try:
                if next_seq is None:
                    next_seq = (await js.stream_info(self.settings.stream)).state.last_seq + 1
                inbox = self.nc.new_inbox()
                sub = await self.nc.subscribe(inbox)
                await js.add_consumer(  # the manager API: unlike subscribe, it sets the consumer's name
                    self.settings.stream,
                    ConsumerConfig(
                        name=f"serve-{uuid.uuid4().hex[:16]}",
                        filter_subject=subject,
                        deliver_subject=inbox,
                        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                        opt_start_seq=next_seq,
                        ack_policy=AckPolicy.NONE,
                        idle_heartbeat=WATCH_HEARTBEAT_S,
                        inactive_threshold=30.0,
                        mem_storage=True,
                        num_replicas=1,
                    ),
                )
                self.watching.set()
                while True:
                    msg = await sub.next_msg(timeout=WATCH_HEARTBEAT_S * 3)
                    if not msg.reply:  # idle heartbeat (status 100): the consumer is alive
                        continue
                    seq = msg.metadata.sequence.stream
                    if seq < next_seq:
                        continue
                    next_seq = seq + 1
                    await self.on_deployment(msg.data)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - timeouts, disconnects, a restarted server
                self.watching.clear()
                log.info("deployment watch restarts from seq %s: %s", next_seq, type(exc).__name__)
                await asyncio.sleep(0.5)
            finally:
                if sub is not None:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()

    async def startup(self) -> None:
        self.nc = await connect(self.settings, "serve", persistent=True)
        self._watch = asyncio.create_task(self.watch_deployments())
        await self.load_champions()
        self.loaded.set()

    async def shutdown(self) -> None:
        if self._watch:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self.nc:
            await self.nc.close()

    # HTTP ---------------------------------------------------------------------------------
    async def _read_body(self, request: Request, name: str) -> bytes | Response:
        """The request body, bounded by CAIRN_MAX_REQUEST_BYTES (chunked bodies are counted too)."""
        limit = self.settings.max_request_bytes
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            status = 413 if length.isdigit() else 400
            self.requests.labels(name, str(status)).inc()
            error = f"body over {limit} bytes" if status == 413 else "bad Content-Length"
            return JSONResponse({"error": error}, status)
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():  # chunked bodies have no Content-Length: count
            size += len(chunk)
            if size > limit:
                self.requests.labels(name, "413").inc()
                return JSONResponse({"error": f"body over {limit} bytes"}, 413)
            chunks.append(chunk)
        return b"".join(chunks)

    def _served(self, name: str, task: str | None) -> Served | Response:
        served = self.models.get(name)
        if served is None:
            self.requests.labels(name, "404").inc()
            return JSONResponse(
                {"error": f"no champion for model {name!r}", "models": sorted(self.models)}, 404
            )
        is_text = served.model.spec["task"] == "text_generation"
        if (task == "text_generation") != is_text:
            self.requests.labels(name, "409").inc()
            verb = "generate" if is_text else "predict"
            return JSONResponse(
                {"error": f"model {name!r} is a {served.model.spec['task']} model: use /{verb}"}, 409
            )
        return served

    async def _request(self, request: Request, task: str | None) -> tuple[str, Served, bytes] | Response:
        """The model a request names (of `task`, if given) and its body, or the error response."""
        name = request.path_params["name"]
        served = self._served(name, task)
        if isinstance(served, Response):
            return served
        body = await self._read_body(request, name)
        if isinstance(body, Response):
            return body
        return name, served, body

    async def predict(self, request: Request) -> Response:
        got = await self._request(request, None)
        if isinstance(got, Response):
            return got
        name, served, body = got
        try:
            frame = parse_rows(json.loads(body), input_schema(served.model.spec))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            self.requests.labels(name, "400").inc()
            return JSONResponse({"error": "body is not JSON"}, 400)
        except RequestProblem as exc:
            self.requests.labels(name, "422").inc()
            return JSONResponse({"error": str(exc)}, 422)
        with self.latency.labels(name).time():
            predictions = await asyncio.to_thread(served.model.present, frame)
        self.requests.labels(name, "200").inc()
        return JSONResponse(
            {
                "model": name,
                "version": served.version,
                "sha256": served.model.ref.sha256,
                "predictions": predictions,
            }
        )

    async def generate(self, request: Request) -> Response:
        """Continue a prompt: {prompt, max_tokens, temperature, top_k, seed} (the seed fixes the text)."""
        got = await self._request(request, "text_generation")
        if isinstance(got, Response):
            return got
        name, served, body = got
        try:
            ask = GenerateRequest.model_validate_json(body)
        except ValidationError as exc:
            self.requests.labels(name, "422").inc()
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            return JSONResponse({"error": problems}, 422)
        with self.latency.labels(name).time():
            text = await asyncio.to_thread(
                served.model.generate, ask.prompt, ask.max_tokens, ask.temperature, ask.top_k, ask.seed
            )
        self.requests.labels(name, "200").inc()
        return JSONResponse({"model": name, "version": served.version, "sha256": served.model.ref.sha256,
                             "text": text, "tokens": ask.max_tokens})

    async def list_models(self, _: Request) -> Response:
        return JSONResponse(
            {
                name: {
                    "version": s.version,
                    "sha256": s.model.ref.sha256,
                    "family": s.model.manifest["family"],
                    "task": s.model.spec["task"],
                    "columns": input_schema(s.model.spec) if "columns" in s.model.spec else None,
                }
                for name, s in sorted(self.models.items())
            }
        )

    async def healthz(self, _: Request) -> Response:
        return JSONResponse({"alive": True})

    async def readyz(self, _: Request) -> Response:
        ok = self.loaded.is_set() and self.nc is not None and self.nc.is_connected
        return JSONResponse({"ready": ok, "models": sorted(self.models)}, 200 if ok else 503)

    async def metrics(self, _: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    def app(self) -> Starlette:
        @contextlib.asynccontextmanager
        async def lifespan(_: Starlette):
            try:  # a startup that fails half-way (MLflow unreachable) still closes NATS and the watch
                await self.startup()
                yield
            finally:
                await self.shutdown()

        return Starlette(
            routes=[
                Route("/v1/models", self.list_models),
                Route("/v1/models/{name}/predict", self.predict, methods=["POST"]),
                Route("/v1/models/{name}/generate", self.generate, methods=["POST"]),
                Route("/healthz", self.healthz),
                Route("/readyz", self.readyz),
                Route("/metrics", self.metrics),
            ],
            lifespan=lifespan,
        )
