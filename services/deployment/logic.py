"""Whether a passed decision may move the champion, as a pure function of what the lock holds,
and the events that say what was decided."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from enum import Enum

from contracts import (
    DeploymentFailed,
    Envelope,
    EvaluationRequested,
    ModelDeployed,
    ModelEvaluated,
)
from services.platform.model_signatures import Signed


@dataclass(frozen=True)
class ChampionRecord:
    """What the champion lock holds for one model name: the decided champion and its evidence."""

    version: int
    model_sha256: str
    evidence_event_id: str
    previous_version: int | None = None

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> ChampionRecord:
        return cls(**json.loads(data))


class Action(Enum):
    DEPLOY = "deploy"  # the decision was made against the current champion: move it
    ALREADY = "already"  # this very decision moved it (a redelivery): finish the job
    STALE = "stale"  # the champion changed since the decision: decide again


def decide(
    *, event_id: str, compared: int | None, record: ChampionRecord | None, registry_version: int | None
) -> tuple[Action, int | None]:
    """The action and the current champion version.

    The lock's record is the decided champion; without one (a registry older than the lock, or a
    first model) the registry's alias is. A decision counts only against the champion it compared.
    """
    if record is not None and record.evidence_event_id == event_id:
        return Action.ALREADY, record.version
    current = record.version if record is not None else registry_version
    return (Action.DEPLOY if current == compared else Action.STALE), current


def deployed(
    event: Envelope[ModelEvaluated], record: ChampionRecord, signed: Signed | None = None
) -> ModelDeployed:
    """The champion moved (now or on an earlier delivery of `event`) to the record's version;
    `signed`: its bundle signed as that version, when deployment holds a signing key."""
    evaluated = event.data
    return ModelDeployed(
        model_name=evaluated.context.model_name,
        version=record.version,
        model=evaluated.model,
        previous_version=record.previous_version,
        mlflow_run_id=evaluated.mlflow_run_id,
        metrics=evaluated.metrics,
        evidence_event_id=event.id,
        signature=signed.signature if signed else None,
        identity=signed.identity if signed else None,
    )


def reevaluation(evaluated: ModelEvaluated, current: int | None) -> EvaluationRequested | DeploymentFailed:
    """A stale pass goes back to evaluation against champion `current`; without the dataset it was
    decided on (a producer older than the field) there is nothing to redo it with: the run fails."""
    name = evaluated.context.model_name
    compared = evaluated.champion.version if evaluated.champion else None
    reason = (
        f"champion of {name} is now v{current}, but the evaluation compared against v{compared}: "
        "evaluate again"
    )
    if evaluated.dataset is None:
        return DeploymentFailed(model_name=name, model=evaluated.model, reason=reason)
    return EvaluationRequested(evaluated=evaluated, champion_version=current, reason=reason)
