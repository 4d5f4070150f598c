"""A Dask cluster across hosts (harness/hosts.py), each process started as the Helm chart starts it.

The scheduler runs on one namespace host and two workers on two others, with exactly the command
and arguments the chart renders for its DaskCluster scheduler and worker containers
(helm/cairn/templates/dask/daskcluster.yaml, `cairn.daskWorkerPodSpec`, `cairn.daskTLSArgs`),
mutual TLS included. `scheduler_argv` and `worker_argv` build them; called with the chart's own
paths (`CHART_TLS_DIR`, `CHART_LOCAL_DIR`, `CHART_WORKER_NAME`) they give what the chart renders,
word for word (tests/test_dask_hosts.py renders the chart with the real Helm engine and compares).
The harness substitutes only what a pod gets from outside the spec:

- the TLS folder: the chart mounts the `dask-tls` Secret at /etc/cairn/dask-tls; here it is a
  temporary folder written by `cairn dask-tls --out`;
- the worker's `--local-directory` (/tmp/dask, the pod's emptyDir) and `$(DASK_WORKER_NAME)`, which
  the operator sets;
- the scheduler address in DASK_SCHEDULER_ADDRESS: the chart's Service name
  (`<release>-dask-scheduler.<ns>.svc`) becomes the Service address below.

A Kubernetes Service gives the scheduler a stable address whichever pod (and node) serves it.
Here that is `service_address`: an extra address on the bridge's subnet held by the host that runs
the scheduler. `move_scheduler` kills the scheduler's host (its link cut first, so no FIN or RST
reaches anyone, then every process on it SIGKILLed), moves the Service address to another host and
starts a new scheduler there; the neighbour caches of the machine and the hosts are flushed, as a
gratuitous ARP from the new holder would update them. Clients keep the address they were given
(training's CAIRN_DASK, the workers' DASK_SCHEDULER_ADDRESS), as pods keep a Service's name.
Workers whose process exits are started again with the same arguments, as a kubelet restarts a
container (`restartPolicy: Always`), one second later.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.hosts import Host, Hosts, ip, wait_listening
from services.platform.dask_tls import CA, CERT, KEY, SCHEDULER_PORT

BIN = Path(sys.executable).parent
CHART_TLS_DIR = "/etc/cairn/dask-tls"  # cairn.daskTLSDir
CHART_LOCAL_DIR = "/tmp/dask"  # the worker's --local-directory (an emptyDir in the pod)
CHART_WORKER_NAME = "$(DASK_WORKER_NAME)"  # set by the operator, expanded by the kubelet
# The scheduler's HTTP routes as the chart sets them (cairn.daskSchedulerHttpRoutes): Dask's
# defaults plus its API, the operator's way in under TLS.
SCHEDULER_HTTP_ROUTES = (
    '["distributed.http.scheduler.prometheus","distributed.http.scheduler.info",'
    '"distributed.http.scheduler.json","distributed.http.health","distributed.http.proxy",'
    '"distributed.http.statics","distributed.http.scheduler.api"]'
)
RESTART_DELAY_S = 1.0  # the kubelet's first restart back-off is 10 s; short here, same behaviour


def tls_args(tls_dir: str) -> list[str]:
    """cairn.daskTLSArgs."""
    return [
        "--tls-ca-file",
        f"{tls_dir}/{CA}",
        "--tls-cert",
        f"{tls_dir}/{CERT}",
        "--tls-key",
        f"{tls_dir}/{KEY}",
    ]


def scheduler_argv(tls_dir: str = CHART_TLS_DIR) -> list[str]:
    """The DaskCluster scheduler container: its `command` then its `args`."""
    return [
        "dask",
        "scheduler",
        "--port",
        str(SCHEDULER_PORT),
        "--dashboard-address",
        ":8787",
        *tls_args(tls_dir),
    ]


def scheduler_env() -> dict[str, str]:
    return {"DASK_DISTRIBUTED__SCHEDULER__HTTP__ROUTES": SCHEDULER_HTTP_ROUTES}


WORKER_ENTRYPOINT = ["dask", "worker"]  # docker/Dockerfile.worker's ENTRYPOINT: the pod gives args only


def worker_argv(
    name: str = CHART_WORKER_NAME,
    local_dir: str = CHART_LOCAL_DIR,
    tls_dir: str = CHART_TLS_DIR,
    nthreads: int = 1,
) -> list[str]:
    """The worker container's `args` (cairn.daskWorkerPodSpec, the default CPU group), no entrypoint."""
    return [
        "--name",
        name,
        "--nthreads",
        str(nthreads),
        "--dashboard-address",
        ":8788",
        "--local-directory",
        local_dir,
        *tls_args(tls_dir),
    ]


