"""Publishing events into the stream: Nats-Msg-Id is the event id, so retries deduplicate."""

from __future__ import annotations

from typing import Any

from faststream.nats import NatsBroker

from contracts import CONTENT_TYPE, Envelope, subject_for
from services.settings import CairnSettings


def event_headers(event: Envelope[Any]) -> dict[str, str]:
    return {"Nats-Msg-Id": event.id, "content-type": CONTENT_TYPE, "ce-type": event.type}


class EventPublisher:
    """Publishes envelopes and waits for the stream's PubAck: an event is either stored or an error."""

    def __init__(self, broker: NatsBroker, settings: CairnSettings):
        self.broker = broker
        self.settings = settings

    def subject(self, event: Envelope[Any]) -> str:
        return subject_for(event.type, self.settings.namespace)

    async def publish(self, event: Envelope[Any]) -> Any:
        return await self.broker.publish(
            event.encode(),
            subject=self.subject(event),
            headers=event_headers(event),
            stream=self.settings.stream,
            timeout=10.0,
        )

    def max_payload(self) -> int:
        """The server's max_payload (8 MB for the embedded server); 1 MB, NATS' default, if unknown."""
        connection = self.broker.config.connection_state.connection
        return int(getattr(connection, "max_payload", 0) or 1024 * 1024)

    async def publish_raw(self, body: bytes, subject: str, headers: dict[str, str]) -> Any:
        return await self.broker.publish(
            body, subject=subject, headers=headers, stream=self.settings.stream, timeout=10.0
        )
