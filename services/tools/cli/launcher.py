"""One process that imports the services' libraries once and forks every process `cairn up` starts.

Why: each service run as its own interpreter spends one to two seconds of CPU importing MLflow,
pandas, Dask, scikit-learn and XGBoost before it does anything, about 9 s for the eight processes of
one `cairn up`; importing their union once takes under 3.5 s, and the forks share those pages
copy-on-write. Linux only (a fork after macOS frameworks load is unsafe), and CAIRN_PRELOAD=false
goes back to one interpreter per process.

The supervisor starts it (`services.tools.forks.Launcher`) and they speak JSON lines: it writes
`{"ready": PID}` once its imports are done, then answers each `{"args", "env", "log", "tied"}` with
`{"pid": N}` (or `{"error": "..."}`). A request never carries a password, only the file the child
reads its own from: whatever the launcher held, every later fork would hold too. When its input
closes it stays to reap its children (so a service that exits is gone, not a zombie that `kill -0`
still finds) and exits after the last.

Each child is what `python -m services.tools.cli ARGS` would be: its own session (so a group signal
stops it with its Dask workers), or, with a request's `group` (a tenant's name, when a home has
several), its own process group in the session of that group's keeper: a fork of the launcher that
made a session for the group and forks its children. The kernel's scheduler shares CPU fairly
between sessions (autogroups), so a tenant with eight busy processes gets as much of the machine as
one with one busy process, not eight times as much (docs/TENANTS.md). Its output is appended to its
log, its environment is exactly `env` (credentials differ per service), and with `tied` it has the
parent-death signal on its parent (the launcher or a keeper, each tied to the one above, up to the
supervisor): a SIGKILLed `cairn up` still takes every service with it. Nothing in
the launcher starts a thread or an event loop before it forks, and it never runs a service's code.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import IO, Any

from services.platform.bus.embedded import PR_SET_PDEATHSIG
from services.tools.catalog import SERVICES
from services.tools.forks import PASSWORD_VARIABLE

PR_SET_NAME = 15

# What every forked process finds imported: the services, the endpoint, the command line, and the
# libraries the services import only when they first fit or load a model.
PRELOAD = (
    *(target.split(":")[0] for target in SERVICES.values()),
    "services.serving.app",
    "services.serving.launch",
    "services.tools.cli",
    "mlflow.tracking",
    "sklearn.ensemble",
    "sklearn.linear_model",
    "xgboost",
)


def preload(modules: tuple[str, ...] = PRELOAD) -> None:
    """Import what the children will need; a library that is not installed is imported (and its
    absence reported) by the child that needs it, as without the launcher."""
    for name in modules:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def child(
    request: dict[str, Any], channels: tuple[int, ...], launcher: int, new_session: bool = True
) -> None:
    """In the fork: become `python -m services.tools.cli ARGS` in a session of its own (or a process
    group of its own in its keeper's session); never returns."""
    code = 1
    try:
        if new_session:
            os.setsid()
        else:
            os.setpgid(0, 0)
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        # `top` and `ps -o comm` tell the services apart (their command lines are the launcher's)
        libc.prctl(PR_SET_NAME, ("cairn " + " ".join(request["args"][:2])).encode()[:15])
        if request.get("tied"):
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != launcher:  # the launcher died before prctl took effect
                os._exit(1)
        null = os.open(os.devnull, os.O_RDONLY)
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(null, 0)  # the request channel was stdin
        os.dup2(log, 1)
        os.dup2(log, 2)
        for fd in {null, log, *channels} - {0, 1, 2}:
            os.close(fd)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(request["env"])
        if password_file := request.get("password_file"):
            os.environ[PASSWORD_VARIABLE] = Path(password_file).read_text()
        _reread_environment()
        sys.argv = ["cairn", *request["args"]]
        from services.tools.cli import main

        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - a child must never return into the launcher's loop
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def _reread_environment() -> None:
    """Dask reads its DASK_* variables when it is imported, which was in the launcher."""
    if "dask" in sys.modules:
        import dask.config

        dask.config.refresh()


class Keeper:
    """A group's session: a fork of the launcher that called setsid() and serves the group's requests
    (`serve` with `new_session=False`), reaping its children; it ends after its last one."""

    def __init__(self, tied: bool, inherited: tuple[int, ...]):
        launcher = os.getpid()
        request_r, request_w = os.pipe()
        reply_r, reply_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setsid()
                if tied:
                    import ctypes

                    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
                    if os.getppid() != launcher:
                        os._exit(1)
                for fd in (*inherited, request_w, reply_r):
                    os.close(fd)
                serve(os.fdopen(request_r, "rb"), os.fdopen(reply_w, "wb"), new_session=False)
                code = 0
            except BaseException:  # noqa: BLE001 - a keeper must never return into the launcher's loop
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(request_r)
        os.close(reply_w)
        self.pid = pid
        self.requests, self.replies = os.fdopen(request_w, "wb"), os.fdopen(reply_r, "rb")
        self.ask(None)  # {"ready": pid}

    def fds(self) -> list[int]:
        return [self.requests.fileno(), self.replies.fileno()]

    def ask(self, line: bytes | None) -> dict[str, Any]:
        if line is not None:
            self.requests.write(line)
            self.requests.flush()
        answer = self.replies.readline()
        return json.loads(answer) if answer else {"error": f"the group's keeper (pid {self.pid}) exited"}

    def close(self) -> None:
        for stream in (self.requests, self.replies):
            with contextlib.suppress(OSError):
                stream.close()


def serve(requests: IO[bytes], replies: IO[bytes], new_session: bool = True) -> None:
    """Fork one child per request line until the input closes (a grouped one through its group's
    keeper), then reap them all."""
    launcher = os.getpid()
    channels = (requests.fileno(), replies.fileno())
    keepers: dict[str, Keeper] = {}
    replies.write(json.dumps({"ready": launcher}).encode() + b"\n")
    replies.flush()
    for line in requests:
        try:
            request = json.loads(line)
            # what a fork must close: the channels, and every keeper's pipes (a child holding one
            # would keep that keeper from seeing its input end)
            held = (*channels, *(fd for k in keepers.values() for fd in k.fds()))
            if new_session and (group := request.get("group")):
                if group not in keepers:
                    keepers[group] = Keeper(bool(request.get("tied")), held)
                reply: dict[str, Any] = keepers[group].ask(line)
            else:
                pid = os.fork()
                if pid == 0:
                    child(request, held, launcher, new_session)
                reply = {"pid": pid}
        except (ValueError, OSError) as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        replies.write(json.dumps(reply).encode() + b"\n")
        replies.flush()
    for keeper in keepers.values():
        keeper.close()  # each keeper reaps its own children, then exits; it is reaped below
    while True:
        try:
            os.wait()
        except ChildProcessError:
            return
        except InterruptedError:
            continue


def main() -> None:
    # Ctrl-C in `cairn up`'s terminal is the supervisor's to handle (it stops the services in
    # order); the launcher ends when its parent does (the parent-death signal) or its last child.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a library that prints does not write into the reply channel
    preload()
    serve(sys.stdin.buffer, replies)


if __name__ == "__main__":
    main()
