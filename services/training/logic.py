"""Training decisions as pure functions: what a trial's outcome is, what an interrupted run
needs, and which configuration the final model is fitted with."""

from __future__ import annotations

from typing import Any

from contracts import LeaderboardEntry, TrialStatus, TuningCompleted

# What a trial whose model cannot fit reports: a result, not an outage.
FAILED_RESULT: dict[str, Any] = {"score": None, "duration_s": 0.0, "rounds": 0}
SETTLED_RUN_STATUSES = frozenset({"FINISHED", "FAILED"})


def failed_trial(exc: BaseException) -> tuple[dict[str, Any], TrialStatus, str]:
    """A deterministic model error ends the trial as failed: retrying cannot help."""
    return FAILED_RESULT, TrialStatus.failed, repr(exc)


def run_settled(status: str) -> bool:
    """A run found on redelivery is reused as is only once MLflow has its end; else it is completed."""
    return status in SETTLED_RUN_STATUSES


def run_end_status(failed: bool) -> str:
    return "FAILED" if failed else "FINISHED"


def final_fit(tuned: TuningCompleted) -> tuple[LeaderboardEntry, int]:
    """The final model: the study's best configuration, at the study's full budget."""
    return tuned.leaderboard[0], tuned.context.tuning.max_budget
