"""Lineage queries over the store: from anything (event, artifact hash, model name) to the raw data
upstream and the deployments downstream, rendered as text, JSON, Mermaid or Graphviz DOT."""

from __future__ import annotations

import json
import re
from typing import Any

from contracts import ModelDeployed, TrialCompleted, TrialRequested, TrialsPromoted
from contracts.subjects import short_type
from services.lineage.store import LineageStore, Record, artifact_refs

TRIAL_TYPES = {TrialRequested.EVENT_TYPE, TrialCompleted.EVENT_TYPE, TrialsPromoted.EVENT_TYPE}


class NotFound(LookupError):
    pass


def resolve(store: LineageStore, ident: str) -> Record:
    """An event id, an artifact hash (or a prefix of 8+ hex digits), or a model name."""
    if (record := store.by_event_id(ident)) is not None:
        return record
    if re.fullmatch(r"[0-9a-f]{8,64}", ident):
        found = store.by_artifact(ident)
        if found:
            return found[0]
    deployed = [
        r
        for r in store.by_type(ModelDeployed.EVENT_TYPE)
        if r.subject == r.type  # the live namespace: a replay's deployments are not the champion's history
        and (r.event() or {}).get("data", {}).get("model_name") == ident
    ]
    if deployed:
        return deployed[-1]
    raise NotFound(f"no event, artifact or deployed model called {ident!r}")


def upstream(store: LineageStore, record: Record) -> list[Record]:
    """This event and its causes, back to the event that started the run."""
    chain = [record]
    seen = {record.event_id}
    while chain[-1].causationid and chain[-1].causationid not in seen:
        cause = store.by_event_id(chain[-1].causationid)
        if cause is None:
            break
        seen.add(cause.event_id)
        chain.append(cause)
    return chain


def downstream(store: LineageStore, record: Record, limit: int = 5000) -> list[Record]:
    """Everything this event caused, in stream order."""
    out: list[Record] = []
    frontier = [record.event_id]
    seen = {record.event_id}
    while frontier and len(out) < limit:
        nxt = []
        for event_id in frontier:
            for child in store.children(event_id):
                if child.event_id not in seen:
                    seen.add(child.event_id)
                    out.append(child)
                    nxt.append(child.event_id)
        frontier = nxt
    return sorted(out, key=lambda r: r.seq)


def describe(record: Record) -> dict[str, Any]:
    doc = record.event() or {}
    data = doc.get("data", {}) if isinstance(doc.get("data"), dict) else {}
    out: dict[str, Any] = {
        "seq": record.seq,
        "type": record.type,
        "id": record.event_id,
        "time": record.time,
        "source": doc.get("source"),
        "artifacts": {role: ref["sha256"] for role, ref in artifact_refs(data)},
    }
    for key in (
        "uri",
        "source_uri",
        "source_sha256",
        "mlflow_run_id",
        "model_name",
        "version",
        "passed",
        "reason",
        "study_id",
        "versions",
        "metrics",
    ):
        if key in data:
            out[key] = data[key]
    return out


def _collapse(records: list[Record]) -> list[Record | str]:
    out: list[Record | str] = []
    run = 0
    for r in records:
        if r.type in TRIAL_TYPES:
            run += 1
            continue
        if run:
            out.append(f"... {run} trial and promotion events")
            run = 0
        out.append(r)
    if run:
        out.append(f"... {run} trial and promotion events")
    return out


def _line(record: Record) -> str:
    d = describe(record)
    bits = [f"{record.seq:>6}", f"{(record.type or record.subject):<28}", (record.event_id or "")[:8]]
    for role, sha in d["artifacts"].items():
        bits.append(f"{role}={sha[:12]}")
    for key in ("source_uri", "uri", "model_name", "version", "mlflow_run_id", "passed", "reason"):
        if key in d and d[key] is not None:
            bits.append(f"{key}={d[key]}")
    if "source_sha256" in d:
        bits.append(f"raw_sha256={d['source_sha256']}")
    if "versions" in d:
        bits.append("versions=" + ",".join(f"{k}:{v}" for k, v in sorted(d["versions"].items())))
    return " ".join(bits)


def render(store: LineageStore, record: Record, fmt: str = "text") -> str:
    up = upstream(store, record)
    down = downstream(store, record)
    if fmt == "json":
        return json.dumps(
            {
                "target": describe(record),
                "upstream": [describe(r) for r in up],
                "downstream": [describe(r) for r in down],
            },
            indent=2,
        )
    if fmt in ("mermaid", "dot"):
        nodes = {r.event_id: r for r in [*up, *down] if r.type not in TRIAL_TYPES or r is record}
        edges = []
        for r in nodes.values():
            cause = r.causationid
            while cause and cause not in nodes:  # skip collapsed trial events
                parent = store.by_event_id(cause)
                cause = parent.causationid if parent else None
            if cause:
                edges.append((cause, r.event_id))
        label = {eid: f"{short_type(r.type or '')}\\n{eid[:8]}" for eid, r in nodes.items()}
        if fmt == "mermaid":
            lines = ["graph TD"]
            lines += [
                f'  e{r.seq}["{label[eid].replace(chr(92) + "n", "<br/>")}"]' for eid, r in nodes.items()
            ]
            lines += [f"  e{nodes[a].seq} --> e{nodes[b].seq}" for a, b in edges]
            return "\n".join(lines)
        lines = ["digraph lineage {", "  rankdir=LR;"]
        lines += [f'  e{r.seq} [label="{label[eid]}"];' for eid, r in nodes.items()]
        lines += [f"  e{nodes[a].seq} -> e{nodes[b].seq};" for a, b in edges]
        return "\n".join(lines + ["}"])
    out = [f"lineage of {record.type} {record.event_id}", "upstream (newest first):"]
    for item in _collapse(up):
        out.append("  " + (item if isinstance(item, str) else _line(item)))
    out.append("downstream:")
    for item in _collapse(down) or ["  (nothing yet)"]:
        out.append("  " + (item if isinstance(item, str) else _line(item)))
    return "\n".join(out)
