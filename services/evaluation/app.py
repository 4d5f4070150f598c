"""evaluation: model-trained -> model-evaluated, challenger and champion on the same raw holdout."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pandas as pd

from contracts import ArtifactRef, ChampionSnapshot, Envelope, ModelEvaluated, ModelTrained, Task, new_event
from services.bus.consumer import Delivery
from services.evaluation.logic import gate
from services.features.logic import holdout_frame
from services.features.text import holdout_text
from services.ml import transform
from services.ml.bundle import BUNDLE_MEDIA_TYPE, LoadedModel, load_bundle
from services.ml.metrics import score_all
from services.runtime import Route, Service
from services.tracking import Tracker


def holdout_metrics(model: LoadedModel, holdout: pd.DataFrame) -> dict[str, float]:
    target = model.spec["target"]
    y = transform.encode_target(model.spec, holdout[target])
    return score_all(model.task, y, model.predict_raw(holdout.drop(columns=[target])))


def text_metrics(model: LoadedModel, holdout: str) -> dict[str, float]:
    return {"perplexity": model.perplexity(holdout)}


def evaluate(trained: ModelTrained, tracker: Tracker, settings: Any) -> ModelEvaluated:
    """Challenger and champion on the same raw holdout (rows, or text re-tokenized by each)."""
    ctx = trained.context
    if ctx.task is Task.text_generation:
        holdout: Any = holdout_text(trained.dataset, ctx.seed)
        measure = text_metrics
    else:
        holdout = holdout_frame(trained.dataset, ctx.seed)
        measure = holdout_metrics
    challenger = measure(load_bundle(trained.model), holdout)
    champion = tracker.champion(ctx.model_name)
    snapshot = champion_metrics = None
    if champion is not None:
        ref = ArtifactRef(
            uri=champion.model_uri, sha256=champion.model_sha256, size=0, media_type=BUNDLE_MEDIA_TYPE
        )
        champion_metrics = measure(load_bundle(ref), holdout)
        snapshot = ChampionSnapshot(
            version=champion.version, model_sha256=champion.model_sha256, metrics=champion_metrics
        )
    passed, reasons = gate(
        trained.metric,
        ctx.task,
        challenger,
        champion_metrics,
        margin=settings.gate_margin,
        min_r2=settings.gate_min_r2,
        min_accuracy=settings.gate_min_accuracy,
    )
    return ModelEvaluated(
        context=ctx,
        model=trained.model,
        family=trained.family,
        mlflow_run_id=trained.mlflow_run_id,
        metric=trained.metric,
        metrics=challenger,
        champion=snapshot,
        champion_metrics_on_holdout=champion_metrics,
        passed=passed,
        reasons=reasons,
    )


class Evaluation(Service):
    name = "evaluation"

    def routes(self) -> Sequence[Route]:
        return [Route(ModelTrained, self.on_model_trained)]

    async def start(self) -> None:
        self.tracker = await asyncio.to_thread(Tracker, self.settings.tracking_uri)

    async def on_model_trained(
        self, event: Envelope[ModelTrained], delivery: Delivery
    ) -> list[Envelope[Any]]:
        """Score the challenger on the holdout and decide whether it may replace the champion."""
        result = await asyncio.to_thread(evaluate, event.data, self.tracker, self.settings)
        return [new_event(result, source=self.source, cause=event, subject=result.context.model_name)]