def worker_env(scheduler_address: str) -> dict[str, str]:
    """Set in the pod so the operator keeps it (cairn.daskSchedulerAddress)."""
    return {"DASK_SCHEDULER_ADDRESS": scheduler_address}


def _venv(argv: list[str]) -> list[str]:
    """`dask` is the image's; here the venv's (the same package the worker image installs)."""
    return [str(BIN / argv[0]), *argv[1:]]


def _clean_env() -> dict[str, str]:
    """This machine's environment without DASK_ settings that could change what the chart starts."""
    return {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}


@dataclass
class Worker:
    name: str
    host: Host
    process: subprocess.Popen | None = None
    starts: int = 0


@dataclass
class DaskHosts:
    """A scheduler on `scheduler_host`, one worker on each of `worker_hosts`, all over mutual TLS."""

    hosts: Hosts
    workdir: Path
    scheduler_host: Host
    worker_hosts: list[Host]
    service_address: str = ""
    scheduler: subprocess.Popen | None = None
    workers: list[Worker] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _kubelet: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # Addresses and credentials -------------------------------------------------------------------
    @property
    def address(self) -> str:
        """The scheduler's Service address, what training's CAIRN_DASK and the workers are given."""
        return f"tls://{self.service_address}:{SCHEDULER_PORT}"

    @property
    def tls_dir(self) -> Path:
        return self.workdir / "dask-tls"

    def client_env(self) -> dict[str, str]:
        """What a training process needs to reach the scheduler (the chart's cairn.daskTLSEnv)."""
        return {
            "CAIRN_DASK": self.address,
            "CAIRN_DASK_TLS_CA": str(self.tls_dir / CA),
            "CAIRN_DASK_TLS_CERT": str(self.tls_dir / CERT),
            "CAIRN_DASK_TLS_KEY": str(self.tls_dir / KEY),
        }

    # Lifecycle ------------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> DaskHosts:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # The certificates as an operator makes them: `cairn dask-tls --out DIR`.
        subprocess.run(
            [str(BIN / "cairn"), "dask-tls", "--out", str(self.tls_dir)],
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.service_address = self._free_service_address()
        self._hold_address(self.scheduler_host)
        self._start_scheduler(timeout)
        self.workers = [Worker(f"worker-{i}", host) for i, host in enumerate(self.worker_hosts)]
        for worker in self.workers:
            self._start_worker(worker)
        self._kubelet = threading.Thread(target=self._restart_exited_workers, daemon=True, name="kubelet")
        self._kubelet.start()
        return self

    def wait_workers(self, count: int | None = None, timeout: float = 120.0) -> None:
        """Until `count` workers (default: all) are registered with the scheduler."""
        want = len(self.workers) if count is None else count
        with self._client(timeout) as client:
            client.wait_for_workers(want, timeout=timeout)

    def _client(self, timeout: float = 60.0):
        from distributed import Client

        from services.platform.dask_tls import client_security
        from services.platform.settings import CairnSettings

        settings = CairnSettings(
            dask_tls_ca=self.tls_dir / CA, dask_tls_cert=self.tls_dir / CERT, dask_tls_key=self.tls_dir / KEY
        )
        return Client(self.address, security=client_security(settings), timeout=timeout)

    def on_scheduler(self, function):
        """`function(dask_scheduler)` run in the scheduler, over the cluster's mutual TLS."""
        with self._client() as client:
            return client.run_on_scheduler(function)

    def processing_on(self, host: Host) -> list[str]:
        """The task keys the scheduler has running on the workers of `host`."""
        with self._client() as client:
            processing = client.processing()
        return [k for address, keys in processing.items() if f"//{host.address}:" in address for k in keys]

    def _free_service_address(self) -> str:
        """An address of the bridge's /24 no host has (hosts take .2 upwards)."""
        subnet = ipaddress.ip_network(f"{self.hosts.gateway}/24", strict=False)
        return str(subnet.network_address + 200)

    def _hold_address(self, host: Host) -> None:
        ip("netns", "exec", host.name, "ip", "addr", "add", f"{self.service_address}/32", "dev", "eth0")

    def _release_address(self, host: Host) -> None:
        ip(
            "netns",
            "exec",
            host.name,
            "ip",
            "addr",
            "del",
            f"{self.service_address}/32",
            "dev",
            "eth0",
            check=False,
        )

    def _flush_neighbours(self) -> None:
        """Forget which link-layer address held the Service address: what a gratuitous ARP from its
        new holder does to the caches of everyone on the segment."""
        ip("neigh", "flush", "to", self.service_address, check=False)
        for host in self.hosts:
            ip("netns", "exec", host.name, "ip", "neigh", "flush", "to", self.service_address, check=False)

    def _start_scheduler(self, timeout: float) -> None:
        log = open(self.workdir / f"scheduler-{self.scheduler_host.name}.log", "ab")  # noqa: SIM115
        try:
            self.scheduler = self.hosts.run(
                self.scheduler_host,
                _venv(scheduler_argv(str(self.tls_dir))),
                env={**_clean_env(), **scheduler_env()},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            log.close()
        wait_listening(self.service_address, SCHEDULER_PORT, timeout)

    def _start_worker(self, worker: Worker) -> None:
        local = self.workdir / f"{worker.name}-{worker.starts}"  # the pod's emptyDir: new each start
        local.mkdir(parents=True, exist_ok=True)
        argv = worker_argv(worker.name, str(local), str(self.tls_dir))
        log = open(self.workdir / f"{worker.name}.log", "ab")  # noqa: SIM115
        try:
            worker.process = self.hosts.run(
                worker.host,
                _venv(WORKER_ENTRYPOINT) + argv,
                env={**_clean_env(), **worker_env(self.address)},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            log.close()
        worker.starts += 1

    def _restart_exited_workers(self) -> None:
        """The kubelet: a worker container that exited is started again with the same arguments."""
        while not self._stop.wait(0.2):
            with self._lock:
                for worker in self.workers:
                    if worker.process is not None and worker.process.poll() is not None:
                        if self._stop.wait(RESTART_DELAY_S):
                            return
                        self._start_worker(worker)

    # Faults ---------------------------------------------------------------------------------------
    def partition(self, host: Host) -> None:
        self.hosts.partition(host)

    def heal(self, host: Host) -> None:
        self.hosts.heal(host)

    def kill_scheduler_host(self) -> Host:
        """The scheduler's host dies: cut off first (no FIN, no RST), then every process on it gone."""
        dead = self.scheduler_host
        self.hosts.partition(dead)
        for process in list(dead.processes):
            Hosts.stop(process, signal.SIGKILL)
        self._release_address(dead)
        return dead

    def move_scheduler(self, to: Host, down_s: float = 0.0, timeout: float = 60.0) -> None:
        """Kill the scheduler's host, give the Service address to `to`, start a new scheduler there
        (`down_s` later: how long the new pod takes to be scheduled and pull its image).
        The workers lose their scheduler and exit; the kubelet starts them again, and they register
        with the new one at the same address."""
        self.kill_scheduler_host()
        if down_s:
            time.sleep(down_s)  # the outage's length
        self.scheduler_host = to
        self._hold_address(to)
        self._flush_neighbours()
        self._start_scheduler(timeout)

    def close(self) -> None:
        self._stop.set()
        if self._kubelet is not None:
            self._kubelet.join(timeout=10)
        with self._lock:
            for worker in self.workers:
                if worker.process is not None:
                    Hosts.stop(worker.process)
            if self.scheduler is not None:
                Hosts.stop(self.scheduler)
        with contextlib.suppress(Exception):
            self._release_address(self.scheduler_host)

    def __enter__(self) -> DaskHosts:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()
