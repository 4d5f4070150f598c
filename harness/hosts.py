"""Hosts on one machine: Linux network namespaces joined by a bridge, each with its own address.

A namespace is a host as far as the network goes: its own interfaces, addresses and ports. Cutting
its link to the bridge is a partition (it can reach nobody and nobody can reach it), bringing the
link back heals it. Processes started on a host belong to it, and `close` ends them, then removes
every namespace, link and the bridge, even when the test that used them failed, so nothing outlives
the `with` block. Needs root (CI and this machine's sessions run as root).

    with Hosts(3) as hosts:
        server = hosts.run(hosts[0], ["nats-server", "-a", hosts[0].address])
        hosts.partition(hosts[0]); ...; hosts.heal(hosts[0])
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import secrets
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

NETWORK = ipaddress.ip_network("10.250.0.0/16")  # carved into one /24 per Hosts; never routed out
SUBNET_LOCK = os.path.join(tempfile.gettempdir(), "cairn-hosts.lock")  # held while a Hosts claims a /24


class HostsUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, or no `ip`): said plainly, never a silent skip."""


@dataclass
class Host:
    name: str  # the network namespace
    address: str  # its address on the bridge
    link: str  # the veth end on the bridge's side: down is a partition
    processes: list[subprocess.Popen] = field(default_factory=list)

    def url(self, scheme: str, port: int) -> str:
        return f"{scheme}://{self.address}:{port}"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`ip ARGS...` (iproute2) on this machine, what it printed; raises when it fails unless `check`
    is False. Public for the harness modules that shape the hosts' network (harness/daskcluster.py)."""
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 of NETWORK no interface on this machine uses yet (another Hosts may be open)."""
    used = ip("-4", "-o", "addr", "show").stdout
    for _ in range(64):
        subnet = list(NETWORK.subnets(new_prefix=24))[secrets.randbelow(256)]
        if f" {subnet.network_address + 1}/" not in used:
            return subnet
    raise HostsUnavailable(f"no free /24 left in {NETWORK}")


class Hosts:
    """N hosts on one bridge; the machine itself is on the bridge too, at `gateway`."""

    def __init__(self, count: int, tag: str | None = None):
        self.count = count
        self.tag = tag or secrets.token_hex(3)  # short: interface names have 15 characters at most
        self.bridge = f"cb{self.tag}"
        self.hosts: list[Host] = []
        self.gateway = ""

    def __enter__(self) -> Hosts:
        if os.geteuid() != 0:
            raise HostsUnavailable("network namespaces need root (`ip netns add`): run as root, as CI does")
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def __getitem__(self, index: int) -> Host:
        return self.hosts[index]

    def __iter__(self):
        return iter(self.hosts)

    def _build(self) -> None:
        # One Hosts at a time picks its /24 and claims it on its bridge: two test workers building at
        # once would otherwise both see the same /24 free.
        with open(SUBNET_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                subnet = _free_subnet()
            except FileNotFoundError as exc:
                raise HostsUnavailable("no `ip` command (Debian's iproute2)") from exc
            gateway = subnet.network_address + 1
            self.gateway = str(gateway)
            ip("link", "add", self.bridge, "type", "bridge")
            ip("addr", "add", f"{gateway}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for i in range(self.count):
            name, link, inside = f"cairn-{self.tag}-{i}", f"cv{self.tag}{i}", f"cp{self.tag}{i}"
            address = str(gateway + 1 + i)
            ip("netns", "add", name)
            self.hosts.append(Host(name, address, link))
            ip("link", "add", link, "type", "veth", "peer", "name", inside)
            ip("link", "set", inside, "netns", name)
            ip("link", "set", link, "master", self.bridge)
            ip("link", "set", link, "up")
            inns = ("netns", "exec", name, "ip")
            ip(*inns, "link", "set", "lo", "up")
            ip(*inns, "link", "set", inside, "name", "eth0")
            ip(*inns, "addr", "add", f"{address}/24", "dev", "eth0")
            ip(*inns, "link", "set", "eth0", "up")
            ip(*inns, "route", "add", "default", "via", self.gateway)

    # Processes ------------------------------------------------------------------------------------
    def command(self, host: Host, argv: Sequence[str]) -> list[str]:
        """argv as run on `host` (for callers that start the process themselves)."""
        return ["ip", "netns", "exec", host.name, *argv]

    def run(self, host: Host, argv: Sequence[str], **popen: Any) -> subprocess.Popen:
        """Start argv on `host` in its own process group; `close` (or `stop`) ends it."""
        popen.setdefault("start_new_session", True)
        process = subprocess.Popen(self.command(host, argv), **popen)
        host.processes.append(process)
        return process

    def check(self, host: Host, argv: Sequence[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run argv on `host` to completion and return what it printed."""
        return subprocess.run(self.command(host, argv), capture_output=True, text=True, timeout=timeout)

    @staticmethod
    def stop(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Signal the process's group, wait, then SIGKILL what is left; its exit code."""
        if process.poll() is None:
            try:
                os.killpg(process.pid, sig)
                return process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return process.wait(timeout=timeout)

    # Faults ---------------------------------------------------------------------------------------
    def partition(self, host: Host) -> None:
        """Cut `host` off: no packet in or out until `heal` (its processes keep running)."""
        ip("link", "set", host.link, "down")

    def heal(self, host: Host) -> None:
        ip("link", "set", host.link, "up")

    # Teardown -------------------------------------------------------------------------------------
    def close(self) -> None:
        """End every process on every host, then remove the namespaces, links and the bridge."""
        for host in self.hosts:
            for process in host.processes:
                self.stop(process, signal.SIGKILL)
            for pid in _netns_pids(host.name):  # anything else started inside, by anyone
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _wait_empty(host.name)
            ip("link", "del", host.link, check=False)
            ip("netns", "del", host.name, check=False)
        ip("link", "del", self.bridge, check=False)
        self.hosts = []

    def leftovers(self) -> list[str]:
        """Every namespace, link or process of this tag still on the machine (empty after `close`)."""
        return leftovers(self.tag)


def _netns_pids(name: str) -> list[int]:
    result = ip("netns", "pids", name, check=False)
    return [int(p) for p in result.stdout.split()] if result.returncode == 0 else []


def _wait_empty(name: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while _netns_pids(name) and time.monotonic() < deadline:
        time.sleep(0.05)


def leftovers(tag: str) -> list[str]:
    """What of a Hosts with this tag is still on the machine: namespaces, links, processes in them."""
    left = [n.split()[0] for n in ip("netns", "list").stdout.splitlines() if n.startswith(f"cairn-{tag}-")]
    left += [f"pid {pid} in {ns}" for ns in list(left) for pid in _netns_pids(ns)]
    links = ip("-o", "link", "show").stdout
    for line in links.splitlines():
        device = line.split(":")[1].strip().split("@")[0]
        if device in (f"cb{tag}",) or device.startswith((f"cv{tag}", f"cp{tag}")):
            left.append(device)
    return left


def wait_listening(address: str, port: int, timeout: float = 30.0) -> None:
    """Until a TCP connection to address:port succeeds (a server on a host is up), or TimeoutError."""
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((address, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {address}:{port} after {timeout}s") from None
            time.sleep(0.05)
