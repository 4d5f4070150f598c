"""Real parts only: a nats-server from the wheel per test (free port), MLflow on SQLite, Dask
LocalCluster. Helpers wait on events with timeouts, never on sleeps."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import psycopg
import pytest
from nats.js.api import DeliverPolicy
from psycopg import sql

from contracts import Envelope, decode
from services.platform.bus.connection import connect
from services.platform.bus.embedded import EmbeddedNats
from services.platform.bus.provision import provision_all
from services.platform.settings import CairnSettings
from services.tools.supervisor import free_port

pytest_plugins = ("tests.module_order",)


@pytest.fixture
def nats_server(tmp_path: Path):
    server = EmbeddedNats(tmp_path / "nats")
    server.start()
    yield server
    server.stop()


def make_settings(url: str, workspace: Path, **overrides: Any) -> CairnSettings:
    """Settings for a test system: cairn's home is `workspace/home`; data the test writes goes in
    `data_dir(settings)` (the workspace), beside the home and never in it, as on a real machine."""
    base: dict[str, Any] = {
        "home": workspace / "home",
        "nats_url": url,
        "ack_wait_s": 3.0,
        "retry_backoff_s": [0.2, 0.5],
        "max_deliver": 3,
        "allowed_roots": [str(workspace)],
        "serve_port": 0,
    }
    return CairnSettings(**{**base, **overrides})


def data_dir(settings: CairnSettings) -> Path:
    """Where a test keeps its data files: readable by ingestion, outside cairn's home."""
    return Path(settings.allowed_roots[0])


@pytest.fixture
def settings(nats_server: EmbeddedNats, tmp_path: Path) -> CairnSettings:
    return make_settings(nats_server.url, tmp_path)


@pytest.fixture
async def js(settings: CairnSettings):
    nc = await connect(settings, "test")
    jsc = nc.jetstream()
    await provision_all(jsc, settings)
    yield jsc
    await nc.close()


def env_for(settings: CairnSettings) -> dict[str, str]:
    """The same settings as CAIRN_ variables, for service subprocesses."""
    return settings.to_env()


async def collect(
    js: Any,
    subject: str,
    done: Callable[[list[Any]], bool],
    timeout: float = 30.0,
) -> list[Any]:
    """Read the stream from the start until `done(messages)` holds; fail on timeout."""
    sub = await js.subscribe(subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    seen: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while not done(seen):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout}s on {subject}; saw {len(seen)} messages")
            try:
                seen.append(await sub.next_msg(timeout=min(left, 2.0)))
            except TimeoutError:
                continue
    finally:
        await sub.unsubscribe()
    return seen


def events_of(msgs: list[Any]) -> list[Envelope[Any]]:
    return [decode(m.data) for m in msgs if ".dlq." not in m.subject]


async def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll an async or sync predicate until truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


# --- PostgreSQL: the suite's own private server ------------------------------------------------
# pytest-postgresql does not fit: it runs pg_ctl as the current user (PostgreSQL refuses root, and
# the plugin has no run-as option) and keeps its data under pytest's root-only basetemp. So this
# starts the cluster itself with initdb/pg_ctl, as the `postgres` OS user when the suite runs as root.


@dataclass(frozen=True)
class PostgresServer:
    """A private PostgreSQL cluster: superuser `postgres`, trust auth, TCP on 127.0.0.1 only."""

    host: str
    port: int
    user: str = "postgres"

    def url(self, dbname: str) -> str:
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{dbname}"

    def admin(self) -> psycopg.Connection:
        return psycopg.connect(
            host=self.host, port=self.port, user=self.user, dbname="postgres", autocommit=True
        )


