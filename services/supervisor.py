"""`cairn up`: an embedded nats-server (unless CAIRN_NATS_URL is set), every service as its own
process, and the inference server; the URLs go into $CAIRN_HOME/runtime.json for other commands.

Children die with the supervisor whatever ends it: SIGTERM and SIGINT stop them in order
(`down`); SIGKILL, which cannot be caught, reaches them through the kernel's parent-death signal
(`die_with_parent`). A detached start (`cairn up --detach`) leaves them running for `cairn down`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from services.bus.embedded import EmbeddedNats, die_with_parent
from services.catalog import SERVICES
from services.provisioning import provision_everything
from services.settings import RUNTIME_FILE, CairnSettings


class PortInUse(RuntimeError):
    """The inference port is taken (often by another `cairn up`)."""


def free_port() -> int:
    """A port free now for a child to bind right after (a health or endpoint port).

    Chosen below the kernel's ephemeral range: outgoing connections (NATS clients, Dask, MLflow)
    take their local ports from that range, and one of them took a port picked from it before the
    child bound it (a service then died with "address already in use").
    """
    low = _ephemeral_range_start()
    pick = random.SystemRandom()
    for _ in range(200):
        port = pick.randrange(10_000, low)
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # a crowded machine: any free port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ephemeral_range_start() -> int:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32_768  # Linux's default; other systems start higher
    return max(low, 10_001)


def check_port(host: str, port: int) -> None:
    """Fail before starting anything when the endpoint could not bind (uvicorn binds with SO_REUSEADDR)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            raise PortInUse(
                f"port {port} on {host} is in use (another `cairn up`?): set CAIRN_SERVE_PORT to a free "
                "port, or 0 for any"
            ) from None


def spawn(
    args: list[str], env: dict[str, str], log_path: Path, tied: bool = False
) -> subprocess.Popen[bytes]:
    log = open(log_path, "ab")  # noqa: SIM115 - the child owns it
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "services.cli", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group, so `down` stops its Dask workers with it
            preexec_fn=die_with_parent() if tied else None,  # noqa: PLW1509
        )
    finally:
        log.close()


def up(
    settings: CairnSettings, services: list[str] | None = None, serve: bool = True, tied: bool = True
) -> dict:
    """Start everything; `tied`: children die with this process (foreground `cairn up`)."""
    home = settings.home_dir
    home.mkdir(parents=True, exist_ok=True)
    (home / "logs").mkdir(exist_ok=True)
    serve_port = settings.serve_port or free_port()
    if serve:
        check_port(settings.serve_host, serve_port)
    runtime: dict = {"pids": {}, "started": time.time(), "health": {}}
    if tied:
        runtime["supervisor"] = os.getpid()
    path = home / RUNTIME_FILE
    if settings.nats_url:
        runtime["nats_url"] = settings.nats_url
    else:
        server = EmbeddedNats(home / "nats", tied_to_parent=tied)
        runtime["nats_url"] = server.start()
        runtime["pids"]["nats-server"] = server.process.pid  # type: ignore[union-attr]
    path.write_text(json.dumps(runtime, indent=2))  # `down` can stop a half-finished start
    settings = settings.model_copy(update={"nats_url": runtime["nats_url"]})
    asyncio.run(provision_everything(settings))
    env = {
        **os.environ,
        **settings.to_env(),
        "CAIRN_HOME": str(home),
        "CAIRN_NATS_URL": runtime["nats_url"],
        "CAIRN_ALLOWED_ROOTS": json.dumps([str(r) for r in settings.read_roots]),
    }
    for name in services or list(SERVICES):
        port = free_port()
        proc = spawn(
            ["run", name], {**env, "CAIRN_HTTP_PORT": str(port)}, home / "logs" / f"{name}.log", tied
        )
        runtime["pids"][name] = proc.pid
        runtime["health"][name] = f"http://127.0.0.1:{port}"
        path.write_text(json.dumps(runtime, indent=2))
    if serve:
        # `serving start`: the endpoint with its CAIRN_SERVE_WORKERS worker processes
        proc = spawn(["serving", "start", "--port", str(serve_port)], env, home / "logs" / "serve.log", tied)
        runtime["pids"]["serve"] = proc.pid
        runtime["serve_url"] = f"http://{settings.serve_host}:{serve_port}"
    path.write_text(json.dumps(runtime, indent=2))
    return runtime


def wait_ready(runtime: dict, timeout: float = 120.0) -> dict[str, str]:
    """Poll every /readyz until all answer 200; returns what is still not ready on timeout."""
    urls = {n: u + "/readyz" for n, u in runtime.get("health", {}).items()}
    if "serve_url" in runtime:
        urls["serve"] = runtime["serve_url"] + "/readyz"
    pending = dict(urls)
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0) as client:
        while pending and time.monotonic() < deadline:
            for name, url in list(pending.items()):
                if (gone := exited(runtime, name)) is not None:
                    return {name: gone}
                try:
                    if client.get(url).status_code == 200:
                        del pending[name]
                except httpx.HTTPError:
                    pass
            if pending:
                time.sleep(0.25)
    return {n: "not ready" for n in pending}


def exited(runtime: dict, name: str) -> str | None:
    """Why a child is gone (for the supervisor's report), or None while it runs."""
    pid = runtime["pids"].get(name)
    if pid is None or alive(pid):
        return None
    return f"process exited (see logs/{name}.log)"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as dead
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


def still_running(settings: CairnSettings) -> list[str]:
    """What a previous `cairn up` from this home left running (an empty list for a stale record)."""
    pids = settings.runtime().get("pids", {})
    return [name for name, pid in pids.items() if alive(pid)]


def running_supervisor(settings: CairnSettings) -> int | None:
    """The pid of a foreground `cairn up` still running from this home, if any."""
    pid = settings.runtime().get("supervisor")
    return pid if pid and pid != os.getpid() and alive(pid) else None


def down(settings: CairnSettings, timeout: float = 12.0) -> list[str]:
    """Stop what `cairn up` started from this home: services and endpoint together, then NATS last
    (so they can still ack and publish while they stop). Each group gets `timeout` s, then SIGKILL."""
    path = settings.home_dir / RUNTIME_FILE
    if not path.exists():
        return []
    pids: dict[str, int] = json.loads(path.read_text()).get("pids", {})
    services = {n: p for n, p in pids.items() if n != "nats-server"}
    stopped = _stop_groups(services, timeout)
    if "nats-server" in pids:
        stopped += _stop_groups({"nats-server": pids["nats-server"]}, timeout)
    path.unlink(missing_ok=True)
    return stopped


def _stop_groups(pids: dict[str, int], timeout: float) -> list[str]:
    """SIGTERM each process group at once, wait for all, SIGKILL what is left; returns who was running."""
    signalled = {}
    for name, pid in pids.items():
        try:
            os.killpg(pid, signal.SIGTERM)
            signalled[name] = pid
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in signalled.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in signalled.values():
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    return list(signalled)
