"""Stopping never waits on the bus: every service exits within 5 s of SIGTERM whatever state its
NATS server is in (gone, the client reconnecting, or partitioned away so that the connection looks
alive and nothing answers), and `cairn up` stopped together with its server exits within 15 s with
every child gone. In-flight work is left for redelivery (the tests of redelivery are elsewhere).

The server runs on a host of its own (a network namespace), so a partition is a real one: its link
is cut, no FIN or RST reaches the services.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from harness.hosts import Hosts
from harness.natscluster import NatsCluster
from harness.system import start_system
from services.tools import supervisor
from services.tools.catalog import SERVICES

pytestmark = pytest.mark.slow
CAIRN = str(Path(sys.executable).with_name("cairn"))
STOP_WITHIN_S = 5.0


def _disconnected(url: str) -> bool:
    """The service's /readyz says it lost NATS (it reports 503 while its connection is down)."""
    try:
        return httpx.get(url + "/readyz", timeout=1).status_code != 200
    except httpx.HTTPError:
        return False


def _until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _stop_all(pids: dict[str, int]) -> dict[str, float | None]:
    """SIGTERM every service at once; how long each took to exit (None: still alive after 20 s)."""
    start = time.monotonic()
    for pid in pids.values():
        os.kill(pid, signal.SIGTERM)
    took: dict[str, float | None] = dict.fromkeys(pids)
    while time.monotonic() - start < 20 and any(v is None for v in took.values()):
        for name, pid in pids.items():
            if took[name] is None and not supervisor.alive(pid):
                took[name] = time.monotonic() - start
        time.sleep(0.02)
    for name, pid in pids.items():
        if took[name] is None:
            os.killpg(pid, signal.SIGKILL)
    return took


@pytest.mark.parametrize("state", ["gone", "reconnecting", "partitioned"])
def test_every_service_exits_within_5_s_whatever_state_nats_is_in(tmp_path: Path, state: str) -> None:
    with Hosts(1) as hosts, NatsCluster(hosts, tmp_path / "nats") as nats:
        system = start_system(tmp_path, nats_url=nats.urls, serve=False)
        server = nats.servers[0]
        pids = {name: system.runtime["pids"][name] for name in SERVICES}
        try:
            if state == "partitioned":
                hosts.partition(server.host)  # the connection looks alive; nothing answers
            else:
                nats.kill(server)
            if state == "reconnecting":  # every service has noticed and is in its reconnect loop
                for name in SERVICES:
                    _until(lambda n=name: _disconnected(system.health_url(n)), 30, f"{name} to notice")
            took = _stop_all(pids)
        finally:
            system.stop()
        slow = {name: t for name, t in took.items() if t is None or t > STOP_WITHIN_S}
        assert not slow, f"{state}: services that took longer than {STOP_WITHIN_S} s to stop: {took}"


def test_cairn_up_stopped_together_with_its_server_exits_within_15_s(tmp_path: Path) -> None:
    """As when a whole deployment is taken down: the nats-server and `cairn up` get SIGTERM at once."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")},
        "CAIRN_HOME": str(tmp_path / "home"),
        "CAIRN_SERVE_PORT": str(supervisor.free_port()),
    }
    up = subprocess.Popen(
        [CAIRN, "up"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        settings_file = tmp_path / "home" / "runtime.json"
        deadline = time.monotonic() + 180
        while True:  # `cairn up` prints nothing machine-readable: its runtime file and /readyz say it is up
            assert up.poll() is None, "cairn up exited early"
            if settings_file.exists():
                import json

                runtime = json.loads(settings_file.read_text())
                if "serve_url" in runtime and not supervisor.wait_ready(runtime, timeout=1):
                    break
            assert time.monotonic() < deadline, "cairn up did not become ready"
            time.sleep(0.5)
        children = [p.pid for p in psutil.Process(up.pid).children(recursive=True)]
        server = runtime["pids"]["nats-server"]
        start = time.monotonic()
        os.kill(server, signal.SIGTERM)
        up.send_signal(signal.SIGTERM)
        code = up.wait(timeout=30)
        took = time.monotonic() - start
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait(10)
    assert took <= 15, f"cairn up took {took:.1f} s to exit"
    assert code == 0
    alive = []
    for pid in children:
        with contextlib.suppress(psutil.NoSuchProcess):  # a zombie has exited; its parent reaps it
            if (child := psutil.Process(pid)).status() != psutil.STATUS_ZOMBIE:
                alive.append(child.cmdline())
    assert not alive, f"children still alive after `cairn up` exited: {alive}"