def missing_system_dependency(what: str, module: bool = False) -> NoReturn:
    """A test that cannot run without a system package: a skip on a developer's machine, a failure
    under CI=true, so that a green run never hides a path nobody tested (`make install` brings them)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"missing system dependency (CI does not pass by skipping): {what}", pytrace=False)
    pytest.skip(f"missing system dependency: {what}", allow_module_level=module)


def find_pg_ctl() -> str | None:
    """pg_ctl on PATH, else the newest Debian/Ubuntu install (/usr/lib/postgresql/N/bin, off PATH)."""
    if found := shutil.which("pg_ctl"):
        return found
    versions = [p for p in Path("/usr/lib/postgresql").glob("*/bin/pg_ctl") if p.parts[-3].isdigit()]
    return str(max(versions, key=lambda p: int(p.parts[-3]))) if versions else None


@pytest.fixture(scope="session")
def postgresql_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL for the whole session, in its own temp dir on a free port.

    Never the machine's server on 5432. Durability is off (fsync=off): it holds test data only.
    Without PostgreSQL binaries (or, as root, a `postgres` user) it skips, and fails under CI.
    """
    pg_ctl = find_pg_ctl()
    if pg_ctl is None:
        missing_system_dependency(
            "no PostgreSQL binaries: pg_ctl is neither on PATH nor in /usr/lib/postgresql/*/bin "
            "(Debian's postgresql; `make install` installs it)"
        )
    owner: dict[str, Any] = {}
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            missing_system_dependency(
                "running as root and there is no `postgres` OS user to own a PostgreSQL server "
                "(Debian's postgresql package makes it)"
            )
        owner = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    base = Path(tempfile.mkdtemp(prefix="cairn-pg-"))  # not pytest's basetemp: root-only, 0700
    data, log = base / "data", base / "postgres.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}

    def pg(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [pg_ctl, *args], cwd=base, env=env, capture_output=True, text=True, timeout=120, **owner
        )

    started = False
    try:
        if owner:
            os.chown(base, owner["user"], owner["group"])
        init = pg("initdb", "-s", "-D", str(data), "-o", "-A trust -U postgres -E UTF8 --locale=C --no-sync")
        assert init.returncode == 0, f"initdb failed: {init.stderr}"
        for _ in range(5):  # a free port can be taken before postgres binds it: try another
            port = free_port()
            options = (
                f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            )
            if pg("start", "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", options).returncode == 0:
                started = True
                break
        assert started, f"PostgreSQL did not start; log:\n{log.read_text() if log.exists() else ''}"
        yield PostgresServer("127.0.0.1", port)
    finally:
        if started:
            pg("stop", "-D", str(data), "-m", "fast", "-w", "-t", "60")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgresql_url(postgresql_server: PostgresServer) -> Iterator[str]:
    """SQLAlchemy URL (`postgresql+psycopg://postgres@127.0.0.1:<port>/<db>`) of a fresh, empty database.

    One new database per test on the session's private server (`postgresql_server`): user
    `postgres`, no password (trust auth), TCP only, so it can be handed as is to anything that
    takes a SQLAlchemy URL, `mlflow server --backend-store-uri` included, and to subprocesses.
    After the test the database is dropped WITH (FORCE), which also cuts connections a
    subprocess still holds; stop such a process first anyway. Skips (with the reason) where no
    PostgreSQL binaries exist.
    """
    dbname = f"test_{uuid.uuid4().hex[:12]}"
    with postgresql_server.admin() as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    try:
        yield postgresql_server.url(dbname)
    finally:
        with postgresql_server.admin() as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))


@pytest.fixture(scope="module")
def retention_system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One `cairn up` on a fresh home for the cache and gc journeys (tests/test_cache.py, test_gc.py).

    Per module: `make test`'s workers take whole modules, so the two modules rarely share a worker,
    and a session-wide `cairn up` would idle on its worker until the very end.

    A gate margin no challenger can beat: a model's first run deploys, a different model after it
    ends at the gate, and the champion's own bytes are confirmed (so which run is champion is fixed)."""
    from tests.test_journeys import Up, user_env

    root = tmp_path_factory.mktemp("retention")
    up = Up(root / "home", cwd=root, CAIRN_GATE_MARGIN="5")
    try:
        health = up.wait_up()["health"]
        yield {"root": root, "home": root / "home", "env": user_env(root / "home"), "health": health}
    finally:
        up.proc.terminate()
        try:
            up.proc.wait(60)
        except subprocess.TimeoutExpired:
            up.kill_all()
