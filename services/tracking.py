"""MLflow: every trial and final model as a run, and the registry's `champion` alias.

Runs carry tags that link back to the event log (event id, correlation id) and the artifact
store (hashes), so either side can be reached from the other. Writes are idempotent: a run is
found by its event id before a second one is created.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from services.local_store import schema_lock

EVENT_TAG = "cairn.event_id"


@dataclass(frozen=True)
class Champion:
    version: int
    model_sha256: str
    model_uri: str
    run_id: str | None


class Tracker:
    def __init__(self, tracking_uri: str):
        with schema_lock(tracking_uri):
            # MLflow creates (or migrates) its schema on the first store access; one process at a time.
            self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
            self.client.search_experiments(max_results=1)
            self.client.search_registered_models(max_results=1)
        self._experiments: dict[str, str] = {}

    def experiment(self, name: str) -> str:
        if name not in self._experiments:
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                try:
                    self._experiments[name] = self.client.create_experiment(name)
                except MlflowException:  # another replica created it first
                    self._experiments[name] = self.client.get_experiment_by_name(name).experiment_id
            else:
                self._experiments[name] = exp.experiment_id
        return self._experiments[name]

    def find_run(self, experiment: str, event_id: str) -> str | None:
        runs = self.client.search_runs(
            [self.experiment(experiment)], filter_string=f"tags.`{EVENT_TAG}` = '{event_id}'", max_results=1
        )
        return runs[0].info.run_id if runs else None

    def log_run(
        self,
        *,
        experiment: str,
        run_name: str,
        event_id: str,
        params: dict[str, Any],
        metrics: dict[str, float],
        tags: dict[str, str],
        failed: bool = False,
        check_existing: bool = False,
    ) -> str:
        """One finished run in three writes; with check_existing, a redelivery reuses its run."""
        if check_existing and (existing := self.find_run(experiment, event_id)):
            return existing
        run = self.client.create_run(
            self.experiment(experiment), run_name=run_name, tags={EVENT_TAG: event_id, **tags}
        )
        now = int(time.time() * 1000)
        self.client.log_batch(
            run.info.run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None],
            params=[Param(k, str(v)) for k, v in params.items()],
            tags=[],
        )
        self.client.set_terminated(run.info.run_id, status="FAILED" if failed else "FINISHED")
        return run.info.run_id

    # Registry -----------------------------------------------------------------------------
    def champion(self, model_name: str) -> Champion | None:
        try:
            mv = self.client.get_model_version_by_alias(model_name, "champion")
        except MlflowException:
            return None
        return Champion(int(mv.version), mv.tags.get("cairn.model_sha256", ""), mv.source, mv.run_id)

    def register(
        self, model_name: str, *, source: str, run_id: str, sha256: str, evidence_event_id: str, size: int
    ) -> int:
        """Register (idempotently, keyed by the evaluation event) and return the version."""
        with contextlib.suppress(MlflowException):
            self.client.create_registered_model(
                model_name, description="cairn champion line; the alias history lives in the event log"
            )
        for mv in self.client.search_model_versions(f"name = '{model_name}'"):
            if mv.tags.get("cairn.evidence_event_id") == evidence_event_id:
                return int(mv.version)
        mv = self.client.create_model_version(
            model_name,
            source=source,
            run_id=run_id,
            tags={
                "cairn.model_sha256": sha256,
                "cairn.evidence_event_id": evidence_event_id,
                "cairn.model_size": str(size),
            },
        )
        return int(mv.version)

    def set_champion(self, model_name: str, version: int) -> None:
        self.client.set_registered_model_alias(model_name, "champion", str(version))

    def champions(self) -> dict[str, Champion]:
        out = {}
        for rm in self.client.search_registered_models():
            if (c := self.champion(rm.name)) is not None:
                out[rm.name] = c
        return out
