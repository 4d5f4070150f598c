"""The champion each model name is served by: loaded only verified, swapped in one step, refused loudly.

A request takes a reference to the model it started with; a swap replaces the reference only
after the new bundle is loaded and verified, so in-flight requests finish on the old model and
no request sees a half-loaded one. With a verify key (CAIRN_MODEL_VERIFY_KEY, or the home's from
`cairn up`) a bundle is served only with a model signature that verifies (services.platform.model_signatures)
on its files and on the identity it is served as (name and version, rebuilt here, never read);
a champion refused for any reason leaves the old one serving and is published as `model.refused`.
Each model has its own micro-batcher (services.serving.batching): concurrent requests share one
predict call.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

from contracts import ArtifactRef, ContractError, Envelope, ModelDeployed, ModelRefused, decode, subject_for
from services.platform import model_signatures
from services.platform.bus.availability import publish_when_available
from services.platform.ml.bundle import BUNDLE_MEDIA_TYPE, LoadedModel
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
from services.serving.logic import TableReader, newer, refusal
from services.serving.metrics import EndpointMetrics
from services.serving.textstream import TextModel

log = logging.getLogger(__name__)
SOURCE = "/cairn/serve"
PUBLISH_TIMEOUT_S = 5.0
REFUSAL_PATIENCE_S = 10.0  # a refusal is an audit record: worth waiting out an election for


@dataclass(frozen=True)
class Served:
    """One loaded champion and what serves it: its batcher (tables) or its loaded GPT (text)."""

    name: str
    version: int
    model: LoadedModel
    batcher: MicroBatcher | None = None
    text: TextModel | None = None
    predictor: str = ""  # what predicts: compiled-forest, xgboost, or the model's family

    @property
    def task(self) -> str:
        return self.model.spec["task"]

    @functools.cached_property
    def reader(self) -> TableReader:
        """How a table request becomes this model's feature matrix."""
        return TableReader(self.model.spec)


class Champions:
    """The served model of each name, and the loading, swapping and refusing that change it."""

    def __init__(self, settings: CairnSettings, metrics: EndpointMetrics):
        self.settings = settings
        self.metrics = metrics
        self.models: dict[str, Served] = {}
        self._closing: set[asyncio.Task[None]] = set()  # swapped-out batchers finishing their queue
        self.nc = None
        self.loaded = asyncio.Event()
        self.verify_key = None  # the model-signing public key; None: signatures are not checked

    def is_ready(self) -> bool:
        return self.loaded.is_set() and self.nc is not None and self.nc.is_connected

    def _load(self, name: str, version: int, ref: ArtifactRef, signature: ArtifactRef | None) -> LoadedModel:
        """Only from the artifact store, only bytes that match their hash, never a pickle.

        The URIs come from events: the bundle's and its estimator's are checked against the store
        before anything is fetched (no request to an address an event names), then every byte is
        hash-verified and parsed as JSON / XGBoost UBJSON (services.platform.model_loading).
        """
        return self._verified(name, version, ref, bundle_files(ref, self.settings), signature)

    def load_champion(self, name: str, champion: Champion, tracker: Tracker) -> LoadedModel:
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

    def prepare(self, name: str, version: int, model: LoadedModel) -> Served:
        """Everything a request needs, built before the swap (a text model's GPT is loaded here)."""
        if model.task.value == "text_generation":
            config = model.manifest["estimator"]["config"]
            text = TextModel.load(model.checkpoint, config, model.spec["tokenizer"])
            return Served(name, version, model, text=text)
        predict, predictor = fast_predict(model, self.settings.serve_compiled_trees)
        wait_s, rows = self.settings.serve_batch_wait_ms / 1000, self.settings.serve_batch_rows
        batcher = MicroBatcher(predict, wait_s, rows)
        return Served(name, version, model, batcher=batcher, predictor=predictor)

    async def swap(self, name: str, version: int, load: Callable[[], LoadedModel]) -> None:
        """Load (and verify) off the event loop, then replace the reference in one step."""
        if not newer(self.models.get(name), version):
            return
        served = await asyncio.to_thread(lambda: self.prepare(name, version, load()))
        if not newer(self.models.get(name), version):  # a newer one won while this one loaded
            return
        old = self.models.get(name)
        self.models = {**self.models, name: served}
        self.metrics.swaps.labels(name).inc()
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
                load = functools.partial(self.load_champion, name, champ, tracker)
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
        self.metrics.refused.labels(name).inc()
        served = self.models.get(name)
        kept = served.version if served else None
        still = f"v{kept}" if kept else "nothing"
        log.error("refusing %s v%d, still serving %s: %s", name, version, still, reason)
        event = refusal(
            name, version, model=model, signature=signature, reason=reason, served_version=kept,
            cause=cause, source=SOURCE,
        )  # fmt: skip
        try:  # sent again through a stream leader's election, which would otherwise lose it
            await publish_when_available(
                self.nc.jetstream(),
                subject_for(ModelRefused, self.settings.namespace),
                event.encode(),
                {"Nats-Msg-Id": event.id},
                REFUSAL_PATIENCE_S,
                timeout=PUBLISH_TIMEOUT_S,
            )
        except Exception as exc:  # noqa: BLE001 - NATS down or no permission: the log line above stays
            log.warning("could not publish the refusal of %s v%d: %s", name, version, exc)

    async def close(self) -> None:
        """Every batcher answers what it has queued, then ends."""
        for served in self.models.values():
            if served.batcher is not None:
                await served.batcher.close()


def why(exc: Exception) -> str:
    """A refusal's reason: a signature refusal says it all; anything else is named by its type."""
    if isinstance(exc, model_signatures.SignatureRefused):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
