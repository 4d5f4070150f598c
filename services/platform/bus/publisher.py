"""Publishing events into the stream: Nats-Msg-Id is the event id, so retries deduplicate.

Straight through nats-py's JetStream context on the broker's connection: FastStream's publish
path (its message object and middleware chain per call) cost more CPU than the publish itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Any

from faststream.nats import NatsBroker
from nats.js.api import Header

from contracts import CONTENT_TYPE, Envelope, subject_for
from services.platform.bus.acks import PubAcks
from services.platform.settings import CairnSettings

PUBLISH_TIMEOUT_S = 10.0
WINDOW = 256  # PubAcks outstanding per publishing step


def event_headers(event: Envelope[Any]) -> dict[str, str]:
    return {"Nats-Msg-Id": event.id, "content-type": CONTENT_TYPE, "ce-type": event.type}


class EventPublisher:
    """Publishes envelopes and waits for the stream's PubAck: an event is either stored or an error."""

    def __init__(self, broker: NatsBroker, settings: CairnSettings):
        self.broker = broker
        self.settings = settings
        self._acks: PubAcks | None = None

    @property
    def acks(self) -> PubAcks:
        """Opened on first use, on the broker's connection (which exists only once it started)."""
        connection = self.broker.config.connection_state.connection
        if self._acks is None or self._acks.connection is not connection:
            self._acks = PubAcks(connection, PUBLISH_TIMEOUT_S)
        return self._acks

    def subject(self, event: Envelope[Any]) -> str:
        return subject_for(event.type, self.settings.namespace)

    async def publish(self, event: Envelope[Any]) -> Any:
        return await self.publish_raw(event.encode(), self.subject(event), event_headers(event))

    async def publish_async(self, event: Envelope[Any], body: bytes | None = None) -> asyncio.Future[Any]:
        """Send now, PubAck later: the future is for `gathered`. `body`: the event already encoded."""
        return await self.send(self.subject(event), body or event.encode(), event_headers(event))

    async def send(self, subject: str, body: bytes, headers: dict[str, str]) -> asyncio.Future[Any]:
        """Any message into the stream (expected by name), its PubAck as a future."""
        return await self.acks.send(
            subject, body, {**headers, Header.EXPECTED_STREAM.value: self.settings.stream}
        )

    async def gathered(self, acks: Sequence[asyncio.Future[Any]]) -> list[Any]:
        """Every PubAck, or the first error; bounded (PubAcks fails a reply that never came after
        PUBLISH_TIMEOUT_S), so a lost reply fails the attempt, which is retried."""
        try:
            return [await ack for ack in acks]
        finally:
            _settle(acks)

    async def publish_all(
        self,
        events: Sequence[Envelope[Any]],
        bodies: Sequence[bytes] | None = None,
        waiting: Iterable[asyncio.Future[Any]] = (),
    ) -> None:
        """Publish in order with at most WINDOW PubAcks outstanding, then wait for all of them
        (and for `waiting`, sent before): a step that emits 10,000 events (a study's trial
        requests) must not have them all waiting on an fsync'ing server at once, past the timeout."""
        acks = list(waiting)
        try:
            for i, event in enumerate(events):
                if len(acks) >= WINDOW:
                    await acks[len(acks) - WINDOW]
                acks.append(await self.publish_async(event, bodies[i] if bodies else None))
            for ack in acks:
                await ack
        finally:
            _settle(acks)

    def max_payload(self) -> int:
        """The server's max_payload (8 MB for the embedded server); 1 MB, NATS' default, if unknown."""
        connection = self.broker.config.connection_state.connection
        return int(getattr(connection, "max_payload", 0) or 1024 * 1024)

    async def publish_raw(self, body: bytes, subject: str, headers: dict[str, str]) -> Any:
        (ack,) = await self.gathered([await self.send(subject, body, headers)])
        return ack


def _settle(acks: Sequence[asyncio.Future[Any]]) -> None:
    """After a failure: stop waiting for the rest, and mark failures already in as seen."""
    for ack in acks:
        if not ack.done():
            ack.cancel()
        elif not ack.cancelled():
            ack.exception()
