"""The supervisor's handle on the launcher (`python -m services.tools.cli.launcher`): a process that
imported the services' libraries once and forks each child `cairn up` starts. Its protocol is JSON
lines over the launcher's stdin and stdout; see that module for why and what a fork becomes.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from services.platform.bus.embedded import die_with_parent

PASSWORD_VARIABLE = "CAIRN_NATS_PASSWORD"  # set in the child from its file, never sent


def available() -> bool:
    """Fork without exec only on Linux: after macOS frameworks load it is unsafe."""
    return sys.platform.startswith("linux")


class LauncherError(RuntimeError):
    pass


class Launcher:
    """The supervisor's handle on a launcher process: `spawn` children, then `close` (it reaps them)."""

    def __init__(self, process: subprocess.Popen[bytes], log_path: Path):
        self.process = process
        self.log_path = log_path
        self.ready = False

    @classmethod
    def start(cls, env: dict[str, str], log_path: Path, tied: bool) -> Launcher:
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "services.tools.cli.launcher"],
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
                preexec_fn=die_with_parent() if tied else None,  # noqa: PLW1509
            )
        return cls(process, log_path)  # importing, while the supervisor starts NATS and provisions

    def spawn(
        self,
        args: list[str],
        env: dict[str, str],
        log_path: Path,
        tied: bool,
        password_file: Path | None = None,
        group: str | None = None,
    ) -> int:
        """Fork `python -m services.tools.cli ARGS` with exactly `env` (and CAIRN_NATS_PASSWORD read
        from `password_file` in the child), in `group`'s session when given; its pid."""
        if not self.ready:
            self._reply()  # {"ready": pid}: its imports are done
            self.ready = True
        request = {"args": args, "env": env, "log": str(log_path), "tied": tied}
        if password_file is not None:
            request["password_file"] = str(password_file)
        if group is not None:
            request["group"] = group
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request).encode() + b"\n")
        self.process.stdin.flush()
        reply = self._reply()
        if "pid" not in reply:
            raise LauncherError(f"the launcher could not start {' '.join(args)}: {reply.get('error')}")
        return int(reply["pid"])

    def close(self) -> None:
        """No more children: the launcher stays only to reap the ones it has."""
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def _reply(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            raise LauncherError(
                f"the launcher exited (code {code}) before it answered; see {self.log_path} "
                "(CAIRN_PRELOAD=false starts each process in its own interpreter)"
            )
        return json.loads(line)
