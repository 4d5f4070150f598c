"""Tuning's per-result study state against a real nats-server: two replicas' handlers take one
study's results concurrently, a redelivered result counts once, a rung is decided exactly once
and the decision does not depend on arrival order."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from nats.js.errors import KeyWrongLastSequenceError

from contracts import (
    ArtifactRef,
    FeaturesBuilt,
    ModelFamily,
    PipelineContext,
    SearchStrategy,
    SplitSizes,
    Task,
    TrialCompleted,
    TrialsPromoted,
    TrialStatus,
    TuningCompleted,
    TuningSpec,
    new_event,
)
from services.platform.bus.consumer import PermanentError
from services.platform.bus.provision import study_bucket
from services.tuning import logic, state
from services.tuning.app import Tuning


class Replica(Tuning):
    """The real service class; only the bucket handle comes from the test's connection (the
    runner would take it from the broker)."""

    def __init__(self, settings: Any, kv: Any) -> None:
        super().__init__(settings)
        self.bucket = kv

    async def _kv(self):
        return self.bucket


def artifact(name: str) -> ArtifactRef:
    return ArtifactRef(
        uri=f"file:///data/{name}", sha256="a" * 64, size=1, media_type="application/octet-stream"
    )


def features(trials: int, strategy: SearchStrategy, seed: int = 7) -> Any:
    spec = TuningSpec(trials=trials, strategy=strategy, families=[ModelFamily.linear], max_budget=9, eta=3)
    context = PipelineContext(model_name="houses", target="y", task=Task.regression, seed=seed, tuning=spec)
    built = FeaturesBuilt(
        context=context,
        dataset=artifact("d"),
        featureset=artifact("f"),
        transform=artifact("t"),
        feature_columns=["x"],
        splits=SplitSizes(train=8, validation=1, test=1),
    )
    return new_event(built, source="/test")


def result(plan_event: Any, trial_id: int, rung: int, score: float | None, tag: str = "") -> Any:
    plan = plan_event.data
    config = plan.configurations[trial_id]
    done = TrialCompleted(
        study_id=plan.study_id,
        trial_id=trial_id,
        rung=rung,
        budget=plan.rungs[rung].budget,
        family=config.family,
        params=config.params,
        status=TrialStatus.ok if score is not None else TrialStatus.failed,
        metric=plan.metric,
        score=score,
        duration_s=0.0,
    )
    return new_event(done, source="/training", cause=plan_event, key=f"{trial_id}:{rung}{tag}")


@pytest.fixture
async def kv(js, settings):
    """The bucket as the service holds it: nats-py's KeyValue."""
    return await js.key_value(study_bucket(settings.namespace))


async def start(replica: Tuning, trials: int, strategy: SearchStrategy, seed: int = 7) -> Any:
    (plan_event,) = await replica.on_features_built(features(trials, strategy, seed), None)
    requests = await replica.on_tuning_requested(plan_event, None)
    assert len(requests) == trials
    return plan_event


def scores_for(trials: int) -> dict[int, float | None]:
    """Distinct scores, ties and failures, so that a wrong ranking shows."""
    return {t: None if t % 7 == 3 else round((t * 37 % 11) / 10, 2) for t in range(trials)}


async def deliver_all(replicas: list[Tuning], events: list[Any]) -> list[list[Any]]:
    """Every result to a replica in turn, all handler calls in flight at once."""
    calls = [replicas[i % len(replicas)].on_trial_completed(e, None) for i, e in enumerate(events)]
    return list(await asyncio.gather(*calls))


