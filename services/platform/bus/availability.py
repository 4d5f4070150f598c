"""Wait for the bus a service needs: a reachable NATS and a provisioned stream, in any start order.

Services hold no stream-admin rights, so a missing stream is the operator's to create
(`cairn provision`); until then a service says so once and waits with backoff instead of dying.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from nats.js.errors import APIError, NoStreamResponseError, NotFoundError, ServiceUnavailableError

from services.platform.bus.connection import connect_once
from services.platform.settings import CairnSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

# JetStream's "no suitable peers for placement": a replicated stream or bucket cannot be placed
# because the meta leader counts too few peers online. Right after a cluster starts, or while a
# server restarts, that lasts seconds; with a server really down it lasts until it is back.
NO_PEERS_FOR_PLACEMENT = 10005


def busy_for_now(exc: BaseException, idempotent: bool = False) -> str | None:
    """Why JetStream refused, when the refusal is one a forming or healing cluster gives for
    seconds (a 503 while it elects a leader or catches up; no peers to place replicas on yet; no
    responders to a publish: only a stream's leader listens on its subjects, so between leaders
    nobody does; a reply not in time, when the call may run twice); None for any other error."""
    if idempotent and isinstance(exc, TimeoutError):
        return "no reply in time"
    if isinstance(exc, NoStreamResponseError):
        return "no stream answered (its leader being elected, or none provisioned for the subject)"
    if isinstance(exc, ServiceUnavailableError):
        return "JetStream temporarily unavailable"
    if isinstance(exc, APIError) and exc.err_code == NO_PEERS_FOR_PLACEMENT:
        return exc.description or "no suitable peers for placement"
    return None


async def jetstream_when_available(
    call: Callable[[], Awaitable[T]],
    patience_s: float = 30.0,
    on_wait: Callable[[str], None] | None = None,
    idempotent: bool = False,
) -> T:
    """`call()`, again while JetStream is busy for now (`busy_for_now`): a cluster electing a
    leader, a server catching up after a partition healed, peers not yet counted online are
    seconds, not a failure. `on_wait` hears each new reason once; after `patience_s` the last
    refusal is raised. `idempotent`: `call()` may run twice (a publish under its Nats-Msg-Id), so a
    reply that did not come in time is one more reason to call again."""
    deadline, delay, said = time.monotonic() + patience_s, 0.25, None
    while True:
        try:
            return await call()
        except (APIError, NoStreamResponseError, TimeoutError) as exc:
            why = busy_for_now(exc, idempotent)
            if why is None or time.monotonic() > deadline:
                raise
            if on_wait is not None and why != said:
                on_wait(why)
            said = why
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def publish_when_available(
    js: Any,
    subject: str,
    body: bytes,
    headers: dict[str, str],
    patience_s: float,
    on_wait: Callable[[str], None] | None = None,
    **options: Any,
) -> Any:
    """A JetStream publish (`headers` must carry its Nats-Msg-Id), sent again while the stream is
    between leaders (no responders: only a clustered stream's leader listens on its subjects) or
    its PubAck is late; the stream stores it once under its id. Returns the PubAck."""
    return await jetstream_when_available(
        lambda: js.publish(subject, body, headers=headers, **options), patience_s, on_wait, idempotent=True
    )


async def stream_state(settings: CairnSettings, who: str) -> str | None:
    """None when the stream is there; otherwise one line saying what is missing and what to do."""
    url = settings.resolved_nats_url()
    try:
        nc = await connect_once(settings, f"{who}-boot")
    except Exception as exc:  # noqa: BLE001 - nats-py raises several kinds for "nobody there"
        return f"cannot reach NATS at {url} ({type(exc).__name__}); waiting for it"
    try:
        await nc.jetstream().stream_info(settings.stream)
    except NotFoundError:
        return f"stream {settings.stream} not found: run `cairn provision`; waiting for it"
    finally:
        await nc.close()
    return None


async def wait_for_stream(settings: CairnSettings, who: str, max_delay: float = 10.0) -> None:
    """Return once the stream exists; log each new reason for waiting once, back off up to max_delay."""
    delay, said = 0.25, None
    while (problem := await stream_state(settings, who)) is not None:
        if problem != said:
            log.warning("%s: %s", who, problem)
            said = problem
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_delay)
    if said is not None:
        log.warning("%s: stream %s is there; starting", who, settings.stream)
