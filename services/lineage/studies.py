"""A tuning study as the log tells it: the plan, every trial's score at each rung, each halving
decision, the leaderboard; and which trials are in flight now. Pure functions over event documents
(the JSON of each envelope, in stream order), plus the store reads that feed them, so the pictures
(services/lineage/pictures.py) draw exactly what the events say.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from contracts import (
    TrialCompleted,
    TrialRequested,
    TrialsPromoted,
    TuningCompleted,
    TuningRequested,
)
from services.lineage.store import LineageStore, Record, records

STUDY_TYPES = (
    TuningRequested.EVENT_TYPE,
    TrialRequested.EVENT_TYPE,
    TrialCompleted.EVENT_TYPE,
    TrialsPromoted.EVENT_TYPE,
    TuningCompleted.EVENT_TYPE,
)


@dataclass(frozen=True)
class RungPlan:
    rung: int
    budget: int
    keep: int


@dataclass(frozen=True)
class Trial:
    """One trial.completed: a configuration's score at one rung (None: it failed)."""

    trial_id: int
    rung: int
    budget: int
    family: str
    score: float | None
    event_id: str


@dataclass(frozen=True)
class Promotion:
    """One trials.promoted: the trials of `from_rung` that go on to `to_rung`."""

    from_rung: int
    to_rung: int
    budget: int
    promoted: list[int]
    event_id: str


@dataclass(frozen=True)
class Entry:
    """A leaderboard line of tuning.completed, best first."""

    trial_id: int
    family: str
    rung: int
    budget: int
    score: float


@dataclass(frozen=True)
class Study:
    study_id: str
    correlation: str
    metric: str
    strategy: str
    rungs: list[RungPlan]
    families: dict[int, str]  # trial id -> family, from the plan
    trials: list[Trial] = field(default_factory=list)
    promotions: list[Promotion] = field(default_factory=list)
    leaderboard: list[Entry] = field(default_factory=list)
    cached_from: str | None = None  # tuning.completed republished from the step cache: its origin event

    def survivors(self, rung: int) -> set[int]:
        """The trials of `rung` promoted to the next one."""
        return {t for p in self.promotions if p.from_rung == rung for t in p.promoted}


@dataclass(frozen=True)
class InFlight:
    """A trial requested and not completed yet."""

    study_id: str
    correlation: str
    trial_id: int
    rung: int
    budget: int
    family: str


def _entry(d: dict[str, Any]) -> Entry:
    return Entry(d["trial_id"], d["family"], d["rung"], d["budget"], d["score"])


def study(docs: Iterable[dict[str, Any]]) -> Study | None:
    """The study of one run from its events (None when the run planned none). A run whose tuning
    was served from the step cache has only its tuning.completed, marked `cachedfrom`."""
    docs = list(docs)
    plan = next((d for d in docs if d["type"] == TuningRequested.EVENT_TYPE), None)
    end = next((d for d in docs if d["type"] == TuningCompleted.EVENT_TYPE), None)
    if plan is None and end is None:
        return None
    head = (plan or end or {})["data"]
    p = plan["data"] if plan else {}
    out = Study(
        study_id=head["study_id"],
        correlation=(plan or end or {}).get("correlationid", ""),
        metric=head["metric"],
        strategy=head["strategy"],
        rungs=[RungPlan(r["rung"], r["budget"], r["keep"]) for r in p.get("rungs", [])],
        families={c["trial_id"]: c["family"] for c in p.get("configurations", [])},
        leaderboard=[_entry(e) for e in (end["data"]["leaderboard"] if end else [])],
        cached_from=(end or {}).get("cachedfrom"),
    )
    for d in docs:
        data = d["data"]
        if d["type"] == TrialCompleted.EVENT_TYPE:
            out.trials.append(
                Trial(
                    data["trial_id"], data["rung"], data["budget"], data["family"], data.get("score"), d["id"]
                )
            )
        elif d["type"] == TrialsPromoted.EVENT_TYPE:
            out.promotions.append(
                Promotion(data["from_rung"], data["to_rung"], data["budget"], list(data["promoted"]), d["id"])
            )
    return out


def in_flight(docs: Iterable[dict[str, Any]]) -> list[InFlight]:
    """Every trial requested whose completion is not in the log yet, in request order."""
    requested: dict[tuple[str, int, int], InFlight] = {}
    done: set[tuple[str, int, int]] = set()
    for d in docs:
        data = d["data"]
        key = (data.get("study_id", ""), data.get("trial_id", -1), data.get("rung", -1))
        if d["type"] == TrialRequested.EVENT_TYPE:
            requested.setdefault(
                key,
                InFlight(key[0], d.get("correlationid", ""), key[1], key[2], data["budget"], data["family"]),
            )
        elif d["type"] == TrialCompleted.EVENT_TYPE:
            done.add(key)
    return [t for k, t in requested.items() if k not in done]


# Loading from the store ----------------------------------------------------------------------
def _docs(rows: Iterable[Record]) -> list[dict[str, Any]]:
    """Live events only (a replay's subjects carry its namespace), as documents in stream order."""
    out = []
    for r in sorted(rows, key=lambda r: r.seq):
        doc = r.event() if r.subject == r.type else None
        if doc and isinstance(doc.get("data"), dict):
            out.append(doc)
    return out


def run_docs(
    store: LineageStore, correlation: str, types: Iterable[str] = STUDY_TYPES
) -> list[dict[str, Any]]:
    """One run's events of `types` (by the indexed correlation id: a study never loads another's)."""
    query = select(records).where(records.c.correlationid == correlation, records.c.type.in_(list(types)))
    with store.engine.connect() as conn:
        rows = conn.execute(query.order_by(records.c.seq)).mappings().all()
    return _docs(Record(**row) for row in rows)


def load_study(store: LineageStore, correlation: str) -> Study | None:
    return study(run_docs(store, correlation))


def open_runs(store: LineageStore) -> list[str]:
    """Runs whose study was planned and has not completed: the only ones with trials in flight."""

    def runs(event_type: str) -> set[str]:
        live = (records.c.type == event_type) & (records.c.subject == records.c.type)
        with store.engine.connect() as conn:
            return set(conn.execute(select(records.c.correlationid).where(live)).scalars())

    return sorted(runs(TuningRequested.EVENT_TYPE) - runs(TuningCompleted.EVENT_TYPE) - {None})


def load_in_flight(store: LineageStore) -> list[InFlight]:
    trial_types = (TrialRequested.EVENT_TYPE, TrialCompleted.EVENT_TYPE)
    return [t for run in open_runs(store) for t in in_flight(run_docs(store, run, trial_types))]
