"""Trial runs written in batches (services/platform/trial_runs.py), against real MLflow stores.

On SQLite and on PostgreSQL: a run written by the writer must read back through MlflowClient as
the run `Tracker.log_run` writes (the writer reproduces MLflow's rows itself, so a change in
MLflow's schema or in what its store writes shows here); a run written twice is one run; concurrent
callers share transactions and each returns only once its own run is committed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from mlflow.exceptions import MlflowException

from services.platform.tracking import EVENT_TAG, Tracker
from services.platform.trial_runs import TrialRun, TrialRunWriter, trial_run_id
from tests.test_registry import MlflowServer

EXPERIMENT = "trial-runs"


@pytest.fixture(params=["sqlite", "postgresql"])
def tracking_uri(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'mlflow.db'}"
    else:
        yield request.getfixturevalue("postgresql_url")


@pytest.fixture
def tracker(tracking_uri: str) -> Tracker:
    return Tracker(tracking_uri)


def trial(event_id: str, *, trial_id: int = 0, failed: bool = False, **changes: Any) -> TrialRun:
    fields: dict[str, Any] = {
        "experiment": EXPERIMENT,
        "run_name": f"study-1/t{trial_id}/r0",
        "event_id": event_id,
        "params": {"max_depth": 4, "eta": 0.3, "family": "xgboost", "budget": 50, "rung": 0},
        "metrics": {"rmse": None if failed else 1.25, "duration_s": 0.5, "rounds": 50},
        "tags": {"cairn.kind": "trial", "cairn.study_id": "study-1", "cairn.correlation_id": "corr-1"},
        "failed": failed,
    }
    return TrialRun(**{**fields, **changes})


def reference(tracker: Tracker, run: TrialRun) -> str:
    """The same trial through today's path, three MlflowClient calls."""
    return tracker.log_run(
        experiment=run.experiment,
        run_name=run.run_name,
        event_id=run.event_id,
        params=dict(run.params),
        metrics=dict(run.metrics),
        tags=dict(run.tags),
        failed=run.failed,
    )


def count_commits(engine: sqlalchemy.engine.Engine) -> list[int]:
    commits: list[int] = []
    sqlalchemy.event.listen(engine, "commit", lambda conn: commits.append(1))
    return commits


def stored_status(uri: str, run_id: str) -> str | None:
    """The run's status as another connection (its own engine) sees it: committed data only."""
    engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            return conn.execute(
                sqlalchemy.text("SELECT status FROM runs WHERE run_uuid = :id"), {"id": run_id}
            ).scalar()
    finally:
        engine.dispose()


async def test_a_batch_reads_back_like_tracker_log_run(tracker: Tracker) -> None:
    writer = TrialRunWriter.for_tracker(tracker)
    assert writer is not None, "a SQL store is written by the batched writer"
    client = tracker.client
    try:
        runs = [trial("ev-a", trial_id=0), trial("ev-b", trial_id=1), trial("ev-c", trial_id=2, failed=True)]
        ids = await asyncio.gather(*(writer.log(r) for r in runs))
    finally:
        await writer.close()
    assert ids == [trial_run_id("ev-a"), trial_run_id("ev-b"), trial_run_id("ev-c")]
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids) and len(set(ids)) == 3

    for run, run_id in zip(runs, ids, strict=True):
        ref = client.get_run(
            reference(tracker, trial(f"ref-{run.event_id}", failed=run.failed, run_name=run.run_name))
        )
        got = client.get_run(run_id)
        assert got.info.run_id == run_id
        for attr in ("status", "run_name", "lifecycle_stage", "user_id", "experiment_id"):
            assert getattr(got.info, attr) == getattr(ref.info, attr), attr
        assert got.info.status == ("FAILED" if run.failed else "FINISHED")
        location = client.get_experiment(got.info.experiment_id).artifact_location
        assert got.info.artifact_uri == f"{location}/{run_id}/artifacts"
        assert ref.info.artifact_uri == f"{location}/{ref.info.run_id}/artifacts"
        assert got.info.start_time and got.info.end_time and got.info.start_time <= got.info.end_time
        assert got.data.params == ref.data.params
        assert got.data.metrics == ref.data.metrics
        assert ("rmse" in got.data.metrics) is not run.failed
        assert got.data.tags == {**ref.data.tags, EVENT_TAG: run.event_id}
        assert got.data.tags["mlflow.runName"] == run.run_name
        for key in got.data.metrics:
            history = [(m.key, m.value, m.step) for m in client.get_metric_history(run_id, key)]
            assert history == [
                (m.key, m.value, m.step) for m in client.get_metric_history(ref.info.run_id, key)
            ]

    # Found as the redelivery path (log_run_once) and search both find runs.
    assert tracker.find_run(EXPERIMENT, "ev-b") == ids[1]
    found = client.search_runs(
        [tracker.experiment(EXPERIMENT)], filter_string="metrics.rmse > 1 and tags.`cairn.kind` = 'trial'"
    )
    assert {ids[0], ids[1]} <= {r.info.run_id for r in found}
    assert ids[2] not in {r.info.run_id for r in found}


