"""tuning: features-built -> a study plan -> trial requests -> promotions -> tuning-completed.

Stateless replicas: a study's results live in a JetStream key-value bucket, one key per result
and a small compare-and-set tally per rung (services.tuning.state), so any replica may take any
trial result and a result costs the same at trial 10 as at trial 10,000. Output ids derive from
(study, rung), so when two replicas both see a rung complete, the server keeps one decision.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from nats.js.errors import KeyNotFoundError

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
from services.platform.bus.consumer import Delivery, PermanentError
from services.platform.bus.provision import study_bucket
from services.platform.cache import StepVersion
from services.platform.runtime import Route, Service
from services.platform.settings import CairnSettings
from services.tuning import logic, state

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

    def __init__(self, settings: CairnSettings):
        super().__init__(settings)
        self._studies: Any = None

    async def _kv(self) -> Any:
        """The study bucket, looked up once, as the ledger and the step cache do theirs:
        `js.key_value` asks the server for the stream's info every time (an API call, and an audit
        advisory the server publishes). Two calls per trial result (the result, the tally's
        compare-and-set on the copy this replica last wrote; a third, the read, when that copy is
        stale), through nats-py's KeyValue."""
        if self._studies is None:
            js = self.publisher.broker.config.connection_state.stream  # type: ignore[union-attr]
            self._studies = await js.key_value(study_bucket(self.settings.namespace))
        return self._studies

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
        self.plans.put(plan, await state.record_plan(kv, event))
        first = [c.trial_id for c in plan.configurations]
        await state.create_rung(kv, plan.study_id, 0, first)
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

    @functools.cached_property
    def plans(self) -> state.PlanCache:
        return state.PlanCache()

    @functools.cached_property
    def tallies(self) -> state.TallyCache:
        return state.TallyCache()

    async def on_trial_completed(
        self, event: Envelope[TrialCompleted], delivery: Delivery
    ) -> list[Envelope[Any]]:
        """Add one result (O(1): its own key and a bit); whoever completes a rung decides it."""
        done = event.data
        kv = await self._kv()
        if not await state.record(kv, done, event.id, self.tallies):
            return []
        plan, started = await self.plans.get(kv, done.study_id)
        rung_state = await state.read_rung(kv, done.study_id, done.rung)
        decision = logic.decide_rung(plan, done.rung, rung_state)
        if decision is None:
            return [await self._complete(kv, plan, event, started, {done.rung: rung_state})]
        decision_event = new_event(
            decision,
            source=self.source,
            cause=event,
            event_id=derive_id(plan.study_id, event_type_of(TrialsPromoted), f"rung{done.rung}"),
            subject=plan.study_id,
        )
        await state.create_rung(kv, plan.study_id, decision.to_rung, decision.promoted)
        return [decision_event] + [
            new_event(
                r,
                source=self.source,
                cause=decision_event,
                key=f"{r.study_id}:{r.rung}:{r.trial_id}",
                subject=r.study_id,
            )
            for r in logic.trial_requests(
                plan, decision.to_rung, logic.longest_first(decision.promoted, rung_state)
            )
        ]

    async def _complete(
        self,
        kv,
        plan: TuningRequested,
        cause: Envelope[Any],
        started: datetime,
        known: dict[int, logic.RungState],
    ) -> Envelope[Any]:
        """The study's end from every rung's results; `known` rungs were just read and are not
        read again (a random search's only rung)."""
        completed: list[tuple[int, int, int, float | None]] = []
        failed = 0
        for rung in range(len(plan.rungs)):
            try:
                rung_state = known[rung] if rung in known else await state.read_rung(kv, plan.study_id, rung)
            except KeyNotFoundError:
                break
            for trial_id, r in rung_state.results.items():
                completed.append((trial_id, rung, r.budget, r.score))
                failed += r.score is None
        board = logic.leaderboard(plan, completed)
        if not board:
            raise PermanentError(f"every trial of {plan.study_id} failed")
        duration = (datetime.now(UTC) - started).total_seconds()
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
        end = new_event(
            result,
            source=self.source,
            cause=cause,
            event_id=derive_id(plan.study_id, event_type_of(TuningCompleted)),
            subject=plan.context.model_name,
        )
        if self.cache is not None and self.cache.enabled:
            await self.cache.put("tuning", self.version.key(cache_inputs(plan.features)), [end])
        return end
