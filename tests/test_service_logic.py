"""Decisions moved out of the services' app modules, tested directly (no bus, no MLflow, no Dask)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from contracts import ArtifactRef, DeploymentFailed, EvaluationRequested, ModelEvaluated, TrialStatus
from services.deployment.logic import reevaluation
from services.training import logic as training


def test_a_trial_that_cannot_fit_is_a_failed_result():
    result, status, error = training.failed_trial(ValueError("singular matrix"))
    assert status is TrialStatus.failed and "singular matrix" in error
    assert result == {"score": None, "duration_s": 0.0, "rounds": 0}


@pytest.mark.parametrize(("status", "settled"), [("FINISHED", True), ("FAILED", True), ("RUNNING", False)])
def test_only_an_ended_run_is_reused_on_redelivery(status, settled):
    assert training.run_settled(status) is settled


def test_the_final_fit_takes_the_leader_at_full_budget():
    context = SimpleNamespace(tuning=SimpleNamespace(max_budget=300))
    tuned = SimpleNamespace(leaderboard=["best", "second"], context=context)
    assert training.final_fit(tuned) == ("best", 300)  # type: ignore[arg-type]


def evaluated(dataset: ArtifactRef | None) -> ModelEvaluated:
    model = ArtifactRef(uri="file:///m", sha256="a" * 64, size=1, media_type="application/json")
    return ModelEvaluated.model_construct(
        context=SimpleNamespace(model_name="houses"),
        model=model,
        champion=SimpleNamespace(version=3),
        dataset=dataset,
    )


def test_a_stale_pass_goes_back_to_evaluation_against_the_current_champion():
    dataset = ArtifactRef(uri="file:///d", sha256="b" * 64, size=1, media_type="text/csv")
    request = reevaluation(evaluated(dataset), 4)
    assert isinstance(request, EvaluationRequested)
    assert request.champion_version == 4 and "now v4" in request.reason and "against v3" in request.reason


def test_a_stale_pass_without_its_dataset_fails_the_deployment():
    failed = reevaluation(evaluated(None), 4)
    assert isinstance(failed, DeploymentFailed) and failed.model_name == "houses"


# serving ----------------------------------------------------------------------------------------
SCHEMA = {"rooms": "numeric", "city": "categorical"}


def test_rows_arrive_as_one_object_a_list_or_rows():
    from services.serving.logic import checked_rows

    row = {"rooms": 3, "city": "x"}
    for body in (row, [row], {"rows": [row]}):
        assert checked_rows(body, SCHEMA) == [row]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ([], "non-empty"),
        ({"rooms": 1, "area": 2}, "unknown column 'area'"),
        ({"rooms": "three"}, "must be a number"),
        ({"rooms": float("nan")}, "finite"),
        ({"city": ["a"]}, "scalar"),
        ([{"rooms": 1}] * 10_001, "at most"),
    ],
)
def test_a_bad_request_is_refused_with_the_reason(body, says):
    from services.serving.logic import RequestProblem, checked_rows

    with pytest.raises(RequestProblem, match=says):
        checked_rows(body, SCHEMA)


def test_only_a_higher_version_replaces_what_is_served():
    from services.serving.logic import newer

    served = SimpleNamespace(version=3)
    assert newer(None, 1) and newer(served, 4)
    assert not newer(served, 3) and not newer(served, 2)


# lineage ----------------------------------------------------------------------------------------
def test_the_chain_takes_the_next_run_and_holds_what_is_past_a_gap():
    from services.lineage.logic import plan

    step = plan(10, [9, 11, 12, 14, 10, 15])
    assert step.recorded == [9, 10] and step.run == [11, 12] and step.waiting == [14, 15]
    assert plan(0, []).run == [] and plan(3, [4]).run == [4]
