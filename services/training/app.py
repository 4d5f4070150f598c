"""training: trial-requested -> trial-completed, and tuning-completed -> model-trained, on Dask.

The handler submits a pure function to the cluster and awaits it; the lease on the message is
renewed meanwhile. Deterministic model errors end a trial as `failed` (retrying cannot help);
infrastructure errors (a lost worker, a closed connection) are retried by the bus policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import platform
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

from distributed.client import ClosedClientError, FutureCancelledError
from distributed.scheduler import KilledWorker
from mlflow.entities import Metric as MlflowMetric
from mlflow.entities import Param as MlflowParam

from contracts import (
    Envelope,
    ModelTrained,
    TrialCompleted,
    TrialRequested,
    TrialStatus,
    TuningCompleted,
    new_event,
)
from services import __version__
from services.platform.artifacts import ArtifactStore, IntegrityError, read_verified
from services.platform.bus.consumer import Delivery
from services.platform.compute import Compute, known_workers, open_compute, trial_concurrency
from services.platform.ml.bundle import save_bundle
from services.platform.ml.placement import cluster_resources_async, trial_device, trial_resources
from services.platform.ml.trial import TrialSpec, fit_final, run_trial
from services.platform.runtime import Route, Service
from services.platform.tracking import Tracker
from services.platform.trial_runs import TrialRun, TrialRunWriter
from services.training import logic

# A closed client (Dask gave up on a lost scheduler) is the cluster's outage, not the model's fault.
TRANSIENT = (
    KilledWorker,
    FutureCancelledError,
    ClosedClientError,
    OSError,
    TimeoutError,
    asyncio.TimeoutError,
)


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "cairn": __version__}
    for dist in ("xgboost", "scikit-learn", "numpy", "pandas", "pyarrow", "dask", "distributed"):
        out[dist] = version(dist)
    return out


def log_run_once(tracker: Tracker, *, check_existing: bool = False, **run: Any) -> str:
    """`Tracker.log_run`, safe against an attempt that died half-way.

    A run is written in three calls (create, log, terminate). If MLflow went away or the process
    was killed between them, the redelivered event finds a run that is still RUNNING and has no
    metrics: reusing it as is would lose the result. It is completed here instead (the same
    params again are accepted by MLflow; a changed value would be refused).
    """
    if check_existing and (existing := tracker.find_run(run["experiment"], run["event_id"])):
        info = tracker.client.get_run(existing).info
        if logic.run_settled(info.status):
            return existing
        now = int(time.time() * 1000)
        tracker.client.log_batch(
            existing,
            metrics=[MlflowMetric(k, float(v), now, 0) for k, v in run["metrics"].items() if v is not None],
            params=[MlflowParam(k, str(v)) for k, v in run["params"].items()],
        )
        tracker.client.set_terminated(existing, status=logic.run_end_status(bool(run.get("failed"))))
        return existing
    return tracker.log_run(**run)


@dataclass(frozen=True)
class TrainingContext:
    """What a running training service holds."""

    store: ArtifactStore
    compute: Compute
    available: dict[str, float]  # the cluster's resources, for placement
    tracker: Tracker
    versions: dict[str, str]
    trial_runs: TrialRunWriter | None  # batched trial runs on a SQL store; None: log_run_once per trial


class Training(Service[TrainingContext]):
    name = "training"

    def routes(self) -> Sequence[Route]:
        # Trials and final fits run far longer than other steps: their own, generous bound.
        timeout = self.settings.training_timeout_s
        return [
            Route(
                TrialRequested,
                self.on_trial_requested,
                max_workers=trial_concurrency(self.settings),
                handler_timeout_s=timeout,
            ),
            Route(TuningCompleted, self.on_tuning_completed, handler_timeout_s=timeout),
        ]

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[TrainingContext]:
        """Dask first (the slow one), then MLflow: should MLflow be unreachable, the cluster closes."""
        async with contextlib.AsyncExitStack() as opened:
            compute = await open_compute(self.settings)
            opened.push_async_callback(compute.close)
            self.metrics.dask_workers.labels(self.name).set_function(lambda: known_workers(compute))
            opened.callback(self.metrics.dask_workers.remove, self.name)
            available = await cluster_resources_async(compute.client)
            s = self.settings
            tracker = await asyncio.to_thread(Tracker, s.tracking_uri, s.mlflow_prefix)
            trial_runs = TrialRunWriter.for_tracker(tracker)
            if trial_runs is not None:
                opened.push_async_callback(trial_runs.close)
            yield TrainingContext(
                store=ArtifactStore(self.settings.artifacts),
                compute=compute,
                available=available,
                tracker=tracker,
                versions=library_versions(),
                trial_runs=trial_runs,
            )

    async def on_trial_requested(
        self, event: Envelope[TrialRequested], delivery: Delivery
    ) -> list[Envelope[Any]]:
        """Run one trial on Dask and log it to MLflow."""
        req = event.data
        ctx = self.context
        self.metrics.trials_running.inc()
        try:
            placement = trial_resources(req.family.value, ctx.available)
            spec = TrialSpec(
                req.featureset.uri,
                req.featureset.sha256,
                req.family.value,
                dict(req.params),
                req.budget,
                req.task.value,
                req.metric.value,
                req.seed,
                trial_device(placement),
            )
            client = await ctx.compute.live_client()
            future = client.submit(
                run_trial, spec, key=f"trial-{event.id}", pure=False, resources=placement or None
            )
            result = await future
            status, error = TrialStatus.ok, None
        except (*TRANSIENT, IntegrityError):
            # A lost worker or connection: the bus policy retries. A feature set that does not
            # match its hash: dead-lettered at once by the policy, not recorded as a model failure.
            raise
        except Exception as exc:  # noqa: BLE001 - a model that cannot fit is a result, not an outage
            result, status, error = logic.failed_trial(exc)
        finally:
            self.metrics.trials_running.dec()
        run = TrialRun(
            experiment=req.model_name,
            run_name=f"{req.study_id}/t{req.trial_id}/r{req.rung}",
            event_id=event.id,
            params={**req.params, "family": req.family.value, "budget": req.budget, "rung": req.rung},
            metrics={
                req.metric.value: result["score"],
                "duration_s": result["duration_s"],
                "rounds": result["rounds"],
            },
            tags={
                "cairn.kind": "trial",
                "cairn.study_id": req.study_id,
                "cairn.correlation_id": event.correlationid,
                "cairn.featureset_sha256": req.featureset.sha256,
            },
            failed=status is TrialStatus.failed,
        )
        if ctx.trial_runs is not None:  # stored (committed) before the result is published
            run_id = await ctx.trial_runs.log(run)
        else:  # a tracking server: one run through its REST API
            run_id = await asyncio.to_thread(
                log_run_once,
                ctx.tracker,
                experiment=run.experiment,
                run_name=run.run_name,
                event_id=run.event_id,
                params=dict(run.params),
                metrics=dict(run.metrics),
                tags=dict(run.tags),
                failed=run.failed,
                check_existing=delivery.redelivered,
            )
        done = TrialCompleted(
            study_id=req.study_id,
            trial_id=req.trial_id,
            rung=req.rung,
            budget=req.budget,
            family=req.family,
            params=req.params,
            status=status,
            metric=req.metric,
            score=result["score"],
            duration_s=result["duration_s"],
            mlflow_run_id=run_id,
            error=error,
        )
        return [new_event(done, source=self.source, cause=event, subject=req.study_id)]

    async def on_tuning_completed(
        self, event: Envelope[TuningCompleted], delivery: Delivery
    ) -> list[Envelope[Any]]:
        """Fit the winner at full budget, store it content-addressed, log it to MLflow."""
        tuned = event.data
        best, budget = logic.final_fit(tuned)
        ctx = tuned.context
        held = self.context
        features = tuned.features
        placement = trial_resources(best.family.value, held.available)
        spec = TrialSpec(
            features.featureset.uri,
            features.featureset.sha256,
            best.family.value,
            dict(best.params),
            budget,
            ctx.task.value,
            tuned.metric.value,
            ctx.seed,
            trial_device(placement),
        )
        client = await held.compute.live_client()
        fitted = await client.submit(
            fit_final, spec, key=f"final-{event.id}", pure=False, resources=placement or None
        )
        transform = features.transform
        spec = json.loads(await asyncio.to_thread(read_verified, transform.uri, transform.sha256))
        bundle = await asyncio.to_thread(
            save_bundle,
            held.store,
            estimator=fitted["estimator"],
            estimator_format=fitted["format"],
            spec=spec,
            family=best.family,
            params=dict(best.params),
            budget=budget,
            config=fitted.get("config"),
        )
        run_id = await asyncio.to_thread(
            log_run_once,
            held.tracker,
            experiment=ctx.model_name,
            run_name=f"{tuned.study_id}/final",
            event_id=event.id,
            params={**best.params, "family": best.family.value, "budget": budget},
            metrics={f"validation_{tuned.metric.value}": fitted["validation_score"]},
            tags={
                "cairn.kind": "model",
                "cairn.study_id": tuned.study_id,
                "cairn.correlation_id": event.correlationid,
                "cairn.model_sha256": bundle.sha256,
                "cairn.model_uri": bundle.uri,
                "cairn.dataset_sha256": features.dataset.sha256,
                "cairn.featureset_sha256": features.featureset.sha256,
                **{f"cairn.version.{k}": v for k, v in held.versions.items()},
            },
            check_existing=delivery.redelivered,
        )
        trained = ModelTrained(
            context=ctx,
            study_id=tuned.study_id,
            model=bundle,
            family=best.family,
            params=best.params,
            budget=budget,
            metric=tuned.metric,
            validation_score=fitted["validation_score"],
            featureset=features.featureset,
            transform=features.transform,
            dataset=features.dataset,
            mlflow_run_id=run_id,
            versions=held.versions,
        )
        return [new_event(trained, source=self.source, cause=event, subject=ctx.model_name)]
