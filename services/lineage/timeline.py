"""Champions in time, from the event log alone: who was champion at an instant, since and until
when, which gate decision put it there with what evidence, whom it displaced, and the chain back to
the raw data's hash.

MLflow keeps only the current alias; the log keeps every deployment and every gate decision, so
the history is derived here as pure functions over event documents (the JSON of each envelope, in
stream order). Times are cut to the millisecond, so an instant printed is an instant that answers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from contracts import (
    DataArrived,
    DatasetIngested,
    FeaturesBuilt,
    ModelDeployed,
    ModelEvaluated,
    ModelRefused,
    ModelTrained,
)
from services.lineage.store import LineageStore, Record

# The event types a timeline needs: deployments, the gate decisions, and their run's upstream.
TYPES = (
    ModelDeployed.EVENT_TYPE,
    ModelEvaluated.EVENT_TYPE,
    ModelTrained.EVENT_TYPE,
    FeaturesBuilt.EVENT_TYPE,
    DatasetIngested.EVENT_TYPE,
    DataArrived.EVENT_TYPE,
)
# And what the inference endpoint refused to serve: a decision is not what is served.
LOADED = (*TYPES, ModelRefused.EVENT_TYPE)


def instant(text: str, now: datetime | None = None) -> datetime:
    """ISO 8601 (a time without a zone is UTC) or 'now', cut to the millisecond."""
    if text.strip().lower() == "now":
        moment = now or datetime.now(UTC)
    else:
        moment = datetime.fromisoformat(text.strip())
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
    return to_ms(moment)


def to_ms(moment: datetime) -> datetime:
    moment = moment.astimezone(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def stamp(moment: datetime | None) -> str | None:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z") if moment else None


@dataclass(frozen=True)
class Gate:
    """One gate decision: the evaluated event and the evidence it carries."""

    event_id: str
    time: datetime
    correlation: str
    model: str
    passed: bool
    reasons: list[str]
    metric: str
    metrics: dict[str, float]
    champion_version: int | None
    champion_metrics_on_holdout: dict[str, float] | None
    model_sha256: str


@dataclass(frozen=True)
class Reign:
    """A version's time as champion: [since, until), until None while it still is."""

    model: str
    version: int
    since: datetime
    until: datetime | None
    deployed_event_id: str
    correlation: str
    model_sha256: str
    mlflow_run_id: str
    displaced: int | None
    gate: Gate | None
    chain: list[dict[str, Any]] = field(default_factory=list)

    @property
    def raw(self) -> dict[str, Any]:
        """The raw data the champion was trained on, as it arrived."""
        return next((c for c in self.chain if c["type"] == DatasetIngested.EVENT_TYPE), {})


def _time(doc: dict[str, Any]) -> datetime:
    return to_ms(datetime.fromisoformat(doc["time"]))


def _gate(doc: dict[str, Any]) -> Gate:
    d = doc["data"]
    champion = d.get("champion") or {}
    return Gate(
        event_id=doc["id"],
        time=_time(doc),
        correlation=doc["correlationid"],
        model=d["context"]["model_name"],
        passed=bool(d["passed"]),
        reasons=list(d.get("reasons", [])),
        metric=d.get("metric", ""),
        metrics=dict(d.get("metrics", {})),
        champion_version=champion.get("version"),
        champion_metrics_on_holdout=d.get("champion_metrics_on_holdout"),
        model_sha256=d["model"]["sha256"],
    )


def _chain(run: list[dict[str, Any]], evaluated_id: str | None) -> list[dict[str, Any]]:
    """The run's steps from the gate back to the arrival: ids and the hashes each one names."""
    out = []
    wanted = [t for t in TYPES if t != ModelDeployed.EVENT_TYPE]
    for event_type in wanted:
        docs = [d for d in run if d["type"] == event_type]
        if event_type == ModelEvaluated.EVENT_TYPE and evaluated_id:
            docs = [d for d in docs if d["id"] == evaluated_id] or docs
        if not docs:
            continue
        doc, data = docs[-1], docs[-1]["data"]
        link: dict[str, Any] = {"type": event_type, "id": doc["id"], "time": stamp(_time(doc))}
        if event_type == DatasetIngested.EVENT_TYPE:
            link |= {
                "source_uri": data["source_uri"],
                "source_sha256": data["source_sha256"],
                "dataset_sha256": data["dataset"]["sha256"],
            }
        elif event_type == DataArrived.EVENT_TYPE:
            link |= {"uri": data["uri"]}
        elif event_type == FeaturesBuilt.EVENT_TYPE:
            link |= {"featureset_sha256": data["featureset"]["sha256"]}
        elif "model" in data:
            link |= {"model_sha256": data["model"]["sha256"]}
        out.append(link)
    return out


