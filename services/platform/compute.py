"""The Dask cluster training runs on: the same code path for local, remote and Kubernetes.

- `local`: a LocalCluster of single-threaded worker processes, one per core (trees are fitted
  single-threaded, so parallelism comes from running trials side by side). Scheduler, nannies and
  workers listen on 127.0.0.1 only, over TLS with a throwaway certificate (CAIRN_DASK_LOCAL_TLS):
  Dask runs whatever pickled task it is sent, so no other user of the host may reach it.
- `tcp://host:8786` or `tls://host:8786`: an existing scheduler; tls:// with the mutual-TLS
  identity of CAIRN_DASK_TLS_CA/_CERT/_KEY (services.platform.dask_tls).
- `kubernetes`: the dask-kubernetes operator's KubeCluster, attached by name or created, with a
  GPU worker group whose workers advertise the `GPU` resource. With CAIRN_DASK_TLS_* set, the
  client goes straight to the chart's DaskCluster scheduler Service over tls:// instead:
  dask-kubernetes itself only speaks plain tcp:// to a scheduler.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import dask
from distributed import Client, LocalCluster

from services.platform.dask_tls import check_address, client_security, kube_scheduler_address, local_security
from services.platform.settings import CairnSettings

# The local cluster's scheduler and nannies live in the training process, and their timers cost
# CPU whether trials run or not: idle, that process spent 30 ms of CPU per second (about half of
# training's CPU per trial in bench/shell_80.py's 30 s trial phase). The event-loop health tick
# (every 20 ms in each of them) was most of it, then the resource polls (psutil every 500 ms, each
# worker's memory every 100 ms); with these values 14 ms per second. A blocked loop is still
# reported past the tick limit (3 s), and a worker past its memory limit still stopped within
# half a second.
# Each worker process also spent 35 ms per second (70 of the machine's 2,000, trials or not) on
# its statistical profiler: a callback every 10 ms that samples the worker thread's stack for the
# dashboard's profile page. The local cluster has no dashboard, so nothing ever reads it: off,
# a worker idles at 6 ms per second.
LOCAL_CLUSTER_CONFIG = {
    "distributed.admin.tick.interval": "200ms",
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.worker.memory.monitor-interval": "500ms",
    "distributed.worker.profile.enabled": False,
}
# How often LocalCluster copies its own description into the scheduler (for its repr in a
# notebook); once a second by default, over TLS.
LOCAL_CLUSTER_SYNC_S = 10
# How often a local worker reports to the scheduler. Dask asks for every 0.5 s on a cluster of up to
# ten workers; each report is a TLS message both ways and a metrics update in the training process.
# On a local cluster nothing needs them that often: they feed the dashboard (there is none), the
# worker TTL (5 minutes) and memory figures, while task results and their timings travel in their
# own messages. Measured idle, every 2 s instead of 0.5 s (three interleaved pairs on a slow day):
# the training process about 18.5 -> 16 ms of CPU per second, the two workers 15.3 -> 11.3.
LOCAL_HEARTBEAT_S = 2.0


@dataclass
class Compute:
    client: Client
    close: Callable[[], Awaitable[None]]
    description: str
    # A remote scheduler: how to connect again. Dask's client retries a lost scheduler for its
    # connect timeout (30 s) and then closes for good; a scheduler pod rescheduled after its node
    # died takes longer than that, and every trial would then fail on the closed client.
    reopen: Callable[[], Awaitable[Client]] | None = None
    _reopening: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def live_client(self) -> Client:
        """The client, connected again first if Dask closed it after losing the scheduler (an
        OSError or TimeoutError while the scheduler is still away: retried by the bus policy)."""
        if self.reopen is None or self.client.status in LIVE:
            return self.client
        async with self._reopening:
            if self.client.status not in LIVE:
                self.client = await self.reopen()
        return self.client


# A client that gave up is "closing", then "closed": a task submitted while it is closing is
# dropped without an error (its future never completes), so only these count as live.
LIVE = ("running", "connecting", "newly-created")


def known_workers(compute: Compute) -> int:
    """Workers the scheduler had when the client last asked (distributed refreshes this every
    `scheduler-info-interval`, 2 s): read at scrape time, it costs no call; 0 once the client gave up."""
    client = compute.client
    if client.status not in LIVE:
        return 0
    return int(client.scheduler_info().get("n_workers", 0))


def local_workers(settings: CairnSettings) -> int:
    return settings.dask_workers or os.cpu_count() or 1


def trial_concurrency(settings: CairnSettings) -> int:
    """Trials in flight per replica: twice the worker slots, so results are logged while others run."""
    if settings.trial_concurrency:
        return settings.trial_concurrency
    if settings.dask == "local":
        return 2 * local_workers(settings)
    return 16


async def open_compute(settings: CairnSettings) -> Compute:
    if settings.dask == "local":
        security = local_security() if settings.dask_local_tls else None
        with dask.config.set(LOCAL_CLUSTER_CONFIG):  # read when the scheduler and nannies start
            cluster = await LocalCluster(
                n_workers=local_workers(settings),
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",  # scheduler, nannies, workers and their HTTP endpoints
                security=security,
                dashboard_address=None,
                worker_dashboard_address=None,
                asynchronous=True,
                silence_logs=40,
                scheduler_sync_interval=LOCAL_CLUSTER_SYNC_S,
            )
        try:
            pace_heartbeats(cluster.scheduler, LOCAL_HEARTBEAT_S)
            await cluster.scheduler.listen("inproc://")
            inproc = cluster.scheduler.listeners[-1].contact_address
            client = await Client(inproc, security=cluster.security, asynchronous=True)
        except BaseException:  # the cluster is already up: never leave its workers behind
            await cluster.close()
            raise

        async def close_local() -> None:
            await client.close()
            await cluster.close()

        tls = ", TLS" if security else ""
        return Compute(client, close_local, f"LocalCluster({local_workers(settings)} workers{tls})")
    security = client_security(settings)
    if settings.dask == "kubernetes":
        if security is not None:  # the chart's DaskCluster and its GPU group: nothing to create
            address = kube_scheduler_address(settings)
        else:
            address = (await asyncio.to_thread(kube_cluster, settings)).scheduler_address
    else:
        address = check_address(settings.dask, security)

    async def connect() -> Client:
        return await Client(address, security=security, asynchronous=True)

    async def close_remote() -> None:
        await compute.client.close()

    described = (
        f"KubeCluster({settings.dask_k8s_cluster}) at {address}"
        if settings.dask == "kubernetes"
        else f"scheduler {settings.dask}"
    )
    compute = Compute(await connect(), close_remote, described, reopen=connect)
    return compute


def pace_heartbeats(scheduler: Any, seconds: float) -> None:
    """Have this scheduler's workers report every `seconds` at most (Dask picks 0.5 s for a small
    cluster): each heartbeat's reply names the interval of the next, so the scheduler's own handler
    is wrapped on this one instance (no Dask module is patched). Workers already registered move to
    it after their next report."""
    beat = scheduler.handlers["heartbeat_worker"]

    def heartbeat_worker(**kwargs: Any) -> Any:
        reply = beat(**kwargs)
        if isinstance(reply, dict) and "heartbeat-interval" in reply:
            reply["heartbeat-interval"] = max(reply["heartbeat-interval"], seconds)
        return reply

    scheduler.handlers["heartbeat_worker"] = heartbeat_worker


def kube_cluster(settings: CairnSettings):  # pragma: no cover - needs a Kubernetes cluster
    """Attach to the chart's DaskCluster, or create one; add the GPU group when asked for."""
    from dask_kubernetes.operator import KubeCluster

    try:
        cluster = KubeCluster.from_name(settings.dask_k8s_cluster, namespace=settings.dask_k8s_namespace)
    except ValueError:
        cluster = KubeCluster(
            name=settings.dask_k8s_cluster,
            namespace=settings.dask_k8s_namespace,
            image=settings.dask_image,
            n_workers=2,
            resources={"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "1", "memory": "4Gi"}},
            worker_command=["dask", "worker", "--nthreads", "1"],
        )
        cluster.adapt(minimum=1, maximum=32)
    if settings.dask_gpu_workers > 0 and not _has_worker_group(cluster, "gpu"):
        cluster.add_worker_group(
            name="gpu",
            n_workers=settings.dask_gpu_workers,
            resources={"limits": {"nvidia.com/gpu": "1"}},
            worker_command=["dask", "worker", "--nthreads", "1", "--resources", "GPU=1"],
        )
    return cluster


def _has_worker_group(cluster, group: str) -> bool:  # pragma: no cover - needs a Kubernetes cluster
    """The chart may already own `<cluster>-<group>`: adding it again would be a 409 conflict."""
    from kr8s.objects import new_class

    worker_group = new_class("DaskWorkerGroup", "kubernetes.dask.org/v1", namespaced=True)
    try:
        worker_group.get(f"{cluster.name}-{group}", namespace=cluster.namespace)
    except Exception:  # noqa: BLE001 - not found (or not readable): let add_worker_group decide
        return False
    return True
