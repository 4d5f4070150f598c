"""OpenLineage run events for each pipeline step, derived from the event log.

A step's run starts when its input event was published and completes (or fails) with its output
event; inputs and outputs are the content-addressed artifacts the two events name. Deriving them
in the lineage service keeps the step services free of a second reporting path and lets the
whole history be re-emitted from the stream.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import httpx

from contracts import (
    DataRejected,
    DatasetIngested,
    DeploymentFailed,
    FeaturesBuilt,
    ModelDeployed,
    ModelEvaluated,
    ModelTrained,
    TuningCompleted,
)
from services.lineage.store import Record, artifact_refs

PRODUCER = "https://github.com/cairn-mlops/cairn"
SCHEMA_URL = "https://openlineage.io/spec/2-0-2/OpenLineage.json#/definitions/RunEvent"
NAMESPACE = "cairn"

# output event type -> (job name, state); a step's job is the service that produces its output
STEPS: dict[str, tuple[str, str]] = {
    p.EVENT_TYPE: (p.PRODUCER, state)
    for p, state in (
        (DatasetIngested, "COMPLETE"),
        (DataRejected, "FAIL"),
        (FeaturesBuilt, "COMPLETE"),
        (TuningCompleted, "COMPLETE"),
        (ModelTrained, "COMPLETE"),
        (ModelEvaluated, "COMPLETE"),
        (ModelDeployed, "COMPLETE"),
        (DeploymentFailed, "FAIL"),
    )
}


def _datasets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for role, ref in artifact_refs(doc.get("data", {})):
        out.append(
            {
                "namespace": ref["uri"].split("://", 1)[0] if "://" in ref["uri"] else "file",
                "name": ref["uri"],
                "facets": {
                    "version": {
                        "_producer": PRODUCER,
                        "_schemaURL": "https://openlineage.io/spec/facets/1-0-1/DatasetVersionDatasetFacet.json",
                        "datasetVersion": ref["sha256"],
                    }
                },
            }
        )
        _ = role
    return out


def run_events(output: Record, cause: Record | None) -> list[dict[str, Any]]:
    """START (at the cause's time) and COMPLETE/FAIL (at the output's time) for one step."""
    if output.type not in STEPS or cause is None:
        return []
    job, state = STEPS[output.type]
    out_doc = output.event() or {}
    in_doc = cause.event() or {}
    run_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"cairn-run:{cause.event_id}:{job}"))
    base = {"producer": PRODUCER, "schemaURL": SCHEMA_URL}
    job_facets = {
        "jobType": {
            "_producer": PRODUCER,
            "_schemaURL": "https://openlineage.io/spec/facets/2-0-4/JobTypeJobFacet.json",
            "processingType": "BATCH",
            "integration": "CAIRN",
            "jobType": "STEP",
        }
    }
    run = {"runId": run_id, "facets": {}}
    start = {
        **base,
        "eventType": "START",
        "eventTime": in_doc.get("time") or output.time,
        "run": run,
        "job": {"namespace": NAMESPACE, "name": job, "facets": job_facets},
        "inputs": _datasets(in_doc),
        "outputs": [],
    }
    end_run: dict[str, Any] = {"runId": run_id, "facets": {}}
    if state == "FAIL":
        end_run["facets"]["errorMessage"] = {
            "_producer": PRODUCER,
            "_schemaURL": "https://openlineage.io/spec/facets/1-0-1/ErrorMessageRunFacet.json",
            "message": str(out_doc.get("data", {}).get("reason", "failed")),
            "programmingLanguage": "python",
        }
    end = {
        **base,
        "eventType": state,
        "eventTime": out_doc.get("time") or output.time,
        "run": end_run,
        "job": {"namespace": NAMESPACE, "name": job},
        "inputs": _datasets(in_doc),
        "outputs": _datasets(out_doc),
    }
    return [start, end]


class OpenLineageSink:
    """Writes run events as JSON lines to a file:// path, or POSTs them to an HTTP endpoint (Marquez)."""

    def __init__(self, url: str):
        self.url = url

    def emit(self, events: list[dict[str, Any]]) -> None:
        if not events:
            return
        if self.url.startswith(("http://", "https://")):
            with httpx.Client(timeout=5) as client:
                for event in events:
                    client.post(self.url, json=event).raise_for_status()
            return
        path = Path(self.url.removeprefix("file://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            for event in events:
                f.write(json.dumps(event, sort_keys=True) + "\n")