def reigns(docs: Iterable[dict[str, Any]]) -> dict[str, list[Reign]]:
    """Every champion of every model in the order they took over, each with its evidence."""
    docs = list(docs)
    by_id = {d["id"]: d for d in docs}
    runs: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        runs.setdefault(d["correlationid"], []).append(d)
    out: dict[str, list[Reign]] = {}
    deployed = sorted((d for d in docs if d["type"] == ModelDeployed.EVENT_TYPE), key=_time)
    for doc in deployed:
        data = doc["data"]
        evidence = by_id.get(data["evidence_event_id"])
        model = data["model_name"]
        history = out.setdefault(model, [])
        if history and history[-1].version == data["version"]:
            continue  # a confirmation of the reigning champion (a cache-served rerun): no new reign
        since = _time(doc)
        if history:
            history[-1] = Reign(**{**history[-1].__dict__, "until": since})
        history.append(
            Reign(
                model=model,
                version=data["version"],
                since=since,
                until=None,
                deployed_event_id=doc["id"],
                correlation=doc["correlationid"],
                model_sha256=data["model"]["sha256"],
                mlflow_run_id=data["mlflow_run_id"],
                displaced=data.get("previous_version"),
                gate=_gate(evidence) if evidence else None,
                chain=_chain(runs.get(doc["correlationid"], []), data["evidence_event_id"]),
            )
        )
    return out


def gates(docs: Iterable[dict[str, Any]], model: str) -> list[Gate]:
    return sorted(
        (
            _gate(d)
            for d in docs
            if d["type"] == ModelEvaluated.EVENT_TYPE and d["data"]["context"]["model_name"] == model
        ),
        key=lambda g: g.time,
    )


def champion_at(history: list[Reign], moment: datetime) -> Reign | None:
    """The reign holding `moment`: since <= moment < until."""
    for reign in history:
        if reign.since <= moment and (reign.until is None or moment < reign.until):
            return reign
    return None


@dataclass(frozen=True)
class Change:
    """One line of a model's history: a takeover, or a gate decision that left the champion as it was."""

    time: datetime
    kind: str  # "first champion", "takeover", "no change", "refused"
    version: int | None
    champion_before: int | None
    gate: Gate | None
    deployed_event_id: str | None = None
    reason: str | None = None  # a refusal's: why the endpoint would not serve `version`
    refused_event_id: str | None = None


def refusals(docs: Iterable[dict[str, Any]], model: str) -> list[tuple[datetime, dict[str, Any]]]:
    """The endpoint's refusals of a model's champions, in time order (one per deployment refused)."""
    return sorted(
        (
            (_time(d), d)
            for d in docs
            if d["type"] == ModelRefused.EVENT_TYPE and d["data"].get("model_name") == model
        ),
        key=lambda pair: pair[0],
    )


def history(docs: Iterable[dict[str, Any]], model: str) -> list[Change]:
    """Every champion change with its cause, every failed gate as a 'no change', and every champion
    the endpoint refused to serve (the version it kept serving as `champion_before`), in time order."""
    docs = list(docs)
    out: list[Change] = []
    champion: int | None = None
    changes = reigns(docs).get(model, [])
    deciding = {r.gate.event_id for r in changes if r.gate}
    events: list[tuple[datetime, int, Any]] = [(r.since, 1, r) for r in changes]
    events += [(g.time, 0, g) for g in gates(docs, model) if g.event_id not in deciding and not g.passed]
    events += [(moment, 2, doc) for moment, doc in refusals(docs, model)]
    for moment, _, item in sorted(events, key=lambda e: (e[0], e[1])):
        if isinstance(item, dict):
            d = item["data"]
            out.append(
                Change(
                    moment, "refused", d["version"], d.get("served_version"), None,
                    d.get("deployed_event_id"), d["reason"], item["id"],
                )
            )  # fmt: skip
        elif isinstance(item, Reign):
            kind = "first champion" if champion is None else "takeover"
            out.append(Change(moment, kind, item.version, champion, item.gate, item.deployed_event_id))
            champion = item.version
        else:
            out.append(Change(moment, "no change", champion, champion, item))
    return out


