"""Wait for the bus a service needs: a reachable NATS and a provisioned stream, in any start order.

Services hold no stream-admin rights, so a missing stream is the operator's to create
(`cairn provision`); until then a service says so once and waits with backoff instead of dying.
"""

from __future__ import annotations

import asyncio
import logging

from nats.js.errors import NotFoundError

from services.platform.bus.connection import connect_once
from services.platform.settings import CairnSettings

log = logging.getLogger(__name__)


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
