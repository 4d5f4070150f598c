"""Least privilege on one host, and stopping only what was started, through the `cairn` executable.

`cairn up --detach` on a fresh home: its nats-server admits only the users of operator mode
(services.tools.nats_auth), each child holds its own user's password only, the CLI finds the right user in
the home, health and metrics listen on loopback. `cairn down` signals a recorded pid only while the
process is the one `cairn up` started (a planted `sleep` stands for a pid reused after a reboot).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import numpy as np
import psutil
import pytest

from tests.test_journeys import FAST_TABLE, cairn, running, user_env, wait_until, write_table

pytestmark = pytest.mark.slow
SERVICES = ("ingestion", "features", "tuning", "training", "evaluation", "deployment", "lineage")


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """One detached `cairn up` on a fresh home; the test user's environment has no NATS variable."""
    root = tmp_path_factory.mktemp("local-privilege")
    home = root / "home"
    env = user_env(home, CAIRN_SERVE_PORT="0", CAIRN_DASK_WORKERS="1")
    started = cairn("up", "--detach", "--timeout", "240", env=env, cwd=root, timeout=300)
    assert started.returncode == 0, started.stdout + started.stderr
    runtime = json.loads((home / "runtime.json").read_text())
    procs = [psutil.Process(p) for p in runtime["pids"].values()]
    try:
        yield {"root": root, "home": home, "env": env, "runtime": runtime, "procs": procs}
    finally:
        cairn("down", env=env, cwd=root, timeout=60)
        for p in running(procs):
            p.kill()


def secrets_of(home: Path) -> dict[str, str]:
    return json.loads((home / "nats-auth" / "secrets.json").read_text())