# Loading from the store and rendering -----------------------------------------------------------
def load(store: LineageStore) -> list[dict[str, Any]]:
    """The documents a timeline needs, from the live namespace only (a replay's are not history)."""
    records: list[Record] = []
    for event_type in LOADED:
        records += [r for r in store.by_type(event_type) if r.subject == r.type]
    docs = []
    for r in sorted(records, key=lambda r: r.seq):
        doc = r.event()
        if doc and isinstance(doc.get("data"), dict):
            docs.append(doc)
    return docs


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return stamp(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def reign_json(reign: Reign | None) -> dict[str, Any] | None:
    if reign is None:
        return None
    return _jsonable({**asdict(reign), "raw": reign.raw})


def at_json(moment: datetime, answers: dict[str, Reign | None]) -> str:
    return json.dumps(
        {"at": stamp(moment), "models": {m: reign_json(r) for m, r in answers.items()}}, indent=2
    )


def _gate_lines(gate: Gate | None, indent: str = "  ") -> list[str]:
    if gate is None:
        return [f"{indent}gate: (the evaluated event is not in the log)"]
    verdict = "passed" if gate.passed else "FAILED"
    metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(gate.metrics.items()))
    lines = [
        f"{indent}gate: {verdict} at {stamp(gate.time)} (event {gate.event_id})",
        f"{indent}  metrics: {metrics}",
    ]
    lines += [f"{indent}  reason: {r}" for r in gate.reasons]
    return lines


def at_text(moment: datetime, answers: dict[str, Reign | None], first: dict[str, datetime]) -> str:
    lines = [f"at {stamp(moment)} (UTC)"]
    for model, reign in answers.items():
        if reign is None:
            since = first.get(model)
            later = f"; its first champion came at {stamp(since)}" if since and since > moment else ""
            lines.append(f"{model}: no champion{later}")
            continue
        until = stamp(reign.until) if reign.until else "now (still champion)"
        lines.append(f"{model}: version {reign.version} {'was' if reign.until else 'is'} champion")
        lines.append(f"  since {stamp(reign.since)} until {until}")
        lines.append(f"  deployed by event {reign.deployed_event_id} in run {reign.correlation}")
        lines.append(
            "  displaced: "
            + (f"version {reign.displaced}" if reign.displaced else "nothing (first champion)")
        )
        lines += _gate_lines(reign.gate)
        lines.append(f"  model sha256 {reign.model_sha256} (mlflow run {reign.mlflow_run_id})")
        lines.append("  chain back to the raw data:")
        for link in reign.chain:
            hashes = " ".join(f"{k}={v}" for k, v in link.items() if k not in ("type", "id", "time"))
            lines.append(f"    {link['type']:<28} {link['id'][:8]} {hashes}")
    return "\n".join(lines)


def history_json(model: str, changes: list[Change]) -> str:
    return json.dumps({"model": model, "changes": [_jsonable(asdict(c)) for c in changes]}, indent=2)


def history_text(model: str, changes: list[Change]) -> str:
    lines = [f"champion history of {model} (UTC)"]
    for c in changes:
        if c.kind == "no change":
            head = f"{stamp(c.time)}  no change      champion stays " + (
                f"v{c.version}" if c.version else "none"
            )
        elif c.kind == "takeover":
            head = f"{stamp(c.time)}  takeover       v{c.version} displaces v{c.champion_before}"
        elif c.kind == "refused":
            kept = f"v{c.champion_before}" if c.champion_before else "nothing"
            head = f"{stamp(c.time)}  REFUSED        v{c.version} not served, the endpoint keeps {kept}"
        else:
            head = f"{stamp(c.time)}  first champion v{c.version}"
        lines.append(head)
        if c.kind == "refused":
            deployment = (c.deployed_event_id or "")[:8] or "the registry at start"
            refused = (c.refused_event_id or "")[:8]
            lines.append(f"    refused by the endpoint (event {refused}, deployment {deployment})")
            lines.append(f"    reason: {c.reason}")
        if c.gate:
            cause = "gate passed" if c.gate.passed else "gate FAILED"
            lines.append(f"    cause: {cause} in run {c.gate.correlation} (evaluated {c.gate.event_id[:8]})")
            lines += [f"    evidence: {r}" for r in c.gate.reasons]
    return "\n".join(lines)