async def test_the_same_run_twice_is_one_run(tracker: Tracker) -> None:
    writer = TrialRunWriter.for_tracker(tracker)
    assert writer is not None
    try:
        first = await writer.log(trial("ev-dup"))
        # A redelivery in a later batch, and twice in one batch, with a later end time.
        again = await asyncio.gather(*(writer.log(trial("ev-dup", end_ms=1)) for _ in range(2)))
        assert again == [first, first]
        assert writer.write([trial("ev-dup")]) == 0
    finally:
        await writer.close()
    runs = tracker.client.search_runs(
        [tracker.experiment(EXPERIMENT)], filter_string=f"tags.`{EVENT_TAG}` = 'ev-dup'"
    )
    assert [r.info.run_id for r in runs] == [first]
    assert runs[0].info.end_time != 1, "the first write stays as it was"


async def test_concurrent_logs_share_transactions_and_return_after_commit(
    tracker: Tracker, tracking_uri: str
) -> None:
    # A long wait so that every caller below queues before the first batch is written.
    writer = TrialRunWriter.for_tracker(tracker, max_batch=8, max_wait_s=0.2)
    assert writer is not None
    tracker.experiment(EXPERIMENT)
    writer.write([trial("warm-up")])  # the experiment's location cached: only trial runs commit below
    commits = count_commits(writer.store.engine)
    seen_at_return: dict[str, str | None] = {}

    async def log_and_look(run: TrialRun) -> None:
        run_id = await writer.log(run)
        # Synchronously, before anything else runs on this loop: committed or not, now.
        seen_at_return[run_id] = stored_status(tracking_uri, run_id)

    try:
        await asyncio.gather(*(log_and_look(trial(f"ev-{i}", trial_id=i)) for i in range(20)))
    finally:
        await writer.close()
    assert len(seen_at_return) == 20
    assert set(seen_at_return.values()) == {"FINISHED"}, seen_at_return
    # 20 runs in batches of at most 8: three write transactions (one commit each).
    assert len(commits) == 3, f"{len(commits)} commits for 20 runs"


async def test_a_bad_run_fails_only_its_own_caller(tracker: Tracker) -> None:
    writer = TrialRunWriter.for_tracker(tracker, max_wait_s=0.2)
    assert writer is not None
    bad = trial("ev-bad", params={"k" * 300: 1})  # a param key longer than MLflow allows
    try:
        outcomes = await asyncio.gather(
            writer.log(trial("ev-good-1")),
            writer.log(bad),
            writer.log(trial("ev-good-2")),
            return_exceptions=True,
        )
    finally:
        await writer.close()
    assert outcomes[0] == trial_run_id("ev-good-1") and outcomes[2] == trial_run_id("ev-good-2")
    assert isinstance(outcomes[1], MlflowException), outcomes[1]
    assert tracker.client.get_run(outcomes[0]).info.status == "FINISHED"
    assert tracker.find_run(EXPERIMENT, "ev-bad") is None


def test_run_ids_follow_the_event_id() -> None:
    assert trial_run_id("e1") == trial_run_id("e1") != trial_run_id("e2")
    assert len(trial_run_id("e1")) == 32 and trial("e1").run_id == trial_run_id("e1")


@pytest.mark.slow  # an mlflow server process: ~30 s
def test_a_tracking_server_keeps_one_run_per_trial(tmp_path: Path) -> None:
    """Against a tracking server (REST) there is no writer: training keeps log_run_once."""
    server = MlflowServer(tmp_path, f"sqlite:///{tmp_path / 'server.db'}")
    server.start()
    try:
        assert TrialRunWriter.for_tracker(Tracker(server.url)) is None
    finally:
        server.stop()
