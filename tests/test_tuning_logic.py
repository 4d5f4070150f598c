"""Successive halving's rung decision, as a pure function over a typed rung state."""

from __future__ import annotations

from contracts import Metric, Rung, TuningRequested
from services.tuning.logic import RungState, RungTally, TrialResult, decide_rung, longest_first


def plan(metric: Metric = Metric.rmse) -> TuningRequested:
    """Three rungs keeping 4, 2, 1 trials; only the fields the decision reads."""
    return TuningRequested.model_construct(
        study_id="study-0123456789abcdef",
        metric=metric,
        rungs=[Rung(rung=r, budget=b, keep=k) for r, (b, k) in enumerate([(10, 4), (30, 2), (90, 1)])],
    )


def state(scores: dict[int, float | None], budget: int = 10) -> RungState:
    return RungState(
        expected=list(scores),
        results={t: TrialResult(s, f"ev-{t}", budget) for t, s in scores.items()},
    )


def test_promotes_the_best_with_the_evidence():
    decision = decide_rung(plan(), 0, state({3: 0.5, 0: 0.9, 1: None, 2: 0.1}))
    assert decision is not None
    assert decision.promoted == [2, 3]
    assert (decision.from_rung, decision.to_rung, decision.budget) == (0, 1, 30)
    assert decision.evidence == {3: 0.5, 0: 0.9, 1: None, 2: 0.1}
    assert decision.evidence_event_ids == ["ev-0", "ev-1", "ev-2", "ev-3"]  # by trial id


def test_ties_go_to_the_lower_trial_id_whatever_the_arrival_order():
    first = decide_rung(plan(), 0, state({3: 0.2, 1: 0.2, 2: 0.2, 0: 0.7}))
    again = decide_rung(plan(), 0, state({0: 0.7, 2: 0.2, 1: 0.2, 3: 0.2}))
    assert first is not None and again is not None
    assert first.promoted == again.promoted == [1, 2]


def test_higher_is_better_metrics_rank_descending():
    decision = decide_rung(plan(Metric.accuracy), 0, state({0: 0.6, 1: 0.9, 2: 0.8, 3: None}))
    assert decision is not None and decision.promoted == [1, 2]


def test_failed_trials_are_never_promoted():
    decision = decide_rung(plan(), 0, state({0: None, 1: 0.4, 2: None, 3: None}))
    assert decision is not None and decision.promoted == [1]


def test_an_all_failed_rung_ends_the_study():
    assert decide_rung(plan(), 0, state({0: None, 1: None, 2: None, 3: None})) is None


def test_the_last_rung_ends_the_study():
    assert decide_rung(plan(), 2, state({1: 0.3}, budget=90)) is None


def test_rung_state_round_trips_through_the_bucket_json():
    rung = RungState(expected=[0, 1]).with_result(1, TrialResult(0.25, "ev-1", 10))
    doc = rung.to_json()
    result = {"score": 0.25, "event_id": "ev-1", "budget": 10, "duration_s": 0.0}
    assert doc == {"expected": [0, 1], "results": {"1": result}}
    assert RungState.from_json(doc) == rung
    assert not rung.complete
    assert rung.with_result(0, TrialResult(None, "ev-0", 10)).complete


def test_a_rung_tally_counts_each_awaited_trial_once_and_stays_small():
    tally = RungTally.of([1, 4, 9_999])
    assert tally.expected_ids == [1, 4, 9_999] and tally.count == 0
    tally = tally.with_seen(4).with_seen(4).with_seen(2)  # a redelivery, and a trial not awaited
    assert tally.count == 1 and tally.has(4) and not tally.complete
    tally = tally.with_seen(1).with_seen(9_999)
    assert tally.complete
    assert RungTally.decode(tally.encode()) == tally
    assert len(RungTally.of(list(range(10_000))).with_seen(9_999).encode()) < 4_000


def test_a_trial_result_round_trips_through_its_key():
    for result in (TrialResult(0.25, "ev-1", 10, 0.125), TrialResult(None, "ev-2", 1)):
        assert TrialResult.decode(result.encode()) == result


def test_a_result_recorded_before_durations_were_kept_still_decodes():
    old = b'{"score": 0.5, "event_id": "ev-7", "budget": 33}'
    assert TrialResult.decode(old) == TrialResult(0.5, "ev-7", 33, 0.0)


def test_the_next_rung_is_requested_longest_first_and_the_decision_does_not_change():
    durations = {0: 0.2, 1: 0.9, 2: 0.05, 3: 0.9, 4: 0.0}
    rung = RungState(
        expected=list(durations),
        results={t: TrialResult(0.1 * t, f"ev-{t}", 10, d) for t, d in durations.items()},
    )
    decision = decide_rung(plan(), 0, rung)
    assert decision is not None and decision.promoted == [0, 1]  # the best two, best first: as before
    assert longest_first(decision.promoted, rung) == [1, 0]  # requested longest fit first
    assert longest_first([0, 1, 2, 3, 4], rung) == [1, 3, 0, 2, 4]  # ties by trial id
    timeless = RungState(expected=[5, 2, 9], results={t: TrialResult(0.1, f"ev-{t}", 10) for t in (5, 2, 9)})
    assert longest_first([9, 5, 2], timeless) == [2, 5, 9]  # no durations: by trial id