async def test_two_replicas_decide_a_rung_once_from_concurrent_results(settings, kv):
    a, b = Replica(settings, kv), Replica(settings, kv)
    trials = 60
    plan_event = await start(a, trials, SearchStrategy.asha)  # b has never seen the plan
    scores = scores_for(trials)
    events = [result(plan_event, t, 0, s) for t, s in scores.items()]
    random.Random(1).shuffle(events)
    outputs = await deliver_all([a, b], events)
    deciding = [out for out in outputs if out]
    assert len(deciding) == 1, f"{len(deciding)} handler calls decided rung 0"
    decision = deciding[0][0]
    assert decision.type == TrialsPromoted.EVENT_TYPE
    assert decision.data.evidence == scores
    assert decision.data.promoted == logic.promote(plan_event.data, 0, scores)
    requested = [e.data.trial_id for e in deciding[0][1:]]
    # Requested longest fit first; these all took as long, so by trial id (logic.longest_first).
    assert requested == sorted(decision.data.promoted) and all(e.data.rung == 1 for e in deciding[0][1:])
    tally = logic.RungTally.decode((await kv.get(state.tally_key(plan_event.data.study_id, 1))).value)
    assert tally.expected_ids == sorted(decision.data.promoted) and tally.count == 0


async def test_a_redelivered_result_counts_once_and_the_first_report_wins(settings, kv):
    replica = Replica(settings, kv)
    plan_event = await start(replica, 5, SearchStrategy.asha)
    study = plan_event.data.study_id
    first = result(plan_event, 0, 0, 0.9)
    assert await replica.on_trial_completed(first, None) == []
    again = [result(plan_event, 0, 0, 0.1, tag=f"-again{i}") for i in range(3)]  # other ids, other score
    assert await asyncio.gather(*(replica.on_trial_completed(e, None) for e in [first, *again])) == [[]] * 4
    tally = logic.RungTally.decode((await kv.get(state.tally_key(study, 0))).value)
    assert tally.count == 1 and not tally.complete
    outputs = await deliver_all([replica], [result(plan_event, t, 0, 0.5 + t / 10) for t in range(1, 5)])
    (decision, *_) = next(out for out in outputs if out)
    assert decision.data.evidence[0] == 0.9 and decision.data.evidence_event_ids[0] == first.id
    # A redelivery after the rung completed decides again, with the same id: the duplicate window
    # and the consumer ledger drop the second publication, and a crash before the first publication
    # cannot stall the study.
    (redecided, *_) = await replica.on_trial_completed(first, None)
    assert redecided.id == decision.id and redecided.data == decision.data


async def test_the_decision_does_not_depend_on_arrival_order(settings, kv):
    decisions = []
    for order_seed in (1, 2):
        replicas = [Replica(settings, kv), Replica(settings, kv)]
        plan_event = await start(replicas[0], 30, SearchStrategy.asha, seed=order_seed)
        scores = {t: round((t * 13 % 5) / 4, 2) for t in range(30)}  # many ties
        events = [result(plan_event, t, 0, s) for t, s in scores.items()]
        random.Random(order_seed).shuffle(events)
        (decision, *_) = next(out for out in await deliver_all(replicas, events) if out)
        decisions.append(decision.data.promoted)
    assert decisions[0] == decisions[1] == logic.promote(plan_event.data, 0, scores)


async def test_a_random_search_completes_with_every_result_once(settings, kv):
    a, b = Replica(settings, kv), Replica(settings, kv)
    trials = 40
    plan_event = await start(a, trials, SearchStrategy.random)
    scores = scores_for(trials)
    events = [result(plan_event, t, 0, s) for t, s in scores.items()]
    outputs = await deliver_all([a, b], events + events[:5])  # five redelivered in the same burst
    ends = [e for out in outputs for e in out]
    assert {e.type for e in ends} == {TuningCompleted.EVENT_TYPE} and len({e.id for e in ends}) == 1
    done = ends[0].data
    failed = sum(s is None for s in scores.values())
    assert (done.trials_completed, done.trials_failed) == (trials - failed, failed)
    assert [entry.trial_id for entry in done.leaderboard] == [
        t for t in logic.rank(plan_event.data.metric, scores) if scores[t] is not None
    ]


