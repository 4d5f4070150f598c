"""Dask across hosts: the chart's scheduler and workers on namespace hosts of their own (mutual TLS),
training on the machine reaching the scheduler by its address, a study of 40 trials in flight while
a fault lands.

The first test renders the chart with the real Helm engine and checks that harness/daskcluster.py
runs what it renders. The fault tests run every service as its own process on a nats-server on a
host of its own; each ends only when the run is deployed, every trial result is recorded exactly
once per (study, trial, rung), `cairn audit verify` says OK and every service process is alive.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from harness.daskcluster import (
    CHART_LOCAL_DIR,
    CHART_TLS_DIR,
    CHART_WORKER_NAME,
    WORKER_ENTRYPOINT,
    DaskHosts,
    scheduler_argv,
    scheduler_env,
    worker_argv,
    worker_env,
)
from harness.hosts import Hosts
from harness.natscluster import NatsCluster
from harness.stream import StreamLog
from harness.system import start_system
from services.tools import supervisor
from tests.test_scale_out import TRIALS, completed, submit, survived

ROOT = Path(__file__).resolve().parents[1]


# What the chart renders is what the harness runs ---------------------------------------------------
@pytest.mark.k8s
def test_the_harness_runs_the_charts_scheduler_and_worker_commands() -> None:
    from tests.test_helm_chart import NAMESPACE, RELEASE, env_of, objects, one, render

    objs = objects(render({"dask": {"operator": {"crdsInstalled": True}}}))  # TLS is on by default
    cluster = one(objs, "DaskCluster", f"{RELEASE}-dask")
    (scheduler,) = cluster["spec"]["scheduler"]["spec"]["containers"]
    (worker,) = cluster["spec"]["worker"]["spec"]["containers"]

    # The scheduler: command and args word for word, and its one setting from the environment.
    assert scheduler["command"] + scheduler["args"] == scheduler_argv(CHART_TLS_DIR)
    env = env_of(scheduler)
    assert {k: env[k] for k in scheduler_env()} == scheduler_env()
    assert "--tls-cert" in scheduler["args"]  # mutual TLS, as the chart runs it

    # The worker: the image's ENTRYPOINT, then the pod's args word for word.
    assert "command" not in worker
    dockerfile = (ROOT / "docker" / "Dockerfile.worker").read_text()
    (entrypoint,) = re.findall(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.MULTILINE)
    assert eval(entrypoint) == WORKER_ENTRYPOINT  # noqa: S307 - a JSON list from our own Dockerfile
    assert worker["args"] == worker_argv(CHART_WORKER_NAME, CHART_LOCAL_DIR, CHART_TLS_DIR)
    # Its scheduler: the Service's address, which the harness replaces with its own.
    service = f"tls://{RELEASE}-dask-scheduler.{NAMESPACE}.svc:8786"
    assert {k: env_of(worker)[k] for k in worker_env(service)} == worker_env(service)

    # The harness changes only the paths and names a pod gets from outside its spec.
    ran = worker_argv("worker-0", "/tmp/x/worker-0-0", "/tmp/x/dask-tls")
    changed = [(a, b) for a, b in zip(worker["args"], ran, strict=True) if a != b]
    assert changed == [
        (CHART_WORKER_NAME, "worker-0"),
        (CHART_LOCAL_DIR, "/tmp/x/worker-0-0"),
        *[(f"{CHART_TLS_DIR}/{f}", f"/tmp/x/dask-tls/{f}") for f in ("ca.crt", "tls.crt", "tls.key")],
    ]


# Faults ---------------------------------------------------------------------------------------------
NATS, SCHEDULER, WORKER_A, WORKER_B, SPARE, REPLICA = range(6)  # the hosts, by role


@pytest.fixture(scope="module")
def dask_hosts(tmp_path_factory):
    """nats-server on a host, the scheduler and two workers on three others, every service here."""
    home = tmp_path_factory.mktemp("dask-hosts")
    with (
        Hosts(6) as hosts,
        NatsCluster(hosts, home / "nats", members=[hosts[NATS]]) as nats,
        DaskHosts(hosts, home / "dask", hosts[SCHEDULER], [hosts[WORKER_A], hosts[WORKER_B]]) as dask,
    ):
        dask.wait_workers()
        system = start_system(
            home,
            nats_url=nats.urls,
            extra_env=dask.client_env(),
            ack_wait_s=6.0,
            retry_backoff_s=[1.0, 2.0, 3.0, 5.0],
            max_deliver=20,
            # Four trials per replica (16 by default for a remote scheduler): a second replica
            # started later still gets trials of its own rather than whatever the first leaves.
            trial_concurrency=4,
        )
        try:
            yield system, hosts, dask
        finally:
            system.stop()


@pytest.mark.slow
async def test_a_worker_host_partitioned_for_30_s_mid_trial(dask_hosts) -> None:
    system, hosts, dask = dask_hosts
    log = StreamLog(system.settings)
    await log.poll()
    run = await submit(system, "dask-worker-partition")
    await completed(log, run, 5)
    victim = hosts[WORKER_A]
    busy = await asyncio.to_thread(dask.processing_on, victim)
    assert busy, "the worker about to be cut off runs no trial"
    dask.partition(victim)
    try:
        await asyncio.sleep(30)  # the partition's length
    finally:
        dask.heal(victim)
    await survived(system, log, run)


@pytest.mark.slow
async def test_the_scheduler_host_killed_and_a_new_scheduler_started_on_another(dask_hosts) -> None:
    """A Service gives the scheduler one address whichever pod serves it: the scheduler's host dies
    (cut off, then every process on it killed), a new scheduler starts on another host which takes
    over the Service address, as a rescheduled pod behind the same Service. Training keeps its
    CAIRN_DASK; the workers exit and are restarted by the kubelet against the same address."""
    system, hosts, dask = dask_hosts
    log = StreamLog(system.settings)
    await log.poll()
    run = await submit(system, "dask-scheduler-moved")
    await completed(log, run, 5)
    before = [w.starts for w in dask.workers]
    running = await asyncio.to_thread(dask.processing_on, hosts[WORKER_A])
    running += await asyncio.to_thread(dask.processing_on, hosts[WORKER_B])
    assert running, "no trial in flight on the scheduler about to die"
    await asyncio.to_thread(dask.move_scheduler, hosts[SPARE])
    await survived(system, log, run)
    assert dask.scheduler_host is hosts[SPARE]
    assert [w.starts for w in dask.workers] > before  # the workers were restarted against it
    dead = [n for n, pid in system.runtime["pids"].items() if not supervisor.alive(pid)]
    assert not dead


def trial_statuses(log: StreamLog, run: str) -> dict[str, int]:
    study = next(r.data["study_id"] for r in log.run(run) if r.type == "cairn.tuning.requested.v1")
    out: dict[str, int] = {}
    for r in log.of_type("cairn.trial.completed.v1"):
        if r.data["study_id"] == study:
            out[r.data["status"]] = out.get(r.data["status"], 0) + 1
    return out


@pytest.mark.slow
async def test_the_scheduler_gone_for_75_s_before_its_replacement_starts(dask_hosts) -> None:
    """A replacement pod is not always up at once (scheduling, image pull): with no scheduler for
    75 s, Dask's client notices (up to 30 s: TCP keepalive), retries for its connect timeout (30 s)
    and closes for good. Training must connect again once the scheduler is back and record no
    trial as a model failure meanwhile. Before services/platform/compute.py's `Compute.live_client`, trials
    submitted while the client was closing were dropped silently and the study never finished."""
    system, hosts, dask = dask_hosts
    log = StreamLog(system.settings)
    await log.poll()
    run = await submit(system, "dask-scheduler-gone-75-s")
    await completed(log, run, 5)
    back_to = hosts[SCHEDULER] if dask.scheduler_host is not hosts[SCHEDULER] else hosts[SPARE]
    hosts.heal(back_to)  # a host that died earlier in this module is a fresh node now
    await asyncio.to_thread(dask.move_scheduler, back_to, 75.0)
    await survived(system, log, run)
    assert trial_statuses(log, run) == {"ok": TRIALS}, trial_statuses(log, run)
    training_log = (system.settings.home_dir / "logs" / "training.log").read_text()
    assert "Failed to reconnect to scheduler" in training_log  # the client did give up
