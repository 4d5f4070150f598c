"""Whether a passed decision may move the champion, as a pure function of what the lock holds."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from enum import Enum


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
