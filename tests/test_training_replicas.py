"""Two training replicas sharing the work, one of them on a host of its own cut off mid-study.

Every service runs as its own process on this machine, on a nats-server on a host of its own; a
second training process, started as an operator starts a replica (`cairn run training`, the same
settings), runs on another host with its own local Dask. Both pull trial requests from the one
durable consumer, four at a time each, so each holds some of a study's trials at any moment. The
replica is cut off for 30 s while it holds some (read on its host, through its loopback, after the
cut). It cannot ack them: its attempts to publish their results time out there (10 s) and the
server hands the trials to the first replica once their ack wait (6 s here) has passed, so every
result of the study is stored while the replica is still cut off (the cut lasts until then if 30 s
was not enough: a loaded machine). Healed, the replica reconnects and is ready again with nothing
in flight.

The test then ends as the other fault tests do (tests/test_scale_out.py): the run deployed, every
trial result recorded once per (study, trial, rung), `cairn audit verify` OK, every service process
(the replica included) alive; and one MLflow trial run per result (the cut-off replica may have
written the runs of the trials it held, MLflow's SQLite store being on this machine's disk: run ids
follow the trial event's id, so the other replica's write of the same trial is the same run).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.hosts import Host, Hosts
from harness.natscluster import NatsCluster
from harness.stream import Record, StreamLog
from harness.system import System, start_system
from tests.test_scale_out import CAIRN, TRIALS, completed, submit, survived

pytestmark = pytest.mark.slow

NATS, REPLICA = range(2)  # the hosts, by role
REPLICA_HTTP_PORT = 8080  # the replica's health and metrics, on its own host's address
PARTITION_S = 30.0
IN_FLIGHT = "cairn_handlers_in_flight"  # messages a service holds (received, not yet acked)
# Read on the replica's own host, through its loopback: the only way in while it is cut off.
FETCH = "import sys, urllib.request\nprint(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())\n"


def in_flight(metrics: str) -> float:
    """The service's handlers in flight, from its /metrics text."""
    for family in text_string_to_metric_families(metrics):
        if family.name == IN_FLIGHT:
            return sum(sample.value for sample in family.samples)
    raise AssertionError(f"no {IN_FLIGHT} in the metrics")


def start_replica(system: System, hosts: Hosts, host: Host) -> subprocess.Popen:
    """A second training process on `host`: the same environment every service of `system` got."""
    log_path = system.settings.home_dir / "logs" / "training-replica.log"
    env = {**system.env, "CAIRN_HTTP_PORT": str(REPLICA_HTTP_PORT), "CAIRN_HEALTH_HOST": "0.0.0.0"}
    with log_path.open("ab") as out:
        return hosts.run(host, [CAIRN, "run", "training"], env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_replica(host: Host, replica: subprocess.Popen, until, what: str, timeout: float = 180.0) -> str:
    """Poll the replica's /readyz and /metrics from this machine until `until(ready, metrics)`; the
    metrics text then. Fails at once if the replica exited."""
    base = host.url("http", REPLICA_HTTP_PORT)
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=5) as client:
        while True:
            assert replica.poll() is None, f"the replica exited ({replica.returncode})"
            try:
                ready = client.get(f"{base}/readyz").status_code == 200
                metrics = client.get(f"{base}/metrics").text
                if until(ready, metrics):
                    return metrics
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for the replica: {what}"
            time.sleep(0.05)


@pytest.fixture
def replicas(tmp_path):
    """nats-server on a host; every service here; a second training replica on a host of its own."""
    with Hosts(2) as hosts, NatsCluster(hosts, tmp_path / "nats", members=[hosts[NATS]]) as nats:
        system = start_system(
            tmp_path,
            nats_url=nats.urls,
            ack_wait_s=6.0,
            retry_backoff_s=[1.0, 2.0, 3.0, 5.0],
            max_deliver=20,
            # One local Dask worker per replica (two cores for everything), four trials held each:
            # a replica holds trials of its own whenever the study has some waiting.
            dask_workers=1,
            trial_concurrency=4,
        )
        replica = None
        try:
            replica = start_replica(system, hosts, hosts[REPLICA])
            wait_replica(hosts[REPLICA], replica, lambda ready, _: ready, "ready")
            yield system, hosts, replica
        finally:
            if replica is not None:
                Hosts.stop(replica)  # SIGTERM to its group (its Dask workers too); Hosts.close kills the rest
            system.stop()


async def test_one_of_two_training_replicas_partitioned_for_30_s_mid_study(replicas) -> None:
    system, hosts, replica = replicas
    host = hosts[REPLICA]
    log = StreamLog(system.settings)
    await log.poll()
    run = await submit(system, "training-replica-partition")
    await completed(log, run, 5)
    study = next(r.data["study_id"] for r in log.run(run) if r.type == "cairn.tuning.requested.v1")
    await asyncio.to_thread(
        wait_replica, host, replica, lambda _, m: in_flight(m) >= 1, "trials of its own in flight", 120
    )
    hosts.partition(host)
    fault_at = time.time()
    try:
        # Read inside the cut-off host: what it holds now it cannot ack until healed.
        inside = await asyncio.to_thread(
            hosts.check, host, [sys.executable, "-c", FETCH, f"http://127.0.0.1:{REPLICA_HTTP_PORT}/metrics"]
        )
        assert inside.returncode == 0, inside.stderr
        held = in_flight(inside.stdout)
        assert held >= 1, "the replica held no trial when it was cut off"
        await asyncio.sleep(PARTITION_S)  # the partition's length, at least
        # The other replica took the held trials: every result is stored while this one is still
        # cut off (about 7 s after the cut on a quiet machine; longer only on a loaded one).
        await log.wait(
            lambda lg: len(trial_results(lg, study)) >= TRIALS, 120, "every result, the replica cut off"
        )
    finally:
        hosts.heal(host)
    stored_by = max(r.ts.timestamp() for r in trial_results(log, study).values()) - fault_at

    # Healed: the replica reconnects (ready) with nothing in flight, so anything it sends late (what
    # it queued while disconnected) is in the log before the log is counted.
    await asyncio.to_thread(
        wait_replica, host, replica, lambda ready, m: ready and in_flight(m) == 0, "reconnected, settled", 120
    )
    await survived(system, log, run, fault_at=fault_at)
    assert replica.poll() is None, "the replica exited"

    # MLflow: one trial run per trial result, whichever replica wrote it, once or twice.
    results = [r for r in log.of_type("cairn.trial.completed.v1") if r.data["study_id"] == study]
    runs = await asyncio.to_thread(trial_runs, system, "training-replica-partition", study)
    assert Counter(runs) == Counter(f"{study}/t{r.data['trial_id']}/r{r.data['rung']}" for r in results), runs
    print(f"cut off holding {held:g} trials; every result stored {stored_by:.1f} s after the cut")


def trial_results(log: StreamLog, study: str) -> dict[int, Record]:
    """The study's first stored result of each trial."""
    out: dict[int, Record] = {}
    for r in log.of_type("cairn.trial.completed.v1"):
        if r.data["study_id"] == study:
            out.setdefault(r.data["trial_id"], r)
    return out


def trial_runs(system: System, experiment: str, study: str) -> list[str]:
    """The run names of the study's trial runs in MLflow."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(system.settings.tracking_uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment}"
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`cairn.study_id` = '{study}' and tags.`cairn.kind` = 'trial'",
        max_results=10_000,
    )
    return [run.info.run_name for run in runs]
