"""Real parts only: a nats-server from the wheel per test (free port), MLflow on SQLite, Dask
LocalCluster. Helpers wait on events with timeouts, never on sleeps."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nats.js.api import DeliverPolicy

from contracts import Envelope, decode
from services.bus.connection import connect
from services.bus.embedded import EmbeddedNats
from services.bus.provision import provision_all
from services.settings import CairnSettings

TERMINAL = {
    "cairn.model.deployed.v1",
    "cairn.data.rejected.v1",
    "cairn.event.rejected.v1",
    "cairn.deployment.failed.v1",
}


@pytest.fixture
def nats_server(tmp_path: Path):
    server = EmbeddedNats(tmp_path / "nats")
    server.start()
    yield server
    server.stop()


def make_settings(url: str, home: Path, **overrides: Any) -> CairnSettings:
    base: dict[str, Any] = {
        "home": home,
        "nats_url": url,
        "ack_wait_s": 3.0,
        "retry_backoff_s": [0.2, 0.5],
        "max_deliver": 3,
        "allowed_roots": [str(home)],
        "serve_port": 0,
    }
    return CairnSettings(**{**base, **overrides})


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
    return {
        "CAIRN_HOME": str(settings.home),
        "CAIRN_NATS_URL": settings.nats_url or "",
        "CAIRN_ACK_WAIT_S": str(settings.ack_wait_s),
        "CAIRN_RETRY_BACKOFF_S": json.dumps(settings.retry_backoff_s),
        "CAIRN_MAX_DELIVER": str(settings.max_deliver),
        "CAIRN_ALLOWED_ROOTS": json.dumps(settings.allowed_roots),
    }


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
