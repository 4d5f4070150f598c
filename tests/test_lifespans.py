"""A start that fails half-way closes what it had opened: services' lifespans and the runner."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import psutil
import pytest

from services.platform import compute as compute_module
from services.platform.runtime import Service, ServiceRunner
from services.platform.settings import CairnSettings
from services.training import app as training_app
from services.training.app import Training


def worker_processes() -> list[psutil.Process]:
    """Children of this process but multiprocessing's own helpers (resource tracker, forkserver)."""
    helpers = ("resource_tracker", "forkserver", "semaphore_tracker")
    found = []
    for p in psutil.Process().children(recursive=True):
        try:  # a zombie left by an earlier test (not yet reaped) is no running worker
            if p.status() != psutil.STATUS_ZOMBIE and not any(h in " ".join(p.cmdline()) for h in helpers):
                found.append(p)
        except psutil.NoSuchProcess:  # ZombieProcess too
            continue
    return found


async def test_training_closes_its_cluster_when_mlflow_is_unreachable(tmp_path, monkeypatch):
    opened: list[compute_module.Compute] = []

    async def recording_open_compute(settings: CairnSettings) -> compute_module.Compute:
        opened.append(await compute_module.open_compute(settings))
        return opened[-1]

    monkeypatch.setattr(training_app, "open_compute", recording_open_compute)
    before = {p.pid for p in worker_processes()}  # a session fixture's system may be running
    settings = CairnSettings(home=tmp_path, dask="local", dask_workers=1, mlflow_uri="nope://unreachable")
    service = Training(settings)
    with pytest.raises(Exception):  # noqa: B017 - whatever MLflow raises for the URI
        async with service.running():
            pytest.fail("the lifespan opened with an unusable tracking URI")
    assert len(opened) == 1, "the cluster opened before MLflow failed"
    assert opened[0].client.status == "closed"
    assert not [p for p in worker_processes() if p.pid not in before], "a Dask worker process is left"
    with pytest.raises(RuntimeError):
        _ = service.context


class Recorder(Service[str]):
    name = "recorder"

    def __init__(self, settings: CairnSettings, log: list[str]):
        super().__init__(settings)
        self.log = log

    def routes(self):
        return []

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[str]:
        self.log.append("open")
        try:
            yield "clients"
        finally:
            self.log.append("close")

    async def attach(self, broker) -> None:
        self.log.append(f"attach with {self.context}")
        raise ConnectionError("attach failed")

    async def detach(self) -> None:
        self.log.append("detach")


async def test_runner_start_that_fails_closes_what_it_opened(tmp_path, monkeypatch):
    async def no_wait(settings, name):
        return None

    monkeypatch.setattr("services.platform.runtime.wait_for_stream", no_wait)
    log: list[str] = []
    runner = ServiceRunner(Recorder(CairnSettings(home=tmp_path, nats_url="nats://127.0.0.1:1"), log))
    started: list[str] = []

    async def fake_broker_start() -> None:
        started.append("broker")

    async def fake_broker_stop() -> None:
        log.append("broker stop")

    monkeypatch.setattr(runner.broker, "start", fake_broker_start)
    monkeypatch.setattr(runner.broker, "stop", fake_broker_stop)
    with pytest.raises(ConnectionError):
        await runner.start()
    assert started == ["broker"]
    assert log == ["open", "attach with clients", "detach", "broker stop", "close"]
    await runner.stop()  # nothing left to close
    assert log[-1] == "close"


def test_services_run_on_uvloop() -> None:
    """`cairn run` gives each service uvloop's event loop (a dependency): with asyncio's own loop the
    loop itself was about a fifth of training's and a third of tuning's CPU per trial."""
    import uvloop

    from services.platform.event_loop import event_loop_factory

    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        assert isinstance(runner.get_loop(), uvloop.Loop)
