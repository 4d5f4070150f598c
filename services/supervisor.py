"""`cairn up`: an embedded nats-server (unless CAIRN_NATS_URL is set), every service as its own
process, and the inference server; the URLs go into $CAIRN_HOME/runtime.json for other commands.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from services.bus.connection import connect
from services.bus.embedded import EmbeddedNats
from services.bus.provision import provision_all
from services.catalog import SERVICES
from services.settings import RUNTIME_FILE, CairnSettings


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def prepare(settings: CairnSettings) -> str:
    """Provision the stream and the MLflow schema once, before services race to do it."""
    nc = await connect(settings, "admin")
    try:
        done = await provision_all(nc.jetstream(), settings)
    finally:
        await nc.close()
    from services.tracking import Tracker

    await asyncio.to_thread(Tracker, settings.tracking_uri)
    return done


def spawn(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    log = open(log_path, "ab")  # noqa: SIM115 - the child owns it
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "services.cli", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        log.close()


def up(settings: CairnSettings, services: list[str] | None = None, serve: bool = True) -> dict:
    home = settings.home_dir
    home.mkdir(parents=True, exist_ok=True)
    (home / "logs").mkdir(exist_ok=True)
    runtime: dict = {"pids": {}, "started": time.time()}
    if settings.nats_url:
        runtime["nats_url"] = settings.nats_url
    else:
        server = EmbeddedNats(home / "nats")
        runtime["nats_url"] = server.start()
        runtime["pids"]["nats-server"] = server.process.pid  # type: ignore[union-attr]
    settings = settings.model_copy(update={"nats_url": runtime["nats_url"]})
    asyncio.run(prepare(settings))
    env = {
        **os.environ,
        **settings.to_env(),
        "CAIRN_HOME": str(home),
        "CAIRN_NATS_URL": runtime["nats_url"],
        "CAIRN_ALLOWED_ROOTS": json.dumps([str(r) for r in settings.read_roots]),
    }
    runtime["health"] = {}
    for name in services or list(SERVICES):
        port = _free_port()
        proc = spawn(["run", name], {**env, "CAIRN_HTTP_PORT": str(port)}, home / "logs" / f"{name}.log")
        runtime["pids"][name] = proc.pid
        runtime["health"][name] = f"http://127.0.0.1:{port}"
    if serve:
        port = settings.serve_port or _free_port()
        proc = spawn(["serve", "--port", str(port)], env, home / "logs" / "serve.log")
        runtime["pids"]["serve"] = proc.pid
        runtime["serve_url"] = f"http://{settings.serve_host}:{port}"
    (home / RUNTIME_FILE).write_text(json.dumps(runtime, indent=2))
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
                pid = runtime["pids"].get(name)
                if pid and not _alive(pid):
                    return {name: "process exited (see logs/" + name + ".log)"}
                try:
                    if client.get(url).status_code == 200:
                        del pending[name]
                except httpx.HTTPError:
                    pass
            if pending:
                time.sleep(0.25)
    return {n: "not ready" for n in pending}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as dead
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


def down(settings: CairnSettings, timeout: float = 15.0) -> list[str]:
    path = settings.home_dir / RUNTIME_FILE
    if not path.exists():
        return []
    runtime = json.loads(path.read_text())
    pids = runtime.get("pids", {})
    order = [n for n in pids if n != "nats-server"] + (["nats-server"] if "nats-server" in pids else [])
    stopped = []
    for name in order:
        pid = pids[name]
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
        stopped.append(name)
    path.unlink()
    return stopped
