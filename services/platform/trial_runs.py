"""Trial runs recorded in MLflow in batches: one SQL transaction for many trials.

Why: `Tracker.log_run` costs three MlflowClient calls per trial (create_run, log_batch,
set_terminated), each its own session with its own reads, about 40 ms of CPU per trial on SQLite,
the largest part of the training service's CPU. Trials finish in bursts, so they are written
together here: the rows MLflow's SqlAlchemyStore writes for those three calls, built with MLflow's
own ORM tables, for a whole batch in one transaction on the store's own engine.

- Run ids are derived from the trial event id (uuid5), so a redelivered trial names the same run
  and the TrialCompleted event can carry it; a run id already in the store is left as it is
  (checked in the same transaction), so writing a run twice keeps one.
- `await TrialRunWriter.log(run)` returns once the transaction holding that run is committed: the
  handler publishes and acks only after its run is stored. A batch is written when `max_wait_s`
  has passed since its first run or `max_batch` runs are queued, by one worker thread (never the
  event loop). If a batch fails, its runs are written again one transaction each, so one bad run
  (or a run another replica wrote at the same moment) fails only its own caller.
- Only stores served by `SqlAlchemyStore` (sqlite:///..., postgresql+psycopg://..., ...) qualify
  (`for_tracker` returns None otherwise). Against a tracking server (http, https, databricks) the
  training service keeps `log_run_once`, one run per trial through the REST API.

This relies on MLflow internals (the store behind MlflowClient, its engine and its ORM models'
tables); tests/test_trial_runs.py reads runs back through MlflowClient to catch a change in them.
MLflow's public API costs far more than twice as much, so the internals stay (issue 28's rule):
`.venv/bin/python bench/public_api.py` (40 trials, five interleaved rounds, SQLite, 2 cores) gives
1.2 ms per trial here (0.46 ms of CPU), 53 ms (19 ms of CPU) through MlflowClient's create_run,
log_batch and set_terminated, 41 times as much, and 89 ms (21 ms of CPU) with MLflow's
asynchronous logging (`log_batch(..., synchronous=False)`), 51 times: it merges one run's writes
only, each run still its own transactions, and create_run and set_terminated stay synchronous.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from mlflow.entities import LifecycleStage, RunStatus, SourceType
from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlParam, SqlRun, SqlTag
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME
from mlflow.utils.uri import append_to_uri_path
from mlflow.utils.validation import _validate_metric, _validate_param
from sqlalchemy import bindparam, insert, select

from services.platform.tracking import EVENT_TAG, Tracker

# Which run ids trial events map to; fixed forever (changing it would fork runs on redelivery).
RUN_ID_NAMESPACE = uuid.UUID("6f0d7c5e-3b8a-5d51-9a63-2f1c8e4b7a90")
MAX_BATCH = 64
MAX_WAIT_S = 0.005
TABLES = (SqlRun, SqlTag, SqlParam, SqlMetric, SqlLatestMetric)
# Built once: SQLAlchemy works out a statement's cache key on every execution, for a new
# statement object from scratch (0.17 ms of the 1.15 per run this way).
INSERTS = {model: insert(model.__table__) for model in TABLES}
RUNS = SqlRun.__table__
PRESENT = select(RUNS.c.run_uuid).where(RUNS.c.run_uuid.in_(bindparam("ids", expanding=True)))
# What mlflow.store.db.utils' managed sessions run first on SQLite (case_sensitive_like aside: it
# only changes LIKE, which no insert uses).
SQLITE_PRAGMAS = ("PRAGMA foreign_keys = ON;", "PRAGMA busy_timeout = 20000;")


def trial_run_id(event_id: str) -> str:
    """The MLflow run id of a trial event: 32 hex characters, like MLflow's own (uuid4().hex)."""
    return uuid.uuid5(RUN_ID_NAMESPACE, event_id).hex


