"""Faults between hosts: every service on a three-server JetStream cluster (each server its own
network namespace, the stream and buckets R3), a study of 40 trials in flight while a fault lands.

Each fault ends the same way or the test fails: the run deployed, every trial result recorded once
per (study, trial, rung), `cairn audit verify` OK, and every service process still alive.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from contracts import DataArrived, ModelFamily, SearchStrategy, TuningSpec, new_event
from harness.hosts import Hosts
from harness.natscluster import NatsCluster
from harness.stream import StreamLog
from harness.system import System, start_system
from harness.workloads import study_table
from services.platform.bus.connection import connect
from services.platform.cache import CACHED_FROM, NO_CACHE
from services.tools import supervisor
from services.tools.client import Client

pytestmark = pytest.mark.slow
CAIRN = str(Path(sys.executable).with_name("cairn"))
TRIALS = 40


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    """Three nats-server hosts and every service (in this machine's namespace) on the seed list."""
    home = tmp_path_factory.mktemp("scale-out")
    with Hosts(3) as hosts, NatsCluster(hosts, home / "nats") as cluster:
        system = start_system(
            home,
            nats_url=cluster.urls,
            stream_replicas=3,
            ack_wait_s=6.0,
            retry_backoff_s=[1.0, 2.0, 3.0, 5.0],
            max_deliver=20,
            dask_workers=2,
        )
        try:
            yield system, cluster
        finally:
            system.stop()


async def submit(system: System, model: str) -> str:
    spec = TuningSpec(
        trials=TRIALS, families=[ModelFamily.xgboost], strategy=SearchStrategy.random, max_budget=200
    )
    arrived = DataArrived(uri=study_table(system.home).as_uri(), target="y", model_name=model, tuning=spec)
    # Every test studies the same table: without `nocache` the second would be served from the
    # step cache and no trial would be in flight when the fault lands.
    event = new_event(arrived, source="/test/scale-out").model_copy(update={NO_CACHE: "true"})
    async with Client(system.settings, "test") as client:  # sent again between stream leaders
        await client.publish(event)
    return event.id


async def completed(log: StreamLog, run: str, at_least: int, timeout: float = 180.0) -> None:
    """Until `at_least` trials of this run's study have completed (so the fault lands mid-study)."""

    def enough(lg: StreamLog) -> bool:
        studies = {r.data["study_id"] for r in lg.run(run) if r.type == "cairn.tuning.requested.v1"}
        done = [r for r in lg.of_type("cairn.trial.completed.v1") if r.data["study_id"] in studies]
        return len(done) >= at_least

    await log.wait(enough, timeout, f"{at_least} trials of run {run}")


async def survived(
    system: System, log: StreamLog, run: str, timeout: float = 300.0, fault_at: float | None = None
) -> None:
    """The run deployed, every trial recorded once and computed (not served from the cache), the
    audit chain whole, every service alive; with `fault_at` (time.time() when the fault landed), some
    of the study's trials completed after it: the fault met a study in flight."""
    terminal = await log.wait(lambda lg: lg.terminal(run), timeout, f"a terminal event of run {run}")
    assert terminal.type == "cairn.model.deployed.v1", (terminal.type, terminal.data)
    study = next(r.data["study_id"] for r in log.run(run) if r.type == "cairn.tuning.requested.v1")
    results = [r for r in log.of_type("cairn.trial.completed.v1") if r.data["study_id"] == study]
    assert not [r for r in results if (r.doc or {}).get(CACHED_FROM)], "trials were served from the cache"
    if fault_at is not None:
        after = [r for r in results if r.ts.timestamp() > fault_at]
        assert after, "the study had finished before the fault: nothing was in flight"
    counts = {k: v for k, v in log.trial_counts().items() if k[0] == study}
    assert len({trial for _, trial, _ in counts}) == TRIALS, counts
    assert set(counts.values()) == {1}, f"trial results recorded more than once: {counts}"
    dead = [name for name, pid in system.runtime["pids"].items() if not supervisor.alive(pid)]
    assert not dead, f"service processes gone: {dead}"
    verify = await asyncio.to_thread(
        subprocess.run,
        [CAIRN, "audit", "verify"],
        env=system.env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert verify.returncode == 0 and verify.stdout.startswith("OK"), verify.stdout + verify.stderr


async def leader(system: System) -> str:
    nc = await connect(system.settings, "test")
    try:
        async with asyncio.timeout(60):
            while True:
                try:
                    info = await nc.jetstream().stream_info(system.settings.stream)
                    if info.cluster and info.cluster.leader:
                        return info.cluster.leader
                except Exception:  # noqa: BLE001 - between leaders
                    pass
                await asyncio.sleep(0.2)
    finally:
        await nc.close()


def connections(server) -> list[str]:
    """The names of the clients connected to this server (its monitoring endpoint's /connz)."""
    doc = httpx.get(f"{server.monitor}/connz", timeout=5).json()
    return [c.get("name", "") for c in doc.get("connections") or []]


async def test_the_stream_leader_killed_mid_study_and_restarted_10_s_later(clustered) -> None:
    system, cluster = clustered
    log = StreamLog(system.settings)
    await log.poll()
    run = await submit(system, "leader-killed")
    await completed(log, run, 5)
    victim = cluster.server(await leader(system))
    fault_at = time.time()
    cluster.kill(victim)
    killed = time.monotonic()
    await asyncio.sleep(10)  # the fault's length, not a wait for something to happen
    cluster.start_server(victim)
    await survived(system, log, run, fault_at=fault_at)
    assert await leader(system) is not None
    assert time.monotonic() - killed >= 10


async def test_a_minority_partition_for_30_s_mid_study(clustered) -> None:
    """The server with the most service connections cut off from its peers and from every client:
    its clients carry on through the other two (their pings go unanswered, they reconnect there)."""
    system, cluster = clustered
    log = StreamLog(system.settings)
    await log.poll()
    run = await submit(system, "minority-partition")
    await completed(log, run, 5)
    clients = {s.name: connections(s) for s in cluster.servers}
    victim = cluster.server(max(clients, key=lambda name: len(clients[name])))  # the busiest server
    assert clients[victim.name], f"no service connected to any server? {clients}"
    fault_at = time.time()
    cluster.hosts.partition(victim.host)
    try:
        await asyncio.sleep(30)  # the partition's length
    finally:
        cluster.hosts.heal(victim.host)
    await survived(system, log, run, fault_at=fault_at)


async def test_a_rolling_restart_in_lame_duck_mode(clustered) -> None:
    """As a StatefulSet update does: each server in turn enters lame-duck mode, exits, starts again."""
    system, cluster = clustered
    log = StreamLog(system.settings)
    await log.poll()
    run = await submit(system, "rolling-restart")
    await completed(log, run, 3)
    fault_at = time.time()
    for server in cluster.servers:
        code = await asyncio.to_thread(cluster.lame_duck, server, 90)
        assert code is not None
        await asyncio.to_thread(cluster.start_server, server)
    await survived(system, log, run, fault_at=fault_at)
