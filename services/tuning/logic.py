"""Tuning decisions as pure functions: the plan, the trials of a rung, promotion, the leaderboard.

Successive halving is synchronous: a rung is decided when all its trials have reported, from
their scores alone, so the decision does not depend on the order results arrived. Each decision
is still published (trials-promoted, with its evidence) so replay reads it instead of re-deciding.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from contracts import (
    FeaturesBuilt,
    LeaderboardEntry,
    Metric,
    ModelFamily,
    Rung,
    SearchStrategy,
    Task,
    TrialConfig,
    TrialRequested,
    TrialsPromoted,
    TuningRequested,
)
from services.platform.ml.families import default_metric
from services.platform.ml.metrics import sort_key


def study_id_for(features_event_id: str) -> str:
    return "study-" + hashlib.sha256(features_event_id.encode()).hexdigest()[:16]


def _loguniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def sample_params(family: ModelFamily, rng: np.random.Generator) -> dict[str, Any]:
    """Search spaces; values rounded so they print and compare cleanly."""
    if family is ModelFamily.xgboost:
        return {
            "max_depth": int(rng.integers(2, 9)),
            "learning_rate": round(_loguniform(rng, 0.02, 0.3), 5),
            "subsample": round(float(rng.uniform(0.6, 1.0)), 4),
            "colsample_bytree": round(float(rng.uniform(0.5, 1.0)), 4),
            "min_child_weight": round(_loguniform(rng, 0.5, 10.0), 4),
            "reg_lambda": round(_loguniform(rng, 0.1, 10.0), 4),
        }
    if family is ModelFamily.mlp:
        from services.platform.ml.torch_mlp import sample_mlp_params

        return sample_mlp_params(rng)
    if family is ModelFamily.transformer:
        n_heads = int(rng.choice([2, 4]))
        return {
            "d_model": int(rng.choice([32, 48, 64])),
            "n_layers": int(rng.integers(1, 4)),
            "n_heads": n_heads,
            "context": 64,
            "learning_rate": round(_loguniform(rng, 1e-3, 1e-2), 6),
            "batch_size": 16,
            "dropout": 0.0,
        }
    if family is ModelFamily.random_forest:
        return {
            "max_depth": int(rng.integers(4, 13)),
            "subsample": round(float(rng.uniform(0.5, 0.9)), 4),
            "colsample_bynode": round(float(rng.uniform(0.3, 1.0)), 4),
            "min_child_weight": round(_loguniform(rng, 0.5, 10.0), 4),
        }
    return {"alpha": round(_loguniform(rng, 1e-4, 10.0), 6)}


def rungs_for(strategy: SearchStrategy, trials: int, max_budget: int, eta: int) -> list[Rung]:
    if strategy is SearchStrategy.random:
        return [Rung(rung=0, budget=max_budget, keep=trials)]
    levels = max(
        1, min(int(math.log(trials, eta)) + 1 if trials > 1 else 1, int(math.log(max_budget, eta)) + 1)
    )
    levels = min(levels, 3)
    out = []
    for r in range(levels):
        budget = max(1, max_budget // eta ** (levels - 1 - r))
        keep = max(1, trials // eta**r)
        out.append(Rung(rung=r, budget=budget, keep=keep))
    return out


def plan_study(features_event_id: str, features: FeaturesBuilt) -> TuningRequested:
    spec = features.context.tuning
    task = features.context.task
    metric = spec.metric or default_metric(task)
    if metric.task is not task:
        metric = default_metric(task)
    rng = np.random.default_rng(features.context.seed)
    if task is Task.text_generation:
        families = [ModelFamily.transformer]
    else:
        families = [f for f in spec.families if f is not ModelFamily.transformer] or [ModelFamily.xgboost]
    configs = []
    for i in range(spec.trials):
        family = families[i % len(families)]
        params = sample_params(family, rng)
        if family is ModelFamily.transformer:
            params["vocab_size"] = spec.vocab_size
        configs.append(TrialConfig(trial_id=i, family=family, params=params))
    return TuningRequested(
        study_id=study_id_for(features_event_id),
        context=features.context,
        features=features,
        metric=metric,
        strategy=spec.strategy,
        rungs=rungs_for(spec.strategy, spec.trials, spec.max_budget, spec.eta),
        configurations=configs,
    )


def trial_requests(plan: TuningRequested, rung: int, trial_ids: list[int]) -> list[TrialRequested]:
    by_id = {c.trial_id: c for c in plan.configurations}
    budget = plan.rungs[rung].budget
    return [
        TrialRequested(
            study_id=plan.study_id,
            trial_id=t,
            rung=rung,
            budget=budget,
            family=by_id[t].family,
            params=by_id[t].params,
            metric=plan.metric,
            task=plan.context.task,
            target=plan.context.target,
            seed=plan.context.seed,
            featureset=plan.features.featureset,
            model_name=plan.context.model_name,
        )
        for t in trial_ids
    ]


def rank(metric: Metric, results: dict[int, float | None]) -> list[int]:
    """Trial ids best first; failed trials (None) last; ties by trial id."""
    key = sort_key(metric)
    ok = sorted((t for t, s in results.items() if s is not None), key=lambda t: (key(results[t]), t))
    failed = sorted(t for t, s in results.items() if s is None)
    return ok + failed


def promote(plan: TuningRequested, rung: int, results: dict[int, float | None]) -> list[int]:
    keep = plan.rungs[rung + 1].keep
    return [t for t in rank(plan.metric, results) if results[t] is not None][:keep]


@dataclass(frozen=True)
class TrialResult:
    """One trial's report at a rung: its score (None: failed), the event that carried it, its budget,
    and how long its fit took (0.0 in results recorded before it was kept): what the next rung's
    requests are ordered by, never what is decided."""

    score: float | None
    event_id: str
    budget: int
    duration_s: float = 0.0

    def to_doc(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "event_id": self.event_id,
            "budget": self.budget,
            "duration_s": self.duration_s,
        }

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> TrialResult:
        return cls(doc["score"], doc["event_id"], doc["budget"], doc.get("duration_s", 0.0))

    def encode(self) -> bytes:
        return json.dumps(self.to_doc()).encode()

    @classmethod
    def decode(cls, value: bytes) -> TrialResult:
        return cls.from_doc(json.loads(value))


@dataclass(frozen=True)
class RungState:
    """A rung as kept in the study bucket: the trials it waits for and the results so far."""

    expected: list[int]
    results: dict[int, TrialResult] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return len(self.results) >= len(self.expected)

    def with_result(self, trial_id: int, result: TrialResult) -> RungState:
        return replace(self, results={**self.results, trial_id: result})

    def to_json(self) -> dict[str, Any]:
        return {
            "expected": self.expected,
            "results": {str(t): r.to_doc() for t, r in self.results.items()},
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> RungState:
        return cls(
            expected=list(doc["expected"]),
            results={int(t): TrialResult.from_doc(r) for t, r in doc["results"].items()},
        )


def _bits(trial_ids: list[int] | set[int]) -> int:
    out = 0
    for t in trial_ids:
        out |= 1 << t
    return out


@dataclass(frozen=True)
class RungTally:
    """Which trials a rung waits for and which have reported, as two bitmaps over trial ids.

    This is the only value of a rung that is rewritten per result (compare-and-set): ~2 x trials/8
    bytes (2.5 kB for 10,000 trials) instead of every result so far, and setting a bit is
    idempotent, so a redelivered result cannot count twice. A bit for a trial the rung does not
    wait for is never counted.
    """

    expected: int
    seen: int = 0

    @classmethod
    def of(cls, trial_ids: list[int]) -> RungTally:
        return cls(_bits(trial_ids))

    @property
    def expected_ids(self) -> list[int]:
        return [t for t in range(self.expected.bit_length()) if self.expected >> t & 1]

    @property
    def count(self) -> int:
        return (self.seen & self.expected).bit_count()

    @property
    def complete(self) -> bool:
        return self.count >= self.expected.bit_count()

    def has(self, trial_id: int) -> bool:
        return bool(self.seen >> trial_id & 1)

    def with_seen(self, trial_id: int) -> RungTally:
        return replace(self, seen=self.seen | 1 << trial_id)

    def encode(self) -> bytes:
        def b64(bits: int) -> str:
            return base64.b64encode(bits.to_bytes((bits.bit_length() + 7) // 8, "little")).decode()

        return f'{{"expected":"{b64(self.expected)}","seen":"{b64(self.seen)}"}}'.encode()

    @classmethod
    def decode(cls, value: bytes) -> RungTally:
        doc = json.loads(value)
        return cls(
            int.from_bytes(base64.b64decode(doc["expected"]), "little"),
            int.from_bytes(base64.b64decode(doc["seen"]), "little"),
        )


def decide_rung(plan: TuningRequested, rung: int, state: RungState) -> TrialsPromoted | None:
    """The decision on a complete rung: the trials promoted to the next one, with the evidence;
    None when the study ends here (the last rung, or no trial of this one succeeded)."""
    scores = {t: r.score for t, r in state.results.items()}
    if rung + 1 >= len(plan.rungs):
        return None
    promoted = promote(plan, rung, scores)
    if not promoted:
        return None
    return TrialsPromoted(
        study_id=plan.study_id,
        from_rung=rung,
        to_rung=rung + 1,
        budget=plan.rungs[rung + 1].budget,
        evidence=scores,
        evidence_event_ids=[state.results[t].event_id for t in sorted(state.results)],
        promoted=promoted,
    )


def longest_first(promoted: list[int], state: RungState) -> list[int]:
    """The promoted trials in the order their requests go out: the longest fit of the rung just
    decided first, ties (and results without a duration) by trial id. A trial's next fit takes
    about its last times the budget ratio, so sending the longest first is LPT list scheduling:
    the short ones are left to fill the gaps at the end of the rung instead of a long one starting
    last while every other worker waits. The order of the requests only, never who is promoted."""
    return sorted(promoted, key=lambda t: (-state.results[t].duration_s, t))


def leaderboard(
    plan: TuningRequested, results: list[tuple[int, int, int, float | None]]
) -> list[LeaderboardEntry]:
    """Best result per trial at its highest rung, best first. `results`: (trial, rung, budget, score)."""
    configs = {c.trial_id: c for c in plan.configurations}
    best: dict[int, tuple[int, int, float]] = {}
    for trial_id, rung, budget, score in results:
        if score is not None and (trial_id not in best or rung > best[trial_id][0]):
            best[trial_id] = (rung, budget, score)
    key = sort_key(plan.metric)
    ordered = sorted(best.items(), key=lambda kv: (-kv[1][0], key(kv[1][2]), kv[0]))
    return [
        LeaderboardEntry(
            trial_id=t,
            family=configs[t].family,
            params=configs[t].params,
            budget=budget,
            rung=rung,
            score=score,
        )
        for t, (rung, budget, score) in ordered
    ]
