"""The inference endpoint: serves each model name's champion on raw rows, hot-swapped on deploy.

A request takes a reference to the model it started with; a swap replaces the reference only
after the new bundle is loaded and verified, so in-flight requests finish on the old model and
no request sees a half-loaded one. With a verify key (CAIRN_MODEL_VERIFY_KEY, or the home's from
`cairn up`) a bundle is served only with a model signature that verifies (services.platform.model_signatures)
on its files and on the identity it is served as (name and version, rebuilt here, never read);
a champion refused for any reason leaves the old one serving and is published as `model.refused`.
Each model has its own micro-batcher (services.serving.batching):
concurrent requests share one predict call. Several worker processes (CAIRN_SERVE_WORKERS) each
run one InferenceServer with its own deployment watch, so each swaps by itself.

Routes: cairn's own (/v1/models...), and the Open Inference Protocol v2 (/v2/...) that KServe,
Triton and MLServer clients speak.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from contracts import ArtifactRef, ContractError, Envelope, ModelDeployed, ModelRefused, decode, subject_for
from contracts.records import RequestRecord
from services.platform import model_signatures
from services.platform.bus.connection import connect
from services.platform.ml.bundle import BUNDLE_MEDIA_TYPE, LoadedModel
from services.platform.ml.families import import_tree_library
from services.platform.ml.transform import input_schema
from services.platform.model_loading import (
    ESTIMATOR_FILE,
    MANIFEST_FILE,
    bundle_files,
    champion_files,
    champion_ref,
    from_bytes,
)
from services.platform.settings import CairnSettings
from services.platform.tracking import Champion, Tracker
from services.serving.batching import MicroBatcher, fast_predict
from services.serving.logic import (
    GenerateRequest,
    RequestProblem,
    checked_rows,
    features,
    newer,
    present,
    refusal,
    v2_outputs,
    v2_rows,
    version_problem,
)
from services.serving.records import RequestRecorder, input_hash
from services.serving.textstream import TextDecoder, TextModel

log = logging.getLogger(__name__)
WATCH_HEARTBEAT_S = 2.0
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # set by the launcher when several workers share /metrics
V2_TYPES = {"numeric": "FP64", "boolean": "BOOL", "categorical": "BYTES"}
SOURCE = "/cairn/serve"
PUBLISH_TIMEOUT_S = 5.0


def json_response(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(doc), status, headers, media_type="application/json")


@dataclass(frozen=True)
class Served:
    """One loaded champion and what serves it: its batcher (tables) or its loaded GPT (text)."""

    name: str
    version: int
    model: LoadedModel
    batcher: MicroBatcher | None = None
    text: TextModel | None = None

    @property
    def task(self) -> str:
        return self.model.spec["task"]


class InferenceServer:
    def __init__(self, settings: CairnSettings):
        self.settings = settings
        self.models: dict[str, Served] = {}
        self.registry = CollectorRegistry()
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        self.requests = Counter(
            "cairn_inference_requests_total",
            "Inference requests.",
            ["model", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "cairn_inference_seconds",
            "Inference latency.",
            ["model"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.swaps = Counter("cairn_model_swaps_total", "Champion swaps.", ["model"], registry=self.registry)
        self.refused = Counter(
            "cairn_models_refused_total",
            "Champions refused (unsigned, a signature that fails, hash mismatch, outside the store).",
            ["model"],
            registry=self.registry,
        )
        self.recorder = RequestRecorder(settings)
        self.worker = {"x-cairn-worker": str(os.getpid())}  # which worker process answered
        self._closing: set[asyncio.Task[None]] = set()  # swapped-out batchers finishing their queue
        self.nc = None
        self._watch: asyncio.Task[Any] | None = None
        self.loaded = asyncio.Event()
        self.watching = asyncio.Event()
        self.verify_key = None  # the model-signing public key; None: signatures are not checked

    # Model state --------------------------------------------------------------------------
    def _load(self, name: str, version: int, ref: ArtifactRef, signature: ArtifactRef | None) -> LoadedModel:
        """Only from the artifact store, only bytes that match their hash, never a pickle.

        The URIs come from events: the bundle's and its estimator's are checked against the store
        before anything is fetched (no request to an address an event names), then every byte is
        hash-verified and parsed as JSON / XGBoost UBJSON (services.platform.model_loading).
        """
        return self._verified(name, version, ref, bundle_files(ref, self.settings), signature)

    def _load_champion(self, name: str, champion: Champion, tracker: Tracker) -> LoadedModel:
        """The registry's champion, held to the same signature rule as a deployment: signed as this
        registered model's name and the version the alias names (tags rewritten to name another
        version's bundle and signature do not verify)."""
        files = champion_files(champion, tracker, self.settings)
        signature = model_signatures.registry_signature(champion.signature_uri, champion.signature_sha256)
        return self._verified(name, champion.version, champion_ref(champion), files, signature)

    def _verified(
        self,
        name: str,
        version: int,
        ref: ArtifactRef,
        files: dict[str, bytes],
        signature: ArtifactRef | None,
    ) -> LoadedModel:
        """The signature is checked on the very bytes that are then parsed and served, as the very
        name and version they will be served as (the identity is rebuilt from those, not read)."""
        model_signatures.check_champion(files, name, version, signature, self.verify_key, self.settings)
        return from_bytes(ref, files[MANIFEST_FILE], files[ESTIMATOR_FILE])

    def _ready(self, name: str, version: int, model: LoadedModel) -> Served:
        """Everything a request needs, built before the swap (a text model's GPT is loaded here)."""
        if model.task.value == "text_generation":
            config = model.manifest["estimator"]["config"]
            text = TextModel.load(model.checkpoint, config, model.spec["tokenizer"])
            return Served(name, version, model, text=text)
        batcher = MicroBatcher(
            fast_predict(model), self.settings.serve_batch_wait_ms / 1000, self.settings.serve_batch_rows
        )
        return Served(name, version, model, batcher=batcher)

    async def swap(self, name: str, version: int, load: Callable[[], LoadedModel]) -> None:
        """Load (and verify) off the event loop, then replace the reference in one step."""
        if not newer(self.models.get(name), version):
            return
        served = await asyncio.to_thread(lambda: self._ready(name, version, load()))
        if not newer(self.models.get(name), version):  # a newer one won while this one loaded
            return
        old = self.models.get(name)
        self.models = {**self.models, name: served}
        self.swaps.labels(name).inc()
        if old is not None and old.batcher is not None:
            task = asyncio.get_running_loop().create_task(old.batcher.close())  # answers its queue, then ends
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        log.info("serving %s v%d (%s)", name, version, served.model.ref.sha256[:12])

    async def load_champions(self) -> None:
        """Every registry champion, from cairn's store or through MLflow when only MLflow has it."""
        tracker = await asyncio.to_thread(Tracker.from_settings, self.settings)
        champions = await asyncio.to_thread(tracker.champions)
        for name, champ in champions.items():
            try:
                load = functools.partial(self._load_champion, name, champ, tracker)
                await self.swap(name, champ.version, load)
            except Exception as exc:  # noqa: BLE001 - one unusable champion must not keep the others down
                try:
                    model = champion_ref(champ)
                except Exception:  # noqa: BLE001 - no hash to name it by
                    model = None
                signature = model_signatures.registry_signature(champ.signature_uri, champ.signature_sha256)
                await self.refuse(name, champ.version, model, signature, why(exc), cause=None)

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
        ref = ArtifactRef(uri=d.model.uri, sha256=d.model.sha256, size=0, media_type=BUNDLE_MEDIA_TYPE)
        try:
            load = functools.partial(self._load, d.model_name, d.version, ref, d.signature)
            await self.swap(d.model_name, d.version, load)
        except Exception as exc:  # noqa: BLE001 - refused, whatever the cause: the old champion stays
            await self.refuse(d.model_name, d.version, d.model, d.signature, why(exc), cause=event)

    async def refuse(
        self,
        name: str,
        version: int,
        model: ArtifactRef | None,
        signature: ArtifactRef | None,
        reason: str,
        cause: Envelope[ModelDeployed] | None,
    ) -> None:
        """Count, log and publish a refusal (`model.refused`, in the event log for the audit); a failed
        publish is logged, never raised: the endpoint goes on serving what it served."""
        self.refused.labels(name).inc()
        served = self.models.get(name)
        kept = served.version if served else None
        still = f"v{kept}" if kept else "nothing"
        log.error("refusing %s v%d, still serving %s: %s", name, version, still, reason)
        event = refusal(
            name, version, model=model, signature=signature, reason=reason, served_version=kept,
            cause=cause, source=SOURCE,
        )  # fmt: skip
        try:
            await self.nc.jetstream().publish(
                subject_for(ModelRefused, self.settings.namespace),
                event.encode(),
                timeout=PUBLISH_TIMEOUT_S,
                headers={"Nats-Msg-Id": event.id},
            )
        except Exception as exc:  # noqa: BLE001 - NATS down or no permission: the log line above stays
            log.warning("could not publish the refusal of %s v%d: %s", name, version, exc)

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
        # A verify key that is set but missing or not an EC public key stops the start, loudly.
        self.verify_key = await asyncio.to_thread(model_signatures.verify_key, self.settings)
        if self.verify_key is None:
            log.warning("model signatures are not checked: no CAIRN_MODEL_VERIFY_KEY and none under home")
        else:
            log.info("serving only models whose signature verifies with %s", self.verify_key)
        self.nc = await connect(self.settings, "serve", persistent=True)
        self._watch = asyncio.create_task(self.watch_deployments())
        self.recorder.start(self.nc)
        await asyncio.to_thread(import_tree_library)
        await self.load_champions()
        self.loaded.set()

    async def shutdown(self) -> None:
        if self._watch:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self.recorder.stop()
        for served in self.models.values():
            if served.batcher is not None:
                await served.batcher.close()
        if self.nc:
            await self.nc.close()

    # HTTP helpers -------------------------------------------------------------------------
    def _error(self, name: str, status: int, message: str, **extra: Any) -> Response:
        self.requests.labels(name, str(status)).inc()
        return json_response({"error": message, **extra}, status)

    async def _read_body(self, request: Request, name: str) -> bytes | Response:
        """The request body, bounded by CAIRN_MAX_REQUEST_BYTES (chunked bodies are counted too)."""
        limit = self.settings.max_request_bytes
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            if length.isdigit():
                return self._error(name, 413, f"body over {limit} bytes")
            return self._error(name, 400, "bad Content-Length")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():  # chunked bodies have no Content-Length: count
            size += len(chunk)
            if size > limit:
                return self._error(name, 413, f"body over {limit} bytes")
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _served(self, name: str, task: str | None, version: str | None = None) -> Served | Response:
        """The served model a request names; `version` (a v2 path's) must be the one served."""
        served = self.models.get(name)
        if served is None:
            return self._error(name, 404, f"no champion for model {name!r}", models=sorted(self.models))
        if (problem := version_problem(name, version, served.version)) is not None:
            return self._error(name, 404, problem, version=version, served_version=str(served.version))
        is_text = served.task == "text_generation"
        if (task == "text_generation") != is_text:
            verb = "generate" if is_text else "predict"
            return self._error(name, 409, f"model {name!r} is a {served.task} model: use /{verb}")
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

    @staticmethod
    def _json(body: bytes) -> Any:
        """orjson first (fast); the standard parser only for what orjson refuses, so that NaN and
        Infinity are told apart from broken JSON (a 422 about the value, not a 400)."""
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            return json.loads(body)

    async def _admitted(self, request: Request, handle: Callable[..., Any]) -> Response:
        """A table request, counted in flight on its model's batcher until answered (so a batch
        waits for requests still being parsed, and only for them)."""
        served = self._served(request.path_params["name"], None, request.path_params.get("version"))
        if isinstance(served, Response):
            return served
        served.batcher.inflight += 1
        try:
            return await handle(request, served)
        finally:
            served.batcher.inflight -= 1

    async def _rows(self, request: Request, served: Served, v2: bool) -> tuple[str, bytes, Any] | Response:
        name = served.name
        body = await self._read_body(request, name)
        if isinstance(body, Response):
            return body
        try:
            doc = self._json(body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            return self._error(name, 400, "body is not JSON")
        try:
            schema = input_schema(served.model.spec)
            rows = v2_rows(doc, schema) if v2 else checked_rows(doc, schema)
        except RequestProblem as exc:
            return self._error(name, 422, str(exc))
        return name, body, (doc, rows)

    def _record(self, served: Served, route: str, body: bytes, rows: int, output: Any, start: float,
                request_id: str) -> None:
        if not self.recorder.sampled():
            return
        self.recorder.add(
            RequestRecord(
                request_id=request_id, model_name=served.name, model_version=served.version,
                model_sha256=served.model.ref.sha256, route=route, input_sha256=input_hash(body), rows=rows,
                output=output, received_at=time.time() - (time.perf_counter() - start),
                latency_ms=(time.perf_counter() - start) * 1000,
            )
        )

    # Tables -------------------------------------------------------------------------------
    async def predict(self, request: Request) -> Response:
        return await self._admitted(request, self._predict)

    async def _predict(self, request: Request, served: Served) -> Response:
        start = time.perf_counter()
        got = await self._rows(request, served, v2=False)
        if isinstance(got, Response):
            return got
        name, body, (_, rows) = got
        out = await served.batcher(features(served.model.spec, rows))
        predictions = present(served.task, served.model.spec["classes"], out)
        self.latency.labels(name).observe(time.perf_counter() - start)
        self.requests.labels(name, "200").inc()
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        self._record(served, "predict", body, len(rows), predictions, start, request_id)
        return json_response(
            {"model": name, "version": served.version, "sha256": served.model.ref.sha256,
             "predictions": predictions},
            headers=self.worker,
        )

    async def v2_infer(self, request: Request) -> Response:
        """Open Inference Protocol: named tensors in, named tensors out (JSON)."""
        return await self._admitted(request, self._v2_infer)

    async def _v2_infer(self, request: Request, served: Served) -> Response:
        start = time.perf_counter()
        got = await self._rows(request, served, v2=True)
        if isinstance(got, Response):
            return got
        name, body, (doc, rows) = got
        if not rows:
            return self._error(name, 422, "no rows")
        out = await served.batcher(features(served.model.spec, rows))
        outputs = v2_outputs(served.task, served.model.spec["classes"], out)
        wanted = {o.get("name") for o in doc.get("outputs") or [] if isinstance(o, dict)}
        if wanted:
            outputs = [o for o in outputs if o["name"] in wanted]
        self.latency.labels(name).observe(time.perf_counter() - start)
        self.requests.labels(name, "200").inc()
        request_id = str(doc.get("id") or request.headers.get("x-request-id") or uuid.uuid4().hex)
        self._record(served, "infer", body, len(rows), outputs, start, request_id)
        return json_response(
            {"model_name": name, "model_version": str(served.version), "id": request_id, "outputs": outputs,
             "parameters": {"sha256": served.model.ref.sha256}},
            headers=self.worker,
        )

    # Text ---------------------------------------------------------------------------------
    async def generate(self, request: Request) -> Response:
        """Continue a prompt: {prompt, max_tokens, temperature, top_k, seed, stream}.

        `tokens` counts the tokens really generated; with `stream: true` the answer is server-sent
        events, one per token, then a final one with the counts. The seed fixes the text either way.
        """
        start = time.perf_counter()
        got = await self._request(request, "text_generation")
        if isinstance(got, Response):
            return got
        name, served, body = got
        try:
            ask = GenerateRequest.model_validate_json(body)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            return self._error(name, 422, problems)
        text = served.text
        prompt_ids = text.prompt_ids(ask.prompt)
        head = {"model": name, "version": served.version, "sha256": served.model.ref.sha256}
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        tokens = text.tokens(prompt_ids, ask.max_tokens, ask.temperature, ask.top_k, ask.seed)
        if ask.stream:
            return StreamingResponse(
                self._events(served, head, tokens, len(prompt_ids), body, start, request_id),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache"},
            )
        ids = await asyncio.to_thread(list, tokens)
        decoder = TextDecoder(text.tokenizer)
        out = "".join(decoder.piece(i) for i in ids) + decoder.end()
        self.latency.labels(name).observe(time.perf_counter() - start)
        self.requests.labels(name, "200").inc()
        self._record(served, "generate", body, 1, out, start, request_id)
        return json_response({**head, "text": out, "tokens": len(ids), "prompt_tokens": len(prompt_ids)})

    async def _events(self, served: Served, head: dict, tokens: Any, prompt_tokens: int, body: bytes,
                      start: float, request_id: str) -> AsyncIterator[bytes]:
        """One SSE event per token as it is produced; a client that leaves stops the generation."""
        decoder = TextDecoder(served.text.tokenizer)
        count, parts = 0, []
        done = object()
        while (token := await asyncio.to_thread(next, tokens, done)) is not done:
            count += 1
            piece = decoder.piece(token)
            parts.append(piece)
            yield b"data: " + orjson.dumps({"token": token, "text": piece}) + b"\n\n"
        tail = decoder.end()
        parts.append(tail)
        final = {**head, "done": True, "text": "".join(parts), "tail": tail, "tokens": count,
                 "prompt_tokens": prompt_tokens}
        self.latency.labels(served.name).observe(time.perf_counter() - start)
        self.requests.labels(served.name, "200").inc()
        self._record(served, "generate", body, 1, final["text"], start, request_id)
        yield b"event: done\ndata: " + orjson.dumps(final) + b"\n\n"

    # Listing, health, metrics -------------------------------------------------------------
    async def list_models(self, _: Request) -> Response:
        return json_response(
            {
                name: {
                    "version": s.version,
                    "sha256": s.model.ref.sha256,
                    "family": s.model.manifest["family"],
                    "task": s.task,
                    "columns": input_schema(s.model.spec) if "columns" in s.model.spec else None,
                }
                for name, s in sorted(self.models.items())
            }
        )

    async def healthz(self, _: Request) -> Response:
        return json_response({"alive": True})

    def _is_ready(self) -> bool:
        return self.loaded.is_set() and self.nc is not None and self.nc.is_connected

    async def readyz(self, _: Request) -> Response:
        ok = self._is_ready()
        return json_response({"ready": ok, "models": sorted(self.models)}, 200 if ok else 503)

    async def v2_live(self, _: Request) -> Response:
        return json_response({"live": True})

    async def v2_ready(self, _: Request) -> Response:
        ok = self._is_ready()
        return json_response({"ready": ok}, 200 if ok else 503)

    async def v2_server(self, _: Request) -> Response:
        return json_response({"name": "cairn", "version": "1", "extensions": []})

    async def v2_model(self, request: Request) -> Response:
        """Model metadata: the input tensors are the model's columns, in the order a 2-D tensor uses."""
        name, version = request.path_params["name"], request.path_params.get("version")
        served = self.models.get(name)
        if served is None:
            return json_response({"error": f"no champion for model {name!r}"}, 404)
        if (problem := version_problem(name, version, served.version)) is not None:
            served_version = str(served.version)
            doc = {"error": problem, "version": version, "served_version": served_version}
            return json_response(doc, 404)
        if served.task == "text_generation":
            inputs = [{"name": "prompt", "datatype": "BYTES", "shape": [1]}]
            outputs = [{"name": "text", "datatype": "BYTES", "shape": [1]}]
        else:
            inputs = [{"name": c, "datatype": V2_TYPES.get(k, "FP64"), "shape": [-1]}
                      for c, k in input_schema(served.model.spec).items()]
            outputs = [{"name": "predict", "datatype": "FP64", "shape": [-1]}]
            if served.task == "classification":
                outputs = [{"name": "predict", "datatype": "BYTES", "shape": [-1]},
                           {"name": "probabilities", "datatype": "FP64",
                            "shape": [-1, len(served.model.spec["classes"])]}]
        return json_response(
            {"name": name, "versions": [str(served.version)],
             "platform": f"cairn-{served.model.manifest['family']}",
             "inputs": inputs, "outputs": outputs,
             "parameters": {"sha256": served.model.ref.sha256, "task": served.task}}
        )

    async def v2_model_ready(self, request: Request) -> Response:
        name, version = request.path_params["name"], request.path_params.get("version")
        served = self.models.get(name)
        ready = served is not None and version_problem(name, version, served.version) is None
        return json_response({"name": name, "ready": ready}, 200 if ready else 404)

    async def metrics(self, _: Request) -> Response:
        if self.multiprocess:  # every worker's counters, from prometheus_client's shared files
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
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
                Route("/v2", self.v2_server),
                Route("/v2/health/live", self.v2_live),
                Route("/v2/health/ready", self.v2_ready),
                Route("/v2/models/{name}", self.v2_model),
                Route("/v2/models/{name}/ready", self.v2_model_ready),
                Route("/v2/models/{name}/versions/{version}", self.v2_model),
                Route("/v2/models/{name}/versions/{version}/ready", self.v2_model_ready),
                Route("/v2/models/{name}/infer", self.v2_infer, methods=["POST"]),
                Route("/v2/models/{name}/versions/{version}/infer", self.v2_infer, methods=["POST"]),
                Route("/healthz", self.healthz),
                Route("/readyz", self.readyz),
                Route("/metrics", self.metrics),
            ],
            lifespan=lifespan,
        )


def why(exc: Exception) -> str:
    """A refusal's reason: a signature refusal says it all; anything else is named by its type."""
    if isinstance(exc, model_signatures.SignatureRefused):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def create_app() -> Starlette:
    """The app factory each worker process calls (settings from its CAIRN_ environment)."""
    return InferenceServer(CairnSettings()).app()
