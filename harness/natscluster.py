"""A JetStream cluster of nats-server processes, one per host (harness/hosts.py), joined by routes.

Each server listens for clients on its host's address at 4222 and for its peers at 6222, keeps its
store under `workdir/<name>` and fsyncs every write, as the embedded server does. Servers can be
killed, stopped in lame-duck mode (as a StatefulSet update stops a pod) and started again on the
same host with the same store, so a test can take the cluster through what an operator sees.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.hosts import Host, Hosts
from services.platform.bus.embedded import server_binary

CLIENT_PORT, ROUTE_PORT, MONITOR_PORT = 4222, 6222, 8222


@dataclass
class ClusterServer:
    name: str
    host: Host
    workdir: Path
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return self.host.url("nats", CLIENT_PORT)

    @property
    def monitor(self) -> str:
        return self.host.url("http", MONITOR_PORT)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def server_config(server: ClusterServer, peers: list[Host], cluster: str, lame_duck_s: float) -> str:
    """One server's configuration: JetStream fsynced, routes to every peer (itself excluded); a
    single server (a host of its own, for faults between a client and its server) has no cluster."""
    others = [p for p in peers if p is not server.host]
    routes = ", ".join(f'"nats-route://{p.address}:{ROUTE_PORT}"' for p in others)
    cluster_block = (
        f"""cluster {{
  name: "{cluster}"
  listen: "{server.host.address}:{ROUTE_PORT}"
  routes: [{routes}]
}}"""
        if others
        else ""
    )  # one server alone: no cluster, JetStream stands by itself
    return f"""
server_name: "{server.name}"
listen: "{server.host.address}:{CLIENT_PORT}"
http: "{server.host.address}:{MONITOR_PORT}"
max_payload: 8MB
lame_duck_duration: "{lame_duck_s}s"
lame_duck_grace_period: "1s"
jetstream {{
  store_dir: "{server.workdir / "jetstream"}"
  sync_interval: always
}}
{cluster_block}
"""


class NatsCluster:
    """One server on each of `hosts` (three for a cluster, one for a server on a host of its own);
    `urls` is the seed list every client is given."""

    def __init__(
        self,
        hosts: Hosts,
        workdir: Path,
        name: str = "cairn",
        lame_duck_s: float = 30.0,
        members: Sequence[Host] | None = None,
    ):
        """`members`: the hosts this cluster's servers run on (default: all of `hosts`), so two
        clusters can share one Hosts."""
        self.hosts = hosts
        self.name = name
        self.lame_duck_s = lame_duck_s
        on = list(members) if members is not None else list(hosts)
        self.servers = [ClusterServer(f"n{i}", h, Path(workdir) / f"n{i}") for i, h in enumerate(on)]

    @property
    def urls(self) -> str:
        """The comma-separated seed list CAIRN_NATS_URL takes."""
        return ",".join(s.url for s in self.servers)

    def server(self, name: str) -> ClusterServer:
        return next(s for s in self.servers if s.name == name)

    def start(self, timeout: float = 30.0) -> NatsCluster:
        for server in self.servers:
            self.start_server(server, wait=False)
        for server in self.servers:
            wait_healthy(server, timeout)
        return self

    def start_server(self, server: ClusterServer, wait: bool = True, timeout: float = 30.0) -> None:
        server.workdir.mkdir(parents=True, exist_ok=True)
        config = server.workdir / "nats-server.conf"
        config.write_text(server_config(server, [s.host for s in self.servers], self.name, self.lame_duck_s))
        log = open(server.workdir / "nats-server.log", "ab")  # noqa: SIM115 - owned by the child
        server.process = self.hosts.run(
            server.host, [server_binary(), "-c", str(config)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        if wait:
            wait_healthy(server, timeout)

    def kill(self, server: ClusterServer) -> None:
        """As a crash: SIGKILL, the store left as it was."""
        if server.process is not None:
            Hosts.stop(server.process, signal.SIGKILL)

    def lame_duck(self, server: ClusterServer, timeout: float = 60.0) -> int | None:
        """Lame-duck mode (SIGUSR2): the server stops accepting, moves its clients away over the lame
        duck duration, steps down as leader, then exits; what a rolling restart does to each pod."""
        if server.process is None or server.process.poll() is not None:
            return None
        server.process.send_signal(signal.SIGUSR2)
        return server.process.wait(timeout=timeout)

    def close(self) -> None:
        for server in self.servers:
            if server.process is not None:
                Hosts.stop(server.process)

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()


def wait_healthy(server: ClusterServer, timeout: float = 30.0) -> None:
    """Until the server's /healthz says OK: listening, routed, JetStream current with a meta leader."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{server.monitor}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{server.name} is not healthy after {timeout}s (see {server.workdir})")
        time.sleep(0.1)
