"""tuning: features-built -> a study plan -> trial requests -> promotions -> tuning-completed.

Stateless replicas: a study's results live in a JetStream key-value bucket, updated with
compare-and-set, so any replica may take any trial result. Output ids derive from (study,
rung), so when two replicas both see a rung complete, the server keeps one decision.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from contracts import (
    Envelope,
    FeaturesBuilt,
    TrialCompleted,
    TrialsPromoted,
    TuningCompleted,
    TuningRequested,
    derive_id,
    event_type_of,
    new_event,
)
from services.bus.consumer import Delivery, PermanentError
from services.bus.provision import study_bucket
from services.cache import StepVersion
from services.runtime import Route, Service
from services.tuning import logic

# A study's outcome is computed by training's trial functions: their code and libraries count too.
CODE = ("tuning", "training", "ml")
LIBRARIES = ("xgboost", "scikit-learn", "numpy", "pandas", "pyarrow", "torch", "safetensors")


def cache_inputs(features: FeaturesBuilt) -> dict[str, Any]:
    """Feature set, transform and dataset (by sha256), the seed and the tuning spec: the whole
    features-built payload, which is also what a study plan carries (`plan.features`)."""
    return features.model_dump(mode="json")


class Tuning(Service):
    name = "tuning"

    @functools.cached_property
    def version(self) -> StepVersion:
        return StepVersion.of("tuning", CODE, LIBRARIES, self.settings)

    def routes(self) -> Sequence[Route]:
        return [
            # A hit serves the study's end (tuning-completed): no plan, no trial. A miss plans the
            # study; its end is kept when the last rung is decided (`_complete`).
            Route(
                FeaturesBuilt,
                self.on_features_built,
                cache_version=self.version,
                cache_inputs=lambda event: cache_inputs(event.data),
                cache_store=False,
            ),
            Route(TuningRequested, self.on_tuning_requested),
            Route(TrialCompleted, self.on_trial_completed, max_workers=4),
        ]

    async def _kv(self):
        js = self.publisher.broker.config.connection_state.stream  # type: ignore[union-attr]
        return await js.key_value(study_bucket(self.settings.namespace))

    async def on_features_built(
        self, event: Envelope[FeaturesBuilt], delivery: Delivery
    ) -> list[Envelope[Any]]:
        """Fix the study plan (configurations sampled from the event's seed) before any trial runs."""
        plan = logic.plan_study(event.id, event.data)
        return [new_event(plan, source=self.source, cause=event, subject=plan.study_id)]

    async def on_tuning_requested(
        self, event: Envelope[TuningRequested], delivery: Delivery
    ) -> list[Envelope[Any]]:
        """Record the plan and request the first rung's trials."""
        plan = event.data
        kv = await self._kv()
        state = {"plan_event": json.loads(event.encode()), "started": event.time.isoformat()}
        with contextlib.suppress(KeyWrongLastSequenceError):  # redelivered: the plan is already recorded
            await kv.create(f"{plan.study_id}.plan", json.dumps(state).encode())
        first = [c.trial_id for c in plan.configurations]
        await _create_rung(kv, plan.study_id, 0, first)
        return [
            new_event(
                r,
                source=self.source,
                cause=event,
                key=f"{r.study_id}:{r.rung}:{r.trial_id}",
                subject=r.study_id,
            )
            for r in logic.trial_requests(plan, 0, first)
        ]

    async def on_trial_completed(
        self, event: Envelope[TrialCompleted], delivery: Delivery
    ) -> list[Envelope[Any]]:
        """Add one result; whoever completes a rung decides it."""
        done = event.data
        kv = await self._kv()
        rung_state = await _record(kv, done, event.id)
        if not rung_state.complete:
            return []
        plan_state = json.loads((await kv.get(f"{done.study_id}.plan")).value)
        plan_event = Envelope[TuningRequested].model_validate(plan_state["plan_event"])
        plan = plan_event.data
        decision = logic.decide_rung(plan, done.rung, rung_state)
        if decision is None:
            return [await self._complete(kv, plan, plan_event, event, plan_state["started"])]
        decision_event = new_event(
            decision,
            source=self.source,
            cause=event,
            event_id=derive_id(plan.study_id, event_type_of(TrialsPromoted), f"rung{done.rung}"),
            subject=plan.study_id,
        )
        await _create_rung(kv, plan.study_id, decision.to_rung, decision.promoted)
        return [decision_event] + [
            new_event(
                r,
                source=self.source,
                cause=decision_event,
                key=f"{r.study_id}:{r.rung}:{r.trial_id}",
                subject=r.study_id,
            )
            for r in logic.trial_requests(plan, decision.to_rung, decision.promoted)
        ]

    async def _complete(
        self, kv, plan: TuningRequested, plan_event: Envelope[Any], cause: Envelope[Any], started: str
    ) -> Envelope[Any]:
        completed: list[tuple[int, int, int, float | None]] = []
        failed = 0
        for rung in range(len(plan.rungs)):
            try:
                entry = await kv.get(f"{plan.study_id}.rung.{rung}")
                state = logic.RungState.from_json(json.loads(entry.value))
            except KeyNotFoundError:
                break
            for trial_id, r in state.results.items():
                completed.append((trial_id, rung, r.budget, r.score))
                failed += r.score is None
        board = logic.leaderboard(plan, completed)
        if not board:
            raise PermanentError(f"every trial of {plan.study_id} failed")
        duration = (datetime.now(UTC) - datetime.fromisoformat(started)).total_seconds()
        result = TuningCompleted(
            study_id=plan.study_id,
            context=plan.context,
            features=plan.features,
            metric=plan.metric,
            strategy=plan.strategy,
            trials_completed=len(completed) - failed,
            trials_failed=failed,
            leaderboard=board,
            duration_s=max(duration, 0.0),
        )
        completed = new_event(
            result,
            source=self.source,
            cause=cause,
            event_id=derive_id(plan.study_id, event_type_of(TuningCompleted)),
            subject=plan.context.model_name,
        )
        if self.cache is not None and self.cache.enabled:
            await self.cache.put("tuning", self.version.key(cache_inputs(plan.features)), [completed])
        return completed


async def _create_rung(kv, study_id: str, rung: int, trial_ids: list[int]) -> None:
    with contextlib.suppress(KeyWrongLastSequenceError):
        await kv.create(f"{study_id}.rung.{rung}", json.dumps(logic.RungState(trial_ids).to_json()).encode())


async def _record(kv, done: TrialCompleted, event_id: str) -> logic.RungState:
    """Compare-and-set loop: concurrent results for one rung never overwrite each other."""
    key = f"{done.study_id}.rung.{done.rung}"
    result = logic.TrialResult(done.score, event_id, done.budget)
    while True:
        entry = await kv.get(key)
        state = logic.RungState.from_json(json.loads(entry.value)).with_result(done.trial_id, result)
        try:
            await kv.update(key, json.dumps(state.to_json()).encode(), last=entry.revision)
            return state
        except KeyWrongLastSequenceError:
            continue
