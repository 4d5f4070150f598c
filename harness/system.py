"""A running system: nats-server, every service as its own process, the endpoint; its processes' memory."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from services.platform.bus.embedded import EmbeddedNats
from services.platform.settings import RUNTIME_FILE, CairnSettings
from services.tools import supervisor

# A running system ----------------------------------------------------------------------------


@contextlib.contextmanager
def _environ(extra: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.update(extra)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _unreaped_child(pid: int) -> bool:
    """A child of ours that has exited and not been waited for: its pid (and group) cannot have been
    given to anyone else yet, and its group may still hold its Dask workers."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state, parent = stat[stat.rindex(")") + 2 :].split()[:2]
    return state == "Z" and int(parent) == os.getpid()


@dataclass
class System:
    """nats-server, the services `cairn up` starts (each its own process) and the endpoint."""

    home: Path
    settings: CairnSettings
    server: EmbeddedNats | None  # None: the system runs on a NATS it does not own (a cluster)
    runtime: dict[str, Any]
    env: dict[str, str]
    service_env: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def pids(self) -> dict[str, int]:
        if self.server is None:
            return dict(self.runtime["pids"])
        return {**self.runtime["pids"], "nats-server": self.server.process.pid}  # type: ignore[union-attr]

    def health_url(self, name: str) -> str:
        return self.runtime["health"][name]

    def respawn(self, name: str) -> int:
        """Start a service again on the same health port, as its supervisor would after a crash."""
        port = self.runtime["health"][name].rsplit(":", 1)[1]
        proc = supervisor.spawn(
            ["run", name],
            {**self.env, **self.service_env.get(name, {}), "CAIRN_HTTP_PORT": port},
            self.settings.home_dir / "logs" / f"{name}.log",
        )
        supervisor.record(self.runtime, name, proc)  # `supervisor.down` signals only what it recorded
        supervisor.write_runtime(self.settings.home_dir / RUNTIME_FILE, self.runtime)
        return proc.pid

    def _signal(self, pid: int, sig: int) -> None:
        """Signal `pid`'s group only while it is still the process this system started: once reaped,
        a pid is handed to whatever starts next (pid_max is 32,768 here, and a full suite wraps it
        several times), and every cairn service leads its own group, so a stale killpg stops some
        other test's service."""
        if supervisor.is_ours(self.runtime, pid) or _unreaped_child(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, sig)

    def kill(self, name: str) -> None:
        """kill -9 a service and everything it started (its Dask workers): a crashed container."""
        pid = self.runtime["pids"][name]
        self._signal(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)

    def not_ready(self, timeout: float = 180.0) -> dict[str, str]:
        waiting = supervisor.wait_ready(self.runtime, timeout)
        return {name: why + self.last_words(name) for name, why in waiting.items()}

    def last_words(self, name: str, lines: int = 20) -> str:
        """The end of a service's log, for a failure message (the home is gone once CI ends)."""
        path = self.settings.home_dir / "logs" / f"{name}.log"
        try:
            tail = path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return f"\n--- last lines of {path.name} ---\n" + "\n".join(tail)

    def post_mortem(self) -> str:
        """Which processes have died, with the end of each one's log."""
        dead = [n for n, pid in self.runtime["pids"].items() if not supervisor.alive(pid)]
        return "; ".join(f"{n} is gone{self.last_words(n)}" for n in dead) or "every process runs"

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM every process group at once (supervisor.down does one after the other), then
        SIGKILL what is left; nats-server last."""
        pids = dict(self.runtime["pids"])
        for pid in pids.values():
            self._signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for pid in pids.values():
            while supervisor.alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if supervisor.alive(pid):
                self._signal(pid, signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            (self.settings.home_dir / RUNTIME_FILE).unlink()
        if self.server is not None:
            self.server.stop()


def start_system(
    home: Path,
    *,
    services: list[str] | None = None,
    serve: bool = True,
    nats_port: int = -1,
    nats_url: str | None = None,
    extra_env: dict[str, str] | None = None,
    service_env: dict[str, dict[str, str]] | None = None,
    ready_timeout: float = 180.0,
    **overrides: Any,
) -> System:
    """`service_env`: variables for one service only (that one is started after the others);
    `nats_url`: run on that NATS (a cluster's seed list) instead of starting an embedded server."""
    from services.tools.catalog import SERVICES

    home = Path(home)
    service_env = service_env or {}
    names = [n for n in (services or list(SERVICES)) if n not in service_env]
    server = None if nats_url else EmbeddedNats(home / "nats", port=nats_port)
    if server is not None:
        nats_url = server.start()
    base: dict[str, Any] = {
        "home": home / "state",  # data files go in `home`, beside cairn's state and never in it
        "nats_url": nats_url,
        "allowed_roots": [str(home)],
        "serve_port": 0,
    }
    settings = CairnSettings(**{**base, **overrides})
    env = {**settings.to_env(), **(extra_env or {})}
    try:
        with _environ(env):
            runtime = supervisor.up(settings, services=names, serve=serve)
            full_env = {**os.environ, "CAIRN_NATS_URL": settings.nats_url or ""}
        system = System(home, settings, server, runtime, full_env, service_env)
        for name in service_env:
            runtime["health"][name] = f"http://127.0.0.1:{supervisor.free_port()}"  # noqa: SLF001
            system.respawn(name)
        not_ready = system.not_ready(ready_timeout)
        if not_ready:
            raise RuntimeError(f"not ready: {not_ready}; logs in {settings.home_dir / 'logs'}")
    except BaseException:
        supervisor.down(settings)
        if server is not None:
            server.stop()
        raise
    return system


def rss(system: System) -> dict[str, int]:
    """Resident memory of every process, Dask workers (children of training) each on their own."""
    out: dict[str, int] = {}
    for name, pid in system.pids.items():
        try:
            proc = psutil.Process(pid)
            out[name] = proc.memory_info().rss
            for child in proc.children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    out[f"{name}/{child.pid}"] = child.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return out
