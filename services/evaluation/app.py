"""evaluation: model-trained -> model-evaluated, challenger and champion on the same raw holdout.

Also evaluation-requested -> model-evaluated: a passed decision that deployment found stale (the
champion moved since) is decided again against the champion of now. A registry that does not
answer is retried (RegistryUnavailable), never taken for "no champion".
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from contracts import (
    ArtifactRef,
    ChampionSnapshot,
    Envelope,
    EvaluationRequested,
    Metric,
    ModelEvaluated,
    ModelFamily,
    ModelTrained,
    PipelineContext,
    Task,
    new_event,
)
from services.evaluation.logic import gate
from services.platform.artifacts import IntegrityError
from services.platform.bus.consumer import Delivery, PermanentError
from services.platform.ml import transform
from services.platform.ml.bundle import LoadedModel
from services.platform.ml.holdout import holdout_frame, holdout_text
from services.platform.ml.metrics import score_all
from services.platform.model_loading import UnusableModel, load_champion, load_from_store
from services.platform.runtime import Route, Service
from services.platform.tracking import Champion, Tracker


@dataclass(frozen=True)
class Challenger:
    """What a decision needs: from a model-trained event, or from a stale decision to redo."""

    context: PipelineContext
    model: ArtifactRef
    family: ModelFamily
    mlflow_run_id: str
    metric: Metric
    dataset: ArtifactRef

    @classmethod
    def trained(cls, t: ModelTrained) -> Challenger:
        return cls(t.context, t.model, t.family, t.mlflow_run_id, t.metric, t.dataset)

    @classmethod
    def stale(cls, e: ModelEvaluated) -> Challenger:
        if e.dataset is None:
            raise PermanentError("the stale decision names no dataset to cut its holdout from")
        return cls(e.context, e.model, e.family, e.mlflow_run_id, e.metric, e.dataset)


def holdout_metrics(model: LoadedModel, holdout: pd.DataFrame) -> dict[str, float]:
    target = model.spec["target"]
    y = transform.encode_target(model.spec, holdout[target])
    return score_all(model.task, y, model.predict_raw(holdout.drop(columns=[target])))


def text_metrics(model: LoadedModel, holdout: str) -> dict[str, float]:
    return {"perplexity": model.perplexity(holdout)}


def load_challenger(challenger: Challenger, settings: Any) -> LoadedModel:
    try:
        return load_from_store(challenger.model, settings)
    except UnusableModel as exc:
        raise PermanentError(f"challenger unusable: {exc}") from None


def load_current_champion(
    challenger: Challenger, tracker: Tracker, settings: Any
) -> tuple[Champion, LoadedModel] | None:
    """The registry's champion, or None when there is none yet; an outage raises (retried)."""
    name = challenger.context.model_name
    champion = tracker.champion(name)
    if champion is None:
        return None
    try:
        return champion, load_champion(champion, tracker, settings)
    except (UnusableModel, IntegrityError, FileNotFoundError) as exc:
        # A registry entry no retry can fix: refuse to decide rather than compare with nothing.
        raise PermanentError(
            f"champion v{champion.version} of {name} cannot be loaded: {type(exc).__name__}: {exc}"
        ) from None


def evaluate(challenger: Challenger, tracker: Tracker, settings: Any) -> ModelEvaluated:
    """Challenger and champion on the same raw holdout (rows, or text re-tokenized by each)."""
    ctx = challenger.context
    if ctx.task is Task.text_generation:
        holdout: Any = holdout_text(challenger.dataset, ctx.seed)
        measure = text_metrics
    else:
        holdout = holdout_frame(challenger.dataset, ctx.seed)
        measure = holdout_metrics
    mine = measure(load_challenger(challenger, settings), holdout)
    current = load_current_champion(challenger, tracker, settings)
    snapshot = champion_metrics = None
    if current is not None:
        champion, model = current
        champion_metrics = measure(model, holdout)
        snapshot = ChampionSnapshot(
            version=champion.version, model_sha256=champion.model_sha256, metrics=champion_metrics
        )
    passed, reasons = gate(
        challenger.metric,
        ctx.task,
        mine,
        champion_metrics,
        margin=settings.gate_margin,
        min_r2=settings.gate_min_r2,
        min_accuracy=settings.gate_min_accuracy,
    )
    if snapshot is not None and snapshot.model_sha256 == challenger.model.sha256:
        # The same bytes as the champion (a resubmission served from the cache): it stays champion;
        # deployment confirms it without registering a new version.
        passed = True
        reasons.append("the challenger is the champion itself (same model sha256): it stays")
    return ModelEvaluated(
        context=ctx,
        model=challenger.model,
        family=challenger.family,
        mlflow_run_id=challenger.mlflow_run_id,
        metric=challenger.metric,
        metrics=mine,
        champion=snapshot,
        champion_metrics_on_holdout=champion_metrics,
        passed=passed,
        reasons=reasons,
        dataset=challenger.dataset,
    )


GATE_OUTCOMES = ("passed", "failed")  # cairn_gate_decisions_total's outcome label


class Evaluation(Service[Tracker]):
    name = "evaluation"

    def routes(self) -> Sequence[Route]:
        return [
            Route(ModelTrained, self.on_model_trained),
            Route(EvaluationRequested, self.on_evaluation_requested),
        ]

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[Tracker]:
        """The only client: MLflow (nothing to close)."""
        yield await asyncio.to_thread(Tracker.from_settings, self.settings)

    async def on_model_trained(
        self, event: Envelope[ModelTrained], delivery: Delivery
    ) -> list[Envelope[Any]]:
        """Score the challenger on the holdout and decide whether it may replace the champion."""
        return await self._decide(Challenger.trained(event.data), event)

    async def on_evaluation_requested(
        self, event: Envelope[EvaluationRequested], delivery: Delivery
    ) -> list[Envelope[Any]]:
        """Decide again a pass that deployment found stale, against the champion of now."""
        return await self._decide(Challenger.stale(event.data.evaluated), event)

    async def _decide(self, challenger: Challenger, cause: Envelope[Any]) -> list[Envelope[Any]]:
        result = await asyncio.to_thread(evaluate, challenger, self.context, self.settings)
        model = result.context.model_name
        for outcome in GATE_OUTCOMES:  # both series exist from a model's first decision on
            self.metrics.gate_decisions.labels(self.name, model, outcome)
        outcome = "passed" if result.passed else "failed"
        self.metrics.gate_decisions.labels(self.name, model, outcome).inc()
        return [new_event(result, source=self.source, cause=cause, subject=model)]