async def test_a_study_in_the_old_layout_is_refused_as_permanent(settings, kv):
    replica = Replica(settings, kv)
    plan_event = await start(replica, 3, SearchStrategy.asha)
    orphan = result(plan_event, 0, 0, 0.5).data.model_copy(update={"study_id": "study-00000000000000ff"})
    with pytest.raises(PermanentError, match="older"):
        await replica.on_trial_completed(new_event(orphan, source="/training"), None)


async def test_the_plan_cache_is_bounded_and_refills_from_the_bucket(settings, kv):
    replica = Replica(settings, kv)
    plans = [(await start(replica, 2, SearchStrategy.random, seed=s)).data for s in range(3)]
    cache = state.PlanCache(size=2)
    for plan in plans:
        got, _ = await cache.get(kv, plan.study_id)  # a cold replica: read once from the bucket
        assert got == plan
    assert list(cache._plans) == [p.study_id for p in plans[1:]]  # noqa: SLF001 - the bound itself


class Counting:
    """The real bucket, its tally reads and its refused compare-and-sets counted."""

    def __init__(self, kv: Any) -> None:
        self.kv = kv
        self.tally_reads = self.refused = 0

    async def get(self, key: str) -> Any:
        self.tally_reads += key.endswith(".tally")
        return await self.kv.get(key)

    async def create(self, key: str, value: bytes) -> int:
        return await self.kv.create(key, value)

    async def update(self, key: str, value: bytes, last: int) -> int:
        try:
            return await self.kv.update(key, value, last=last)
        except KeyWrongLastSequenceError:
            self.refused += 1
            raise


async def test_one_replica_sets_each_result_on_the_tally_it_last_wrote(settings, kv):
    replica = Replica(settings, Counting(kv))
    plan_event = await start(replica, 12, SearchStrategy.asha)
    for trial in range(11):  # one short of the rung: no decision, no rung read
        assert await replica.on_trial_completed(result(plan_event, trial, 0, trial / 10), None) == []
    assert (replica.bucket.tally_reads, replica.bucket.refused) == (1, 0)  # the first result only
    tally = logic.RungTally.decode((await kv.get(state.tally_key(plan_event.data.study_id, 0))).value)
    assert tally.count == 11 and not tally.complete


async def test_replicas_taking_turns_on_a_rung_stop_trusting_their_copies(settings, kv):
    a, b = Replica(settings, Counting(kv)), Replica(settings, Counting(kv))
    trials = 20
    plan_event = await start(a, trials, SearchStrategy.asha)
    scores = scores_for(trials)
    outputs = []
    for trial, score in scores.items():  # strictly alternating: every copy is stale when used again
        replica = (a, b)[trial % 2]
        outputs.append(await replica.on_trial_completed(result(plan_event, trial, 0, score), None))
    deciding = [out for out in outputs if out]
    assert len(deciding) == 1 and deciding[0][0].data.evidence == scores
    # One refused write each, the first time its copy was stale; then each reads before it writes.
    assert (a.bucket.refused, b.bucket.refused) == (1, 1)


async def test_a_redelivery_is_judged_on_the_stored_tally_not_on_a_stale_copy(settings, kv):
    a, b = Replica(settings, kv), Replica(settings, kv)
    plan_event = await start(a, 6, SearchStrategy.asha)
    first = result(plan_event, 0, 0, 0.9)
    assert await a.on_trial_completed(first, None) == []  # a's copy: trial 0 seen, rung incomplete
    outputs = await deliver_all([b], [result(plan_event, t, 0, t / 10) for t in range(1, 6)])
    (decision, *_) = next(out for out in outputs if out)
    # b completed the rung. A redelivery of trial 0 to a finds its bit in a's stale copy, which still
    # says incomplete: the stored tally says complete, so a decides again (the same decision).
    (redecided, *_) = await a.on_trial_completed(first, None)
    assert redecided.id == decision.id and redecided.data == decision.data
