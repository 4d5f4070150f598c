"""What the model page plots: a model's holdout metrics at each moment of its history, from the
same reigns and gate decisions `cairn audit history` prints (services/lineage/timeline.py), plus
the deployments that failed after a gate passed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from contracts import DeploymentFailed
from services.lineage import timeline
from services.lineage.pictures import ModelMark
from services.lineage.store import LineageStore


def marks(docs: Iterable[dict[str, Any]], failures: Iterable[dict[str, Any]], model: str) -> list[ModelMark]:
    """Each champion version at its takeover with its gate's holdout metrics; each failed gate at
    its decision with the challenger's; each failed deployment with the metrics its run's gate
    passed on (none when the run has no gate in the log). In time order."""
    docs = list(docs)
    reigns = timeline.reigns(docs).get(model, [])
    gates = timeline.gates(docs, model)
    deciding = {r.gate.event_id for r in reigns if r.gate}
    out = [
        ModelMark(
            "champion",
            r.since,
            r.correlation,
            dict(r.gate.metrics) if r.gate else {},
            r.version,
            "; ".join(r.gate.reasons) if r.gate else "",
        )  # fmt: skip
        for r in reigns
    ]
    out += [
        ModelMark("gatefail", g.time, g.correlation, dict(g.metrics), None, "; ".join(g.reasons))
        for g in gates
        if not g.passed and g.event_id not in deciding
    ]
    for doc in failures:
        if doc["data"].get("model_name") != model:
            continue
        passed = [g for g in gates if g.correlation == doc["correlationid"] and g.passed]
        metrics = dict(passed[-1].metrics) if passed else {}
        out.append(
            ModelMark("deployfail", timeline.to_ms(timeline.instant(doc["time"])), doc["correlationid"],
                      metrics, None, doc["data"]["reason"])
        )  # fmt: skip
    return sorted(out, key=lambda m: m.time)


def gate_metric(docs: Iterable[dict[str, Any]], model: str) -> str:
    """The metric the model's gate decides on (its latest decision's)."""
    decided = timeline.gates(docs, model)
    return decided[-1].metric if decided else ""


def load_failures(store: LineageStore) -> list[dict[str, Any]]:
    out = []
    for r in store.by_type(DeploymentFailed.EVENT_TYPE):
        doc = r.event() if r.subject == r.type else None
        if doc and isinstance(doc.get("data"), dict):
            out.append(doc)
    return out
