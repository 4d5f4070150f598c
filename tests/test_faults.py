"""Faults against real processes: kill -9 of the training service mid-trial, a lost Dask worker,
a nats-server restart mid-pipeline, and the MLflow tracking server down for a while.

One system for the module: nats-server on a fixed port (so a restarted server is found again),
every service as its own process (as `cairn up` runs them), and a real `mlflow server` process as
the tracking store, which the MLflow test stops and starts again. Services are told not to retry
MLflow themselves (MLFLOW_HTTP_REQUEST_MAX_RETRIES=0): the bus policy owns retries (nak with
backoff), so an outage is visible as redeliveries and cannot hide in a client's retry loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import psutil
import pytest
from mlflow import MlflowClient

from contracts import DataArrived, ModelFamily, SearchStrategy, TuningSpec, new_event
from harness.stream import StreamLog
from harness.system import System, start_system
from services.platform.bus.connection import connect
from services.tools.supervisor import free_port

pytestmark = pytest.mark.slow
MLFLOW = Path(sys.executable).parent / "mlflow"


class MlflowServer:
    """`mlflow server` on SQLite, started and stopped as a process group (uvicorn + job runner)."""

    def __init__(self, home: Path, backend: str):
        self.home = home
        self.backend = backend
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> None:
        with open(self.home / "mlflow-server.log", "ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(MLFLOW),
                    "server",
                    "--backend-store-uri",
                    self.backend,
                    "--default-artifact-root",
                    str(self.home / "mlflow-artifacts"),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--workers",
                    "1",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.home / "mlflow-server.log").read_text()[-2000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.2)
        raise AssertionError("mlflow server did not come up")

    def stop(self, kill: bool = False) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    """Training logs to MLflow through a real tracking server (on the SQLite file the other services
    use directly), so the test can take the tracking store away from training and give it back.

    Why not every service through the server: the MLflow server refuses to register a model
    version whose source is a local path outside the run's artifact directory, which is what
    deployment registers with a file:// artifact store (docs/RELIABILITY.md, known limits).
    """
    home = tmp_path_factory.mktemp("faults")
    state = home / "state"  # cairn's home in start_system: deployment registers on this same file
    state.mkdir()
    mlflow = MlflowServer(home, f"sqlite:///{state / 'mlflow.db'}")
    mlflow.start()
    try:
        system = start_system(
            home,
            nats_port=free_port(),
            ack_wait_s=4.0,
            retry_backoff_s=[1.0, 2.0, 3.0, 5.0],
            max_deliver=10,
            dask_workers=2,
            service_env={
                "training": {
                    "CAIRN_MLFLOW_URI": mlflow.url,
                    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
                }
            },
        )
    except BaseException:
        mlflow.stop()
        raise
    yield system, mlflow
    system.stop()
    mlflow.stop()


def forest_csv(home: Path, rows: int = 20_000) -> Path:
    """Big enough that a random-forest trial at budget 1500 (500 trees) runs for seconds."""
    path = home / "forest.csv"
    if not path.exists():
        rng = np.random.default_rng(0)
        x = rng.normal(size=(rows, 8))
        y = np.sin(x[:, 0]) * 3 + x[:, 1] * x[:, 2] + rng.normal(scale=0.3, size=rows)
        frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(8)])
        frame["y"] = y
        frame.to_csv(path, index=False)
    return path


def small_csv(home: Path, name: str = "small.csv") -> Path:
    path = home / name
    rng = np.random.default_rng(1)
    x = rng.normal(size=(80, 2))
    lines = ["a,b,y"] + [
        f"{a:.4f},{b:.4f},{2 * a - b + 0.1 * c:.4f}" for (a, b), c in zip(x, rng.normal(size=80), strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


async def arrive(system: System, arrived: DataArrived) -> str:
    event = new_event(arrived, source="/test/faults")
    nc = await connect(system.settings, "test")
    try:
        await nc.jetstream().publish(
            "cairn.data.arrived.v1", event.encode(), headers={"Nats-Msg-Id": event.id}
        )
    finally:
        await nc.close()
    return event.id


def heavy(system: System, model: str, trials: int = 2) -> DataArrived:
    """Random-forest trials of seconds each, so a fault can land while one runs."""
    spec = TuningSpec(
        trials=trials, families=[ModelFamily.random_forest], strategy=SearchStrategy.random, max_budget=1500
    )
    return DataArrived(uri=forest_csv(system.home).as_uri(), target="y", model_name=model, tuning=spec)


async def consumer(system: System, durable: str):
    nc = await connect(system.settings, "test")
    try:
        return await nc.jetstream().consumer_info(system.settings.stream, durable)
    finally:
        await nc.close()


async def deployed(system: System, log: StreamLog, run: str, timeout: float = 240.0):
    try:
        terminal = await log.wait(lambda lg: lg.terminal(run), timeout, f"a terminal event of run {run}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; {system.post_mortem()}") from None
    assert terminal.type == "cairn.model.deployed.v1", (terminal.type, terminal.data)
    return terminal


def study_of(log: StreamLog, run: str) -> str:
    return next(r.data["study_id"] for r in log.run(run) if r.type == "cairn.tuning.requested.v1")


def exactly_once_per_trial(log: StreamLog, study: str, trials: int) -> None:
    counts = {k: v for k, v in log.trial_counts().items() if k[0] == study}
    assert len(counts) == trials, counts
    assert set(counts.values()) == {1}, f"trial-completed per (study, trial, rung): {counts}"


def worker_processes(system: System) -> list[psutil.Process]:
    """The Dask worker processes: children of the training service process."""
    training = psutil.Process(system.runtime["pids"]["training"])
    return [p for p in training.children(recursive=True) if "resource_tracker" not in " ".join(p.cmdline())]


async def busy_worker(system: System, timeout: float = 60.0) -> psutil.Process:
    """Wait until one worker is computing (its CPU time grows); return it."""
    start = {p.pid: sum(p.cpu_times()[:2]) for p in worker_processes(system)}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        for p in worker_processes(system):
            with contextlib.suppress(psutil.NoSuchProcess):
                if sum(p.cpu_times()[:2]) - start.get(p.pid, sum(p.cpu_times()[:2])) > 0.5:
                    return p
    raise AssertionError("no Dask worker started computing")


async def test_dask_worker_lost_mid_trial_is_recovered(faulty):
    system, _ = faulty
    log = StreamLog(system.settings)
    await log.poll()
    run = await arrive(system, heavy(system, "worker-lost"))
    await log.wait(lambda lg: [r for r in lg.run(run) if r.type == "cairn.trial.requested.v1"], 120, "trials")
    victim = await busy_worker(system)
    before = {p.pid for p in worker_processes(system)}
    victim.send_signal(signal.SIGKILL)

    await deployed(system, log, run)
    study = study_of(log, run)
    exactly_once_per_trial(log, study, 2)
    after = {p.pid for p in worker_processes(system)}
    assert victim.pid not in after and len(after) >= len(before), (before, after)  # the nanny replaced it
    outcomes = [
        r.data["status"] for r in log.of_type("cairn.trial.completed.v1") if r.data["study_id"] == study
    ]
    assert outcomes == ["ok", "ok"], outcomes  # rescheduled by Dask (or redelivered): never a failed trial


async def test_training_killed_mid_trial_is_redelivered_and_each_trial_completes_once(faulty):
    system, mlflow = faulty
    log = StreamLog(system.settings)
    await log.poll()
    run = await arrive(system, heavy(system, "training-killed"))
    await log.wait(lambda lg: [r for r in lg.run(run) if r.type == "cairn.trial.requested.v1"], 120, "trials")
    await busy_worker(system)
    held = await consumer(system, "training-trial-requested-v1")
    assert held.num_ack_pending >= 1
    system.kill("training")  # kill -9 the service and its Dask workers mid-trial: no ack, no nak
    system.respawn("training")
    assert not system.not_ready(120)

    await deployed(system, log, run)
    study = study_of(log, run)
    exactly_once_per_trial(log, study, 2)
    info = await consumer(system, "training-trial-requested-v1")
    requested = len(log.of_type("cairn.trial.requested.v1"))
    assert info.delivered.consumer_seq > requested, "the trial held by the killed process was delivered again"
    runs = MlflowClient(mlflow.url).search_runs(
        [MlflowClient(mlflow.url).get_experiment_by_name("training-killed").experiment_id],
        filter_string=f"tags.`cairn.study_id` = '{study}' and tags.`cairn.kind` = 'trial'",
    )
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}, [r.info for r in runs]


async def test_nats_server_restart_mid_pipeline_is_survived_by_every_service(faulty):
    system, _ = faulty
    log = StreamLog(system.settings)
    await log.poll()
    run = await arrive(system, heavy(system, "nats-restart"))
    await log.wait(lambda lg: [r for r in lg.run(run) if r.type == "cairn.trial.requested.v1"], 120, "trials")
    await busy_worker(system)  # trials are computing: their results will be published across the restart
    port = system.server.port
    last_before = log.next_seq - 1
    system.server.stop(kill=True)  # SIGKILL: what survives is what was fsynced

    async def training_noticed() -> bool:
        async with httpx.AsyncClient(timeout=2) as client:
            return (await client.get(system.health_url("training") + "/readyz")).status_code == 503

    deadline = time.monotonic() + 20
    while not await training_noticed():  # down long enough for the services to see it
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    system.server.start()
    assert system.server.port == port

    await deployed(system, log, run)
    exactly_once_per_trial(log, study_of(log, run), 2)
    nc = await connect(system.settings, "test")
    try:
        state = (await nc.jetstream().stream_info(system.settings.stream)).state
    finally:
        await nc.close()
    assert state.first_seq == 1 and state.messages == state.last_seq >= last_before, "nothing lost"

    async def all_ready() -> bool:
        async with httpx.AsyncClient(timeout=2) as client:
            urls = [u + "/readyz" for u in system.runtime["health"].values()] + [
                system.runtime["serve_url"] + "/readyz"
            ]
            codes = [(await client.get(u)).status_code for u in urls]
        return all(c == 200 for c in codes)

    deadline = time.monotonic() + 60
    while not await all_ready():
        assert time.monotonic() < deadline, "a service did not come back after the restart"
        await asyncio.sleep(0.25)
    for name, pid in system.runtime["pids"].items():
        assert psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE, name

    # Every consumer resumed: a whole new pipeline runs after the restart, and the endpoint
    # (whose deployment watch is re-created after the restart) serves its model.
    second = await arrive(
        system,
        DataArrived(
            uri=small_csv(system.home).as_uri(),
            target="y",
            model_name="after",
            tuning=TuningSpec(trials=2, families=[ModelFamily.linear], strategy=SearchStrategy.random),
        ),
    )
    done = await deployed(system, log, second, 120)
    async with httpx.AsyncClient(timeout=5) as client:
        deadline = time.monotonic() + 30
        while (await client.get(system.runtime["serve_url"] + "/v1/models")).json().get("after", {}).get(
            "version"
        ) != done.data["version"]:
            assert time.monotonic() < deadline, (
                "the endpoint never swapped to the model deployed after the restart"
            )
            await asyncio.sleep(0.2)


def _metric(url: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_mlflow_outage_is_retried_without_losing_a_result(faulty):
    system, mlflow = faulty
    training = system.health_url("training")
    retried_before = _metric(
        training, "cairn_events_handled_total", type="cairn.trial.requested.v1", outcome="retried"
    )
    log = StreamLog(system.settings)
    await log.poll()
    mlflow.stop(kill=True)  # the tracking server dies before the trials run
    run = await arrive(
        system,
        DataArrived(
            uri=small_csv(system.home, "outage.csv").as_uri(),
            target="y",
            model_name="outage",
            tuning=TuningSpec(trials=3, families=[ModelFamily.linear], strategy=SearchStrategy.random),
        ),
    )
    deadline = time.monotonic() + 90
    while (
        _metric(training, "cairn_events_handled_total", type="cairn.trial.requested.v1", outcome="retried")
        < retried_before + 1
    ):
        assert time.monotonic() < deadline, "training never retried while MLflow was down"
        await asyncio.sleep(0.25)
    await log.poll()
    assert not [r for r in log.run(run) if r.type == "cairn.trial.completed.v1"], "no result without MLflow"
    mlflow.start()  # back, same store, same port

    await deployed(system, log, run, 180)
    study = study_of(log, run)
    exactly_once_per_trial(log, study, 3)
    assert not [r for r in log.records if r.subject == "cairn.dlq.training"], "nothing dead-lettered"
    client = MlflowClient(mlflow.url)
    runs = client.search_runs(
        [client.get_experiment_by_name("outage").experiment_id],
        filter_string=f"tags.`cairn.study_id` = '{study}' and tags.`cairn.kind` = 'trial'",
    )
    assert len(runs) == 3, "one MLflow run per trial, none lost, none doubled"
    assert all(r.info.status == "FINISHED" and "rmse" in r.data.metrics for r in runs)
