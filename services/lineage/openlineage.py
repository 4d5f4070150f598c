"""OpenLineage run events for each pipeline step, derived from the event log, emitted through the
official openlineage-python client.

A step's run starts when its input event was published and completes (or fails) with its output
event; inputs and outputs are the content-addressed artifacts the two events name. Deriving them
in the lineage service keeps the step services free of a second reporting path and lets the
whole history be re-emitted from the stream.

The client is configured the way every OpenLineage integration is (a Marquez or DataHub user points
cairn at their server as they point everything else): `OPENLINEAGE_URL`, `OPENLINEAGE_CONFIG`, an
`openlineage.yml` (working directory or ~/.openlineage) or `OPENLINEAGE__TRANSPORT__...` variables,
with its HTTP, Kafka, file and console transports. `CAIRN_OPENLINEAGE_URL` (a file:// path or an
http(s) endpoint) still works and wins when set. With neither, nothing is emitted.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from openlineage.client import OpenLineageClient
from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.facet_v2 import dataset_version_dataset, error_message_run, job_type_job

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


def _version(sha256: str) -> dict[str, Any]:
    return {
        "version": dataset_version_dataset.DatasetVersionDatasetFacet(
            datasetVersion=sha256, producer=PRODUCER
        )
    }


def _refs(doc: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(namespace, name, sha256) of every artifact an event names: the URI's scheme is the namespace."""
    out = []
    for _, ref in artifact_refs(doc.get("data", {})):
        namespace = ref["uri"].split("://", 1)[0] if "://" in ref["uri"] else "file"
        out.append((namespace, ref["uri"], ref["sha256"]))
    return out


def _inputs(doc: dict[str, Any]) -> list[InputDataset]:
    return [InputDataset(namespace=ns, name=name, facets=_version(sha)) for ns, name, sha in _refs(doc)]


def _outputs(doc: dict[str, Any]) -> list[OutputDataset]:
    return [OutputDataset(namespace=ns, name=name, facets=_version(sha)) for ns, name, sha in _refs(doc)]


def run_events(output: Record, cause: Record | None) -> list[RunEvent]:
    """START (at the cause's time) and COMPLETE/FAIL (at the output's time) for one step."""
    if output.type not in STEPS or cause is None:
        return []
    job, state = STEPS[output.type]
    out_doc = output.event() or {}
    in_doc = cause.event() or {}
    run_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"cairn-run:{cause.event_id}:{job}"))
    job_type = job_type_job.JobTypeJobFacet(
        processingType="BATCH", integration="CAIRN", jobType="STEP", producer=PRODUCER
    )
    start = RunEvent(
        eventType=RunState.START,
        eventTime=in_doc.get("time") or output.time or "",
        run=Run(runId=run_id),
        job=Job(namespace=NAMESPACE, name=job, facets={"jobType": job_type}),
        inputs=_inputs(in_doc),
        outputs=[],
        producer=PRODUCER,
    )
    end_facets: dict[str, Any] = {}
    if state == "FAIL":
        end_facets["errorMessage"] = error_message_run.ErrorMessageRunFacet(
            message=str(out_doc.get("data", {}).get("reason", "failed")),
            programmingLanguage="python",
            producer=PRODUCER,
        )
    end = RunEvent(
        eventType=RunState.FAIL if state == "FAIL" else RunState.COMPLETE,
        eventTime=out_doc.get("time") or output.time or "",
        run=Run(runId=run_id, facets=end_facets),
        job=Job(namespace=NAMESPACE, name=job),
        inputs=_inputs(in_doc),
        outputs=_outputs(out_doc),
        producer=PRODUCER,
    )
    return [start, end]


def configured_elsewhere() -> bool:
    """Is the client configured by its own means (variables or an openlineage.yml)?"""
    if os.environ.get("OPENLINEAGE_URL") or os.environ.get("OPENLINEAGE_CONFIG"):
        return True
    if any(k.startswith("OPENLINEAGE__TRANSPORT") for k in os.environ):
        return True
    return any(
        p.is_file()
        for p in (Path.cwd() / "openlineage.yml", Path.home() / ".openlineage" / "openlineage.yml")
    )


def transport_for(url: str) -> dict[str, Any]:
    """The client's transport config for CAIRN_OPENLINEAGE_URL: file:// appends JSON lines, http(s)
    POSTs to the path given (Marquez: http://marquez:5000/api/v1/lineage)."""
    if url.startswith(("http://", "https://")):
        parts = urlsplit(url)
        return {
            "type": "http",
            "url": f"{parts.scheme}://{parts.netloc}",
            "endpoint": parts.path.lstrip("/") or "api/v1/lineage",
            "timeout": 5,
        }
    return {"type": "file", "log_file_path": url.removeprefix("file://"), "append": True}


def make_client(url: str | None) -> OpenLineageClient | None:
    """The client from CAIRN_OPENLINEAGE_URL, else from OpenLineage's own configuration, else None."""
    if url:
        if not url.startswith(("http://", "https://")):
            Path(url.removeprefix("file://")).parent.mkdir(parents=True, exist_ok=True)
        # The services' own checkout is no job's source code: no git facet from wherever they run.
        facets = {"source_code_location": {"disabled": True}}
        return OpenLineageClient(config={"transport": transport_for(url), "facets": facets})
    return OpenLineageClient() if configured_elsewhere() else None


class OpenLineageSink:
    """Emits run events through the client, with whatever transport it was configured with."""

    def __init__(self, client: OpenLineageClient):
        self.client = client

    def emit(self, events: list[RunEvent]) -> None:
        for event in events:
            self.client.emit(event)

    def close(self) -> None:
        self.client.close(5.0)
