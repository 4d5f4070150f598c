"""deployment: model-evaluated (passed) -> registry version + `champion` alias -> model-deployed.

One worker per replica and a check that the champion is still the one the evaluation compared
against: two challengers evaluated at once cannot both take over on stale evidence.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from contracts import DeploymentFailed, Envelope, ModelDeployed, ModelEvaluated, new_event
from services.artifacts import IntegrityError, read_verified
from services.bus.consumer import Delivery, PermanentError
from services.runtime import Route, Service
from services.tracking import Tracker


def deploy(event: Envelope[ModelEvaluated], tracker: Tracker) -> ModelDeployed:
    evaluated = event.data
    name = evaluated.context.model_name
    try:
        read_verified(evaluated.model.uri, evaluated.model.sha256)
    except (IntegrityError, FileNotFoundError) as exc:
        raise PermanentError(
            f"model artifact unusable: {exc}",
            event=DeploymentFailed(
                model_name=name, model=evaluated.model, reason=f"model artifact unusable: {exc}"
            ),
        ) from None
    current = tracker.champion(name)
    compared = evaluated.champion.version if evaluated.champion else None
    current_version = current.version if current else None
    if current_version != compared and not (current and current.model_sha256 == evaluated.model.sha256):
        reason = (
            f"champion of {name} is now v{current_version}, but the evaluation compared against "
            f"v{compared}: evaluate again"
        )
        raise PermanentError(
            reason, event=DeploymentFailed(model_name=name, model=evaluated.model, reason=reason)
        )
    version = tracker.register(
        name,
        source=evaluated.model.uri,
        run_id=evaluated.mlflow_run_id,
        sha256=evaluated.model.sha256,
        evidence_event_id=event.id,
        size=evaluated.model.size,
    )
    tracker.set_champion(name, version)
    return ModelDeployed(
        model_name=name,
        version=version,
        model=evaluated.model,
        previous_version=current_version if current_version != version else None,
        mlflow_run_id=evaluated.mlflow_run_id,
        metrics=evaluated.metrics,
        evidence_event_id=event.id,
    )


class Deployment(Service):
    name = "deployment"

    def routes(self) -> Sequence[Route]:
        return [Route(ModelEvaluated, self.on_model_evaluated)]

    async def start(self) -> None:
        self.tracker = await asyncio.to_thread(Tracker, self.settings.tracking_uri)

    async def on_model_evaluated(
        self, event: Envelope[ModelEvaluated], delivery: Delivery
    ) -> list[Envelope[Any]]:
        """Promote a model that passed the gate; a failed gate ends the run here."""
        if not event.data.passed:
            return []
        deployed = await asyncio.to_thread(deploy, event, self.tracker)
        return [new_event(deployed, source=self.source, cause=event, subject=deployed.model_name)]
