"""`cairn up` forks its processes from one launcher that imported their libraries once
(services.tools.cli.launcher), and CAIRN_PRELOAD=false gives each its own interpreter; through the
`cairn` executable on a fresh home.

What a fork must still be: each service in a session of its own (a group signal reaches its Dask
workers and nothing else), named in `ps -o comm`, reaped as soon as it dies (a zombie would still
answer `kill -0` and look alive to `cairn status` and `cairn down`), and, the foreground `cairn up`
SIGKILLed, gone with it (tests/test_journeys.py). What each holds in memory is checked in
tests/test_local_privilege.py.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import psutil
import pytest

from tests.test_journeys import cairn, running, user_env, wait_until

pytestmark = pytest.mark.slow
SERVICES = ("ingestion", "features", "tuning", "training", "evaluation", "deployment", "lineage")


@pytest.mark.parametrize("preload", [True, False])
def test_up_forks_from_one_launcher_that_reaps_and_without_it_each_is_its_own_interpreter(
    tmp_path: Path, preload: bool
) -> None:
    home = tmp_path / "home"
    env = user_env(home, CAIRN_SERVE_PORT="0", CAIRN_DASK_WORKERS="1", CAIRN_PRELOAD=str(preload).lower())
    started = cairn("up", "--detach", "--timeout", "240", env=env, cwd=tmp_path, timeout=300)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        runtime = json.loads((home / "runtime.json").read_text())
        pids = {name: pid for name, pid in runtime["pids"].items() if name != "nats-server"}
        assert set(pids) == {*SERVICES, "serve"}
        procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        for name, proc in procs.items():
            assert os.getsid(proc.pid) == proc.pid, f"{name} does not lead a session of its own"
        parents = {proc.ppid() for proc in procs.values()}
        if preload:
            (launcher,) = parents
            assert psutil.Process(launcher).cmdline()[-2:] == ["-m", "services.tools.cli.launcher"]
            for name in SERVICES:
                assert procs[name].name() == f"cairn run {name}"[:15], procs[name].name()
        else:
            for name in SERVICES:
                assert procs[name].cmdline()[-2:] == ["run", name], procs[name].cmdline()

        victim = procs["evaluation"]
        os.killpg(victim.pid, signal.SIGKILL)
        wait_until(lambda: not Path(f"/proc/{victim.pid}").exists(), 30, "the killed service to be reaped")
    finally:
        stopped = cairn("down", env=env, cwd=tmp_path, timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert f"evaluation (pid {victim.pid}): gone, not signalled" in stopped.stdout, stopped.stdout
    left = [p.name() for p in running(list(procs.values()))]
    assert not left, f"still running after `cairn down`: {left}"