class Errors:
    """What the server told a client (-ERR lines: authorization and permission violations)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def record(self, err: Exception) -> None:
        self.seen.append(f"{type(err).__name__}: {err}")

    async def wait_for(self, text: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(text.lower() in s.lower() for s in self.seen):
            assert time.monotonic() < deadline, f"the server never said {text!r}: {self.seen}"
            await asyncio.sleep(0.05)


async def attempt(url: str, **auth: str) -> tuple[Exception | None, Errors]:
    """One connection attempt, no retry: the exception it ended with (None: it was let in)."""
    errors = Errors()
    try:
        nc = await nats.connect(
            url,
            allow_reconnect=False,
            max_reconnect_attempts=0,
            connect_timeout=3,
            error_cb=errors.record,
            **auth,
        )
    except Exception as exc:  # noqa: BLE001 - nats-py raises several kinds for one refusal
        return exc, errors
    await nc.close()
    return None, errors


async def as_user(url: str, user: str, password: str) -> tuple[nats.NATS, Errors]:
    errors = Errors()
    nc = await nats.connect(
        url,
        user=user,
        password=password,
        inbox_prefix=f"_INBOX_{user}",
        error_cb=errors.record,
        connect_timeout=3,
    )
    return nc, errors


# Item 3: least privilege ------------------------------------------------------------------------
async def test_without_the_right_password_nothing_connects(local: dict) -> None:
    url, home = local["runtime"]["nats_url"], local["home"]
    refused, _ = await attempt(url)
    assert refused is not None, "a process without credentials was let in"
    assert "authorization" in f"{type(refused).__name__} {refused}".lower(), repr(refused)
    for user in ("admin", "ingestion", "nobody"):
        refused, _ = await attempt(url, user=user, password="not-the-password-" + user)
        assert refused is not None, f"{user} with a wrong password was let in"
    assert (await attempt(url, user="admin", password=secrets_of(home)["admin"]))[0] is None
    log = (home / "nats" / "nats-server.log").read_text()
    assert log.count("authentication error") >= 4, "each refusal is in the server log"


async def test_a_stolen_service_password_publishes_and_reads_only_that_services_subjects(local: dict) -> None:
    url, passwords = local["runtime"]["nats_url"], secrets_of(local["home"])
    nc, errors = await as_user(url, "ingestion", passwords["ingestion"])
    try:
        js = nc.jetstream()
        with pytest.raises(nats.errors.TimeoutError):
            await js.publish("cairn.model.deployed.v1", b"{}", timeout=1)
        await errors.wait_for('Permissions Violation for Publish to "cairn.model.deployed.v1"')
        await nc.subscribe("cairn.>")
        await errors.wait_for('Permissions Violation for Subscription to "cairn.>"')
    finally:
        await nc.close()
    # The CLI's reader reads the log but publishes no event, and cannot re-point a service's durable
    # through the ephemeral-consumer subject it may use.
    reader, errors = await as_user(url, "reader", passwords["reader"])
    admin, _ = await as_user(url, "admin", passwords["admin"])
    try:
        with pytest.raises(nats.errors.TimeoutError):
            await reader.jetstream().publish("cairn.data.arrived.v1", b"{}", timeout=1)
        await errors.wait_for('Permissions Violation for Publish to "cairn.data.arrived.v1"')
        durable = next(
            c.name for c in await admin.jetstream().consumers_info("CAIRN") if c.name.startswith("training")
        )
        before = (await admin.jetstream().consumer_info("CAIRN", durable)).config.filter_subject
        hijack = {
            "stream_name": "CAIRN",
            "config": {"name": durable, "filter_subject": "cairn.>", "ack_policy": "explicit"},
        }
        reply = await reader.request("$JS.API.CONSUMER.CREATE.CAIRN", json.dumps(hijack).encode(), timeout=5)
        assert "error" in json.loads(reply.data), reply.data
        after = (await admin.jetstream().consumer_info("CAIRN", durable)).config.filter_subject
        assert after == before != "cairn.>"
        stored = await admin.jetstream().stream_info("CAIRN", subjects_filter="cairn.model.deployed.v1")
        assert not stored.state.subjects, "a refused publish was stored"
    finally:
        await reader.close()
        await admin.close()


def test_each_child_holds_only_its_own_password(local: dict) -> None:
    """Read as an attacker who can read one service's memory would (the same user, or a disclosure
    bug): its writable memory and its environment hold its own password and nobody else's. The
    services are forked from one launcher (CAIRN_PRELOAD), which must never have held a password:
    every later fork would have inherited it."""
    passwords = secrets_of(local["home"])
    for name, pid in local["runtime"]["pids"].items():
        if name == "nats-server":
            continue
        user = "serve" if name == "serve" else name
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        in_environ = {u for u, p in passwords.items() if p.encode() in environ}
        assert in_environ <= {user}, f"{name}'s environment holds the passwords of {in_environ}"
        held = in_memory(pid, passwords)
        assert held == {user}, f"{name}'s memory holds the passwords of {held}"


def in_memory(pid: int, passwords: dict[str, str]) -> set[str]:
    """Whose passwords are anywhere in the process's writable memory (heap, stacks, anonymous maps).
    Only pages present in memory or swapped out are read (/proc/PID/pagemap): a page never touched
    holds zeros, and a service reserves gigabytes it never touches."""
    needles = {user: password.encode() for user, password in passwords.items()}
    found: set[str] = set()
    page = os.sysconf("SC_PAGE_SIZE")
    with (
        open(f"/proc/{pid}/mem", "rb", buffering=0) as mem,
        open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pagemap,
    ):
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            fields = line.split()
            if not fields[1].startswith("rw") or fields[-1] in ("[vvar]", "[vsyscall]"):
                continue
            start, end = (int(a, 16) for a in fields[0].split("-"))
            pagemap.seek(start // page * 8)
            entries = np.frombuffer(pagemap.read((end - start) // page * 8), dtype=np.uint64)
            used = np.concatenate(([0], ((entries >> np.uint64(62)) != 0).astype(np.int8), [0]))
            edges = np.flatnonzero(np.diff(used))  # where runs of used pages begin and end
            for first, last in zip(edges[::2], edges[1::2], strict=True):
                try:
                    mem.seek(start + int(first) * page)
                    region = mem.read(int(last - first) * page)
                except OSError:
                    continue
                found |= {user for user, needle in needles.items() if needle in region}
    return found


def test_credentials_are_readable_by_their_owner_only(local: dict) -> None:
    auth = local["home"] / "nats-auth"
    assert stat.S_IMODE(auth.stat().st_mode) == 0o700
    for name in ("secrets.json", "auth.conf"):
        assert stat.S_IMODE((auth / name).stat().st_mode) == 0o600, name
    assert set(secrets_of(local["home"])) >= {*SERVICES, "serve", "upstream", "reader", "admin"}


def _listening(procs: list[psutil.Process]) -> list[tuple[str, str, int]]:
    """Every listening TCP socket of these processes and their descendants (Dask workers, uvicorn's)."""
    tree = {p.pid: p for p in procs}
    for p in procs:
        tree |= {c.pid: c for c in p.children(recursive=True)}
    out = []
    for p in tree.values():
        try:
            conns = p.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        out += [(p.name(), c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return out


def _outside_addresses() -> list[str]:
    """This host's IPv4 addresses other than loopback."""
    return [
        a.address
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family == socket.AF_INET and not a.address.startswith("127.")
    ]


def test_health_metrics_and_nats_listen_on_loopback_only(local: dict) -> None:
    listening = _listening(local["procs"])
    health_ports = {int(u.rsplit(":", 1)[1]) for u in local["runtime"]["health"].values()}
    assert health_ports <= {port for _, _, port in listening}, "every health port is listening"
    assert [sock for sock in listening if sock[1] != "127.0.0.1"] == []
    for address in _outside_addresses():
        for port in health_ports:
            with socket.socket() as s:
                s.settimeout(2)
                assert s.connect_ex((address, port)) != 0, f"health port {port} answers on {address}"


def test_the_cli_finds_its_user_in_the_home_and_a_run_deploys(local: dict) -> None:
    env, root = local["env"], local["root"]
    assert "CAIRN_NATS_USER" not in env and "CAIRN_NATS_PASSWORD" not in env
    wait_until(
        lambda: cairn("status", env=env, cwd=root, timeout=60).returncode == 0, 180, "all consumers live"
    )
    provisioned = cairn("provision", env=env, cwd=root)
    assert provisioned.returncode == 0, provisioned.stderr
    data = write_table(root / "data")
    run = cairn(
        "submit", str(data), "--target", "price", *FAST_TABLE, "--wait", "--timeout", "300",
        env=env, cwd=root, timeout=330,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    listing = cairn("events", env=env, cwd=root)
    assert listing.returncode == 0, listing.stderr
    deployed = [line for line in listing.stdout.splitlines() if "cairn.model.deployed.v1" in line][-1]
    lineage = cairn("lineage", deployed.split()[3], env=env, cwd=root)
    assert lineage.returncode == 0 and "cairn.data.arrived.v1" in lineage.stdout, lineage.stderr
    log = (local["home"] / "nats" / "nats-server.log").read_text().splitlines()
    refused = [line for line in log if "Violation" in line and ":cairn-" in line]
    assert refused == [], refused[:5]  # no cairn process (services, endpoint, CLI) needed more


def test_down_stops_what_up_started(local: dict) -> None:
    stopped = cairn("down", env=local["env"], cwd=local["root"], timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    assert "gone" not in stopped.stdout and "nats-server" in stopped.stdout, stopped.stdout
    wait_until(lambda: not running(local["procs"]), 30, "every child to exit after `cairn down`")


# Item 4: stop only what you started -------------------------------------------------------------
def test_down_never_signals_a_pid_it_did_not_start(tmp_path: Path) -> None:
    """A runtime file left behind across a reboot: its pids now belong to unrelated processes (here
    `sleep`s, each leading its own process group as `cairn up`'s children do)."""
    home = tmp_path / "home"
    home.mkdir()
    strangers = [
        subprocess.Popen(["sleep", "300"], start_new_session=True, stdout=subprocess.DEVNULL)
        for _ in range(3)
    ]
    try:
        child, nats_server, supervisor = (p.pid for p in strangers)
        reborn = {  # what cairn recorded of the pid's process before the reboot
            "boot": "00000000-0000-0000-0000-000000000000",
            "start": 1234,
            "cmdline": ["python", "-m", "services.tools.cli", "run", "training"],
        }
        runtime = {
            "pids": {"training": child, "nats-server": nats_server},
            "supervisor": supervisor,
            "identities": {str(child): reborn, str(supervisor): reborn},  # nats-server: an older file, none
            "nats_url": "nats://127.0.0.1:9",
        }
        (home / "runtime.json").write_text(json.dumps(runtime))
        result = cairn("down", env=user_env(home), cwd=tmp_path, timeout=60)
        assert result.returncode == 0, result.stderr
        assert [p.poll() for p in strangers] == [None] * 3, "an unrelated process was signalled"
        for name, pid in (("training", child), ("nats-server", nats_server)):
            assert re.search(rf"{name} \(pid {pid}\): gone, not signalled", result.stdout), result.stdout
        assert "stopped: nothing was running" in result.stdout
        assert not (home / "runtime.json").exists()
    finally:
        for p in strangers:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