@dataclass(frozen=True)
class TrialRun:
    """One finished trial, as `Tracker.log_run` takes it."""

    experiment: str
    run_name: str
    event_id: str
    params: Mapping[str, Any]
    metrics: Mapping[str, float | None]
    tags: Mapping[str, str]
    failed: bool = False
    end_ms: int = field(default_factory=lambda: int(time.time() * 1000))

    @property
    def run_id(self) -> str:
        return trial_run_id(self.event_id)


class TrialRunWriter:
    """Batches trial runs into single transactions on a SqlAlchemyStore; see the module docstring."""

    def __init__(
        self,
        tracker: Tracker,
        store: SqlAlchemyStore,
        *,
        max_batch: int = MAX_BATCH,
        max_wait_s: float = MAX_WAIT_S,
    ):
        self.tracker = tracker
        self.store = store
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._artifact_roots: dict[str, tuple[int, str]] = {}  # experiment name -> (id, location)
        self._pending: list[tuple[TrialRun, asyncio.Future[str]]] = []
        self._full: asyncio.Future[None] | None = None  # set when the queue holds a whole batch
        self._drainer: asyncio.Task[None] | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cairn-trial-runs")

    @classmethod
    def for_tracker(cls, tracker: Tracker, **options: Any) -> TrialRunWriter | None:
        """A writer when the tracking store is SQL (served by SqlAlchemyStore); None otherwise."""
        store = tracker.client._tracking_client.store  # MLflow internal: the store behind the client
        return cls(tracker, store, **options) if isinstance(store, SqlAlchemyStore) else None

    async def log(self, run: TrialRun) -> str:
        """Queue the run; return its id once the transaction holding it is committed."""
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending.append((run, done))
        if len(self._pending) >= self.max_batch:
            _wake(self._full)
        if self._drainer is None:
            self._drainer = asyncio.create_task(self._drain(), name="trial-runs")
        # A cancelled caller (handler timeout) leaves its run queued: it is written anyway, and the
        # redelivery that follows finds it.
        return await asyncio.shield(done)

    async def close(self) -> None:
        """Write what is queued, then stop the worker thread."""
        if self._drainer is not None:
            _wake(self._full)
            await asyncio.gather(self._drainer, return_exceptions=True)
        self._thread.shutdown(wait=True)

    async def _drain(self) -> None:
        """Write batches while runs are queued; each caller learns its own run's outcome."""
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                if len(self._pending) < self.max_batch:  # let the batch fill for max_wait_s
                    self._full = loop.create_future()
                    timer = loop.call_later(self.max_wait_s, _wake, self._full)
                    await self._full
                    timer.cancel()
                batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
                try:
                    outcomes = await loop.run_in_executor(
                        self._thread, self._write_each, [run for run, _ in batch]
                    )
                except BaseException as exc:  # the thread is gone (closed) or this task is cancelled
                    for _, done in batch:
                        if isinstance(exc, asyncio.CancelledError):
                            done.cancel()
                        elif not done.done():
                            done.set_exception(exc)
                    raise
                for (_, done), outcome in zip(batch, outcomes, strict=True):
                    if isinstance(outcome, Exception):
                        done.set_exception(outcome)
                    else:
                        done.set_result(outcome)
        finally:
            self._drainer = None

    # In the worker thread ------------------------------------------------------------------
    def _write_each(self, runs: Sequence[TrialRun]) -> list[str | Exception]:
        """All runs in one transaction; should it fail, each run in its own (its own outcome)."""
        if len(runs) > 1:
            try:
                self.write(runs)
                return [r.run_id for r in runs]
            except Exception:  # noqa: BLE001 - retried one by one below, each caller gets its own error
                pass
        outcomes: list[str | Exception] = []
        for run in runs:
            try:
                self.write([run])
                outcomes.append(run.run_id)
            except Exception as exc:  # noqa: BLE001 - handed to that run's caller
                outcomes.append(exc)
        return outcomes

    def write(self, runs: Sequence[TrialRun]) -> int:
        """Write the runs not yet in the store, in one transaction; return how many were new.

        The rows are those of SqlAlchemyStore.create_run + log_batch + update_run_info (MLflow
        3.17): the run (final status, end time, artifact_uri `<experiment location>/<id>/artifacts`),
        its tags with `mlflow.runName`, params, metrics (step 0) and their latest_metrics. They go
        in as one multi-row INSERT per table, on a Core connection of the store's engine: neither
        an ORM session nor its bulk-insert path, which cost more CPU than the database (one run on
        SQLite, before write-ahead logging: 2.1 ms of CPU through the session, 1.35 ms this way).
        On SQLite the connection gets the pragmas MLflow's own sessions set, the busy timeout
        above all: other services write to the same file."""
        built = {run.run_id: self._rows(run) for run in runs}  # a run twice in a batch: once
        with self.store.engine.begin() as conn:
            if conn.dialect.name == "sqlite":
                for pragma in SQLITE_PRAGMAS:
                    conn.exec_driver_sql(pragma)
            for run_id in set(conn.execute(PRESENT, {"ids": list(built)}).scalars()):
                del built[run_id]
            for model in TABLES:
                if rows := [row for tables in built.values() for row in tables[model]]:
                    conn.execute(INSERTS[model], rows)
        return len(built)

    def _rows(self, run: TrialRun) -> dict[type, list[dict[str, Any]]]:
        """The rows of one run, by model, as column -> value."""
        experiment_id, location = self._experiment(run.experiment)
        run_id, end = run.run_id, run.end_ms
        status = RunStatus.FAILED if run.failed else RunStatus.FINISHED
        tags = {EVENT_TAG: run.event_id, **run.tags, MLFLOW_RUN_NAME: run.run_name}
        params = {}
        for idx, (key, value) in enumerate(run.params.items()):
            param = _validate_param(key, str(value), path=f"params[{idx}]")  # truncates as MLflow does
            params[param.key] = param.value
        metrics = []
        for idx, (key, value) in enumerate(run.metrics.items()):
            if value is None:
                continue
            _validate_metric(key, float(value), end, 0, path=f"metrics[{idx}]")
            is_nan, stored = self.store.sanitize_metric_value(float(value))
            metrics.append(
                {
                    "run_uuid": run_id,
                    "key": key,
                    "value": stored,
                    "timestamp": end,
                    "step": 0,
                    "is_nan": is_nan,
                }
            )
        return {
            SqlRun: [
                {
                    "run_uuid": run_id,
                    "name": run.run_name,
                    "artifact_uri": append_to_uri_path(
                        location, run_id, SqlAlchemyStore.ARTIFACTS_FOLDER_NAME
                    ),
                    "experiment_id": experiment_id,
                    "source_type": SourceType.to_string(SourceType.UNKNOWN),
                    "source_name": "",
                    "entry_point_name": "",
                    "user_id": "unknown",  # what MlflowClient.create_run passes without an mlflow.user tag
                    "status": RunStatus.to_string(status),
                    "start_time": end,
                    "end_time": end,
                    "deleted_time": None,
                    "source_version": "",
                    "lifecycle_stage": LifecycleStage.ACTIVE,
                }
            ],
            SqlTag: [{"run_uuid": run_id, "key": k, "value": v} for k, v in tags.items()],
            SqlParam: [{"run_uuid": run_id, "key": k, "value": v} for k, v in params.items()],
            SqlMetric: metrics,
            SqlLatestMetric: metrics,
        }

    def _experiment(self, name: str) -> tuple[int, str]:
        """The experiment's id and artifact location, looked up once per name."""
        if name not in self._artifact_roots:
            experiment_id = self.tracker.experiment(name)
            location = self.store.get_experiment(experiment_id).artifact_location
            self._artifact_roots[name] = (int(experiment_id), location)
        return self._artifact_roots[name]


def _wake(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)
