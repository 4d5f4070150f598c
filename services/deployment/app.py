"""deployment: model-evaluated (passed) -> registry version + `champion` alias -> model-deployed.

A decision counts only against the champion it was compared with. The champion moves by
compare-and-set on its record in the champion lock (services.deployment.lock), so of two
decisions in flight for one model on two replicas only one can move it; the other is stale and
goes back to evaluation as an `evaluation-requested` event, to be decided against the new
champion: a challenger is never promoted on evidence about a champion that is no longer there.

With a signing key (services.platform.model_signatures) every deployed bundle is signed with OpenSSF model
signing, together with its identity (model name and the registry version): so it is signed once the
registry has given the version, and tagged on that version before the alias can move to it. The
signature is stored beside it and named in `model.deployed`, so the endpoint can tell the bundle
deployment chose, as that model and version, from bytes someone else put in the store under a right
hash or named under another version or name.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from contracts import (
    DeploymentFailed,
    Envelope,
    EvaluationRequested,
    ModelDeployed,
    ModelEvaluated,
    new_event,
)
from services.deployment.lock import ChampionLock, settle_alias
from services.deployment.logic import Action, ChampionRecord, decide, deployed, reevaluation
from services.platform.artifacts import IntegrityError
from services.platform.bus.consumer import Delivery, PermanentError
from services.platform.model_loading import UnusableModel, bundle_files
from services.platform.model_signatures import Signed, sign_bundle, signing_key
from services.platform.runtime import Route, Service
from services.platform.tracking import Tracker


def verified_files(evaluated: ModelEvaluated, settings: Any) -> dict[str, bytes]:
    """The bundle's bytes, location-checked and hash-verified; unusable ones end the run here."""
    try:
        return bundle_files(evaluated.model, settings)
    except (IntegrityError, FileNotFoundError, UnusableModel) as exc:
        reason = f"model artifact unusable: {exc}"
        name = evaluated.context.model_name
        raise PermanentError(
            reason, event=DeploymentFailed(model_name=name, model=evaluated.model, reason=reason)
        ) from None


def same_as_champion(evaluated: ModelEvaluated) -> bool:
    """The candidate has the bytes of the champion it was compared with."""
    return evaluated.champion is not None and evaluated.champion.model_sha256 == evaluated.model.sha256


Signer = Callable[[int], Signed | None]  # the bundle signed as version V of its model (blocking)


def no_signer(_: int) -> Signed | None:
    return None


async def promote(
    event: Envelope[ModelEvaluated],
    files: dict[str, bytes],
    lock: ChampionLock,
    tracker: Tracker,
    sign: Signer = no_signer,
) -> ModelDeployed | EvaluationRequested:
    """Move the champion to this model if the decision was made against the current one.

    At most two rounds: a lost compare-and-set means the record moved, so the decision is stale.
    The signature binds the version, so it is made for the version this decision announces: a new
    one is registered first, then signed and tagged, and only then may the record and alias move.
    """
    evaluated = event.data
    name = evaluated.context.model_name
    compared = evaluated.champion.version if evaluated.champion else None
    while True:
        record, revision = await lock.read(name)
        alias = None if record else await asyncio.to_thread(tracker.champion, name)  # None: a first model
        registry_version = alias.version if alias else None
        action, current = decide(
            event_id=event.id, compared=compared, record=record, registry_version=registry_version
        )
        if action is Action.STALE:
            request = reevaluation(evaluated, current)
            if isinstance(request, DeploymentFailed):
                raise PermanentError(request.reason, event=request)
            if record is not None:  # the re-evaluation reads the registry: let it show the record
                await settle_alias(lock, tracker, name)
            return request
        if action is Action.DEPLOY and same_as_champion(evaluated):
            # The champion itself, computed again (a resubmission): no new version, no churn.
            assert current is not None
            record = ChampionRecord(current, evaluated.model.sha256, event.id, current)
            return deployed(event, record, await asyncio.to_thread(sign, current))
        if action is Action.DEPLOY:
            version = await asyncio.to_thread(
                tracker.register,
                name,
                source=evaluated.model.uri,
                run_id=evaluated.mlflow_run_id,
                sha256=evaluated.model.sha256,
                evidence_event_id=event.id,
                size=evaluated.model.size,
                files=files,
            )
            signed = await asyncio.to_thread(sign, version)
            if signed is not None:  # before the alias can name the version: a start verifies it
                await asyncio.to_thread(tracker.set_signature, name, version, signed.signature)
            record = ChampionRecord(version, evaluated.model.sha256, event.id, current)
            if not await lock.swap(name, record, revision):
                continue
        else:  # ALREADY: a redelivery; the version was signed and tagged before the record moved
            assert record is not None
            signed = await asyncio.to_thread(sign, record.version)
        # This decision moved the champion (now or on an earlier delivery). Should a newer one have
        # beaten it meanwhile, the alias ends on that one: settle_alias follows the record.
        await settle_alias(lock, tracker, name)
        return deployed(event, record, signed)


class Deployment(Service[Tracker]):
    name = "deployment"

    def routes(self) -> Sequence[Route]:
        return [Route(ModelEvaluated, self.on_model_evaluated)]

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[Tracker]:
        """The only client: MLflow (nothing to close). A signing key that is set but unusable stops
        the start here, not the first deployment."""
        await asyncio.to_thread(signing_key, self.settings)
        yield await asyncio.to_thread(Tracker.from_settings, self.settings)

    async def _lock(self) -> ChampionLock:
        js = self.publisher.broker.config.connection_state.stream  # type: ignore[union-attr]
        return await ChampionLock.open(js, self.settings.namespace)

    async def on_model_evaluated(
        self, event: Envelope[ModelEvaluated], delivery: Delivery
    ) -> list[Envelope[Any]]:
        """Promote a model that passed the gate against the current champion; a stale pass is
        sent back to evaluation; a failed gate ends the run here."""
        evaluated = event.data
        if not evaluated.passed:
            return []
        name = evaluated.context.model_name
        files = await asyncio.to_thread(verified_files, evaluated, self.settings)

        def sign(version: int) -> Signed | None:  # None without a key
            return sign_bundle(files, name, version, self.settings)

        outcome = await promote(event, files, await self._lock(), self.context, sign)
        return [new_event(outcome, source=self.source, cause=event, subject=name)]
