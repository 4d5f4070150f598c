"""The inference endpoint: serves each model name's champion on raw rows, hot-swapped on deploy.

A request takes a reference to the model it started with; a swap replaces the reference only
after the new bundle is loaded and verified, so in-flight requests finish on the old model and
no request sees a half-loaded one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import pandas as pd
from nats.js.api import DeliverPolicy
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from contracts import ArtifactRef, ContractError, ModelDeployed, decode, subject_for
from services.bus.connection import connect
from services.ml.bundle import BUNDLE_MEDIA_TYPE, LoadedModel, load_bundle
from services.ml.transform import input_schema
from services.settings import CairnSettings
from services.tracking import Tracker

log = logging.getLogger(__name__)
MAX_ROWS = 10_000


@dataclass(frozen=True)
class Served:
    name: str
    version: int
    model: LoadedModel


class RequestProblem(ValueError):
    pass


def parse_rows(body: Any, schema: dict[str, str]) -> pd.DataFrame:
    """Accept one object, a list of objects, or {"rows": [...]}; refuse unknown columns and bad types."""
    rows = body.get("rows") if isinstance(body, dict) and "rows" in body else body
    if isinstance(rows, dict):
        rows = [rows]
    if not isinstance(rows, list) or not rows:
        raise RequestProblem("send a JSON object, a non-empty list of objects, or {\"rows\": [...]}")
    if len(rows) > MAX_ROWS:
        raise RequestProblem(f"{len(rows)} rows; at most {MAX_ROWS} per request")
    problems = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            problems.append(f"row {i}: not an object")
            continue
        for key, value in row.items():
            kind = schema.get(key)
            if kind is None:
                problems.append(f"row {i}: unknown column {key!r}")
            elif value is not None and kind != "categorical" and (
                isinstance(value, str) or not isinstance(value, int | float)
            ):
                problems.append(f"row {i}: column {key!r} must be a number or null")
            elif isinstance(value, list | dict):
                problems.append(f"row {i}: column {key!r} must be a scalar")
        if len(problems) > 20:
            break
    if problems:
        raise RequestProblem("; ".join(problems[:20]))
    return pd.DataFrame.from_records(rows, columns=list(schema))


class InferenceServer:
    def __init__(self, settings: CairnSettings):
        self.settings = settings
        self.models: dict[str, Served] = {}
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "cairn_inference_requests_total", "Inference requests.", ["model", "status"], registry=self.registry
        )
        self.latency = Histogram("cairn_inference_seconds", "Inference latency.", ["model"], registry=self.registry)
        self.swaps = Counter("cairn_model_swaps_total", "Champion swaps.", ["model"], registry=self.registry)
        self.nc = None
        self._watch: asyncio.Task[Any] | None = None
        self.loaded = asyncio.Event()

    # Model state --------------------------------------------------------------------------
    def _load(self, name: str, version: int, uri: str, sha256: str) -> Served:
        ref = ArtifactRef(uri=uri, sha256=sha256, size=0, media_type=BUNDLE_MEDIA_TYPE)
        return Served(name, version, load_bundle(ref))

    async def swap(self, name: str, version: int, uri: str, sha256: str) -> None:
        current = self.models.get(name)
        if current is not None and current.version >= version:
            return
        served = await asyncio.to_thread(self._load, name, version, uri, sha256)
        self.models = {**self.models, name: served}
        self.swaps.labels(name).inc()
        log.info("serving %s v%d (%s)", name, version, sha256[:12])

    async def load_champions(self) -> None:
        tracker = await asyncio.to_thread(Tracker, self.settings.tracking_uri)
        champions = await asyncio.to_thread(tracker.champions)
        for name, champ in champions.items():
            await self.swap(name, champ.version, champ.model_uri, champ.model_sha256)

    async def watch_deployments(self) -> None:
        """Every replica sees every deployment: an ordered consumer from 'now', never shared."""
        js = self.nc.jetstream()
        subject = subject_for(ModelDeployed, self.settings.namespace)
        sub = await js.subscribe(subject, ordered_consumer=True, deliver_policy=DeliverPolicy.NEW)
        async for msg in sub.messages:
            try:
                event = decode(msg.data, {"cairn.model.deployed.v1"})
            except ContractError as exc:
                log.warning("ignoring malformed deployment event: %s", exc.reason)
                continue
            d = event.data
            try:
                await self.swap(d.model_name, d.version, d.model.uri, d.model.sha256)
            except Exception:
                log.exception("could not load %s v%d; still serving the previous champion", d.model_name, d.version)

    async def startup(self) -> None:
        self.nc = await connect(self.settings, "serve")
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
    async def predict(self, request: Request) -> Response:
        name = request.path_params["name"]
        served = self.models.get(name)
        if served is None:
            self.requests.labels(name, "404").inc()
            return JSONResponse({"error": f"no champion for model {name!r}", "models": sorted(self.models)}, 404)
        length = request.headers.get("content-length")
        if length is not None and int(length) > self.settings.max_request_bytes:
            self.requests.labels(name, "413").inc()
            return JSONResponse({"error": f"body over {self.settings.max_request_bytes} bytes"}, 413)
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > self.settings.max_request_bytes:
                self.requests.labels(name, "413").inc()
                return JSONResponse({"error": f"body over {self.settings.max_request_bytes} bytes"}, 413)
        try:
            frame = parse_rows(json.loads(raw), input_schema(served.model.spec))
        except (json.JSONDecodeError, UnicodeDecodeError):
            self.requests.labels(name, "400").inc()
            return JSONResponse({"error": "body is not JSON"}, 400)
        except RequestProblem as exc:
            self.requests.labels(name, "422").inc()
            return JSONResponse({"error": str(exc)}, 422)
        with self.latency.labels(name).time():
            predictions = await asyncio.to_thread(served.model.present, frame)
        self.requests.labels(name, "200").inc()
        return JSONResponse(
            {"model": name, "version": served.version, "sha256": served.model.ref.sha256, "predictions": predictions}
        )

    async def list_models(self, _: Request) -> Response:
        return JSONResponse(
            {
                name: {
                    "version": s.version,
                    "sha256": s.model.ref.sha256,
                    "family": s.model.manifest["family"],
                    "task": s.model.spec["task"],
                    "columns": input_schema(s.model.spec),
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
            await self.startup()
            yield
            await self.shutdown()

        return Starlette(
            routes=[
                Route("/v1/models", self.list_models),
                Route("/v1/models/{name}/predict", self.predict, methods=["POST"]),
                Route("/healthz", self.healthz),
                Route("/readyz", self.readyz),
                Route("/metrics", self.metrics),
            ],
            lifespan=lifespan,
        )
