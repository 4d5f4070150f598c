"""The one consumer policy every service uses.

- Durable *pull* consumer, shared by every replica of the service (work is split, not copied).
- Manual acknowledgement: FastStream's NATS default (REJECT_ON_ERROR) would terminate a message
  on any exception; here a failure is retried with a delay instead.
- A long step renews its lease with in-progress acks, so ack wait can stay short for crashes.
- Bounded attempts: past `max_deliver` (also after crashes, which the server counts) the message
  is dead-lettered on `cairn.dlq.<service>` with a rejection event naming the reason. The server's
  own MaxDeliver is unlimited so that nothing is ever silently left behind.
- Invalid payloads are dead-lettered at once: no retry can fix them.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from faststream.middlewares import AckPolicy
from faststream.nats import JStream, NatsBroker, NatsMessage, PullSub
from nats.js.api import AckPolicy as JsAckPolicy
from nats.js.api import ConsumerConfig, DeliverPolicy
from pydantic import BaseModel

from contracts import (
    ContractError,
    Envelope,
    EventRejected,
    dead_letter_subject,
    decode,
    event_type_of,
    new_event,
    subject_for,
)
from contracts.types import ArtifactRef, Contract
from services.artifacts import IntegrityError
from services.bus.connection import inbox_prefix
from services.bus.metrics import ServiceMetrics
from services.bus.publisher import EventPublisher
from services.settings import CairnSettings

log = logging.getLogger(__name__)


class PermanentError(Exception):
    """Input no retry can fix. `event` is the domain rejection to publish (else EventRejected)."""

    def __init__(self, reason: str, problems: Sequence[str] = (), event: Contract | None = None):
        super().__init__(reason)
        self.reason = reason
        self.problems = list(problems)
        self.event = event


@dataclass
class Delivery:
    """What a handler may know about a message besides its content."""

    attempt: int
    stream_sequence: int | None
    message: NatsMessage = field(repr=False)

    @property
    def redelivered(self) -> bool:
        return self.attempt > 1

    async def in_progress(self) -> None:
        await self.message.in_progress()


Handler = Callable[[Envelope[Any], Delivery], Awaitable[Sequence[Envelope[Any]]]]


def durable_name(service: str, payload_cls: type[Contract], namespace: str) -> str:
    """`<service>-<event>`; replays get their own consumers so they never steal live work."""
    event = event_type_of(payload_cls).split(".")[1:-1]
    name = "-".join([service, *event])
    if namespace != "cairn":
        name += "-" + re.sub(r"[^A-Za-z0-9_-]", "_", namespace)
    return name


class EventConsumer:
    """Runs one handler under the policy; one instance per (service, event type)."""

    def __init__(
        self,
        *,
        service: str,
        payload_cls: type[Contract],
        handler: Handler,
        settings: CairnSettings,
        publisher: EventPublisher,
        metrics: ServiceMetrics,
        ack_wait_s: float | None = None,
    ):
        self.service = service
        self.payload_cls = payload_cls
        self.event_type = event_type_of(payload_cls)
        self.handler = handler
        self.settings = settings
        self.publisher = publisher
        self.metrics = metrics
        self.ack_wait_s = ack_wait_s or settings.ack_wait_s
        self.source = f"/cairn/{service}"

    async def __call__(self, body: bytes, message: NatsMessage) -> None:
        raw = message.raw_message
        meta = raw.metadata
        attempt = meta.num_delivered
        seq = meta.sequence.stream
        if attempt > self.settings.max_deliver:
            await self._dead_letter(
                body, raw.subject, seq, attempt, f"gave up after {attempt - 1} attempts", [], message
            )
            return
        try:
            event = _decode(body, self.event_type)
        except ContractError as exc:
            await self._dead_letter(body, raw.subject, seq, attempt, exc.reason, exc.problems, message, exc.raw)
            return
        except (RecursionError, MemoryError, ValueError, TypeError) as exc:
            # Hostile input the parser itself chokes on (JSON nested 100,000 deep, ...): without
            # this the message would be redelivered on every ack wait until max_deliver.
            await self._dead_letter(
                body, raw.subject, seq, attempt, f"cannot decode: {type(exc).__name__}", [], message
            )
            return

        outside = _foreign_artifacts(event.data, self.settings)
        if outside:
            # Artifact URIs come from events; a forged one would make this service (or a Dask
            # worker) fetch an arbitrary address before the hash check could refuse the bytes.
            await self._dead_letter(
                body, raw.subject, seq, attempt, "artifact URI outside the artifact store: " + outside[0],
                outside, message, event=event,
            )
            return

        self.metrics.in_flight.labels(self.service).inc()
        started = time.perf_counter()
        keepalive = asyncio.create_task(self._keep_alive(message))
        try:
            outputs = await self.handler(event, Delivery(attempt, seq, message))
            for out in outputs:
                await self.publisher.publish(out)
        except PermanentError as exc:
            await self._dead_letter(
                body, raw.subject, seq, attempt, exc.reason, exc.problems, message, event=event, domain=exc.event
            )
            return
        except IntegrityError as exc:
            # Content-addressed bytes that do not match their hash stay wrong on every retry.
            await self._dead_letter(
                body, raw.subject, seq, attempt, f"IntegrityError: {exc}", [], message, event=event
            )
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure is retried, then dead-lettered
            reason = f"{type(exc).__name__}: {exc}"
            if attempt >= self.settings.max_deliver:
                log.exception("%s: %s failed for the last time", self.service, event.id)
                await self._dead_letter(
                    body, raw.subject, seq, attempt, f"failed {attempt} times; last: {reason}", [], message,
                    event=event,
                )
                return
            delay = self.settings.backoff(attempt)
            log.warning("%s: %s failed (attempt %d), retry in %.1fs: %s", self.service, event.id, attempt, delay,
                        reason)
            self.metrics.handled.labels(self.service, self.event_type, "retried").inc()
            await message.nack(delay=delay)
            return
        finally:
            keepalive.cancel()
            self.metrics.in_flight.labels(self.service).dec()
            self.metrics.latency.labels(self.service, self.event_type).observe(time.perf_counter() - started)
        await message.ack()
        self.metrics.handled.labels(self.service, self.event_type, "ok").inc()

    async def _keep_alive(self, message: NatsMessage) -> None:
        """Renew the lease while the handler runs; a dead process stops renewing and loses it."""
        interval = max(self.ack_wait_s / 3, 0.2)
        while True:
            await asyncio.sleep(interval)
            try:
                await message.in_progress()
            except Exception:  # noqa: BLE001 - connection blips: the next tick tries again
                log.debug("in-progress ack failed", exc_info=True)

    async def _dead_letter(
        self,
        body: bytes,
        subject: str,
        seq: int | None,
        attempt: int,
        reason: str,
        problems: list[str],
        message: NatsMessage,
        raw_doc: dict[str, Any] | None = None,
        event: Envelope[Any] | None = None,
        domain: Contract | None = None,
    ) -> None:
        """Keep the original bytes on the DLQ subject, say why in an event, then stop redelivery."""
        dlq = dead_letter_subject(self.service)
        original_id = event.id if event else _text(raw_doc, "id")
        # Hostile input can make the reason itself huge (an 8 MB "type" is echoed in it): bound
        # what we write, so the rejection and the dead letter always fit in a message.
        reason = _bounded(reason, MAX_REASON_CHARS)
        problems = [_bounded(p, MAX_PROBLEM_CHARS) for p in problems[:MAX_PROBLEMS]]
        headers = {
            "Nats-Msg-Id": f"dlq-{self.service}-{self.settings.namespace}-{seq}",
            "Cairn-Reason": reason[:1000].replace("\n", " "),
            "Cairn-Original-Subject": subject,
            "Cairn-Stream-Sequence": str(seq),
            "Cairn-Deliveries": str(attempt),
        }
        room = self.publisher.max_payload() - DLQ_HEADROOM
        if len(body) > room:
            # Original + headers would exceed the server's max_payload and the dead letter could
            # never be written (redelivered forever). The full original stays in the stream at
            # Cairn-Stream-Sequence (limits retention, deletes denied); the DLQ keeps its head.
            headers["Cairn-Truncated"] = str(len(body))
            body = body[: max(room, 0)]
        await self.publisher.publish_raw(body, dlq, headers)
        payload = domain or EventRejected(
            service=self.service,
            reason=reason,
            errors=problems,
            subject=subject,
            stream_sequence=seq,
            original_id=original_id,
            original_type=event.type if event else _text(raw_doc, "type"),
            deliveries=attempt,
            dead_letter_subject=dlq,
        )
        key = f"rejected:{self.service}:{seq}"
        if event is not None:
            rejection = new_event(payload, source=self.source, cause=event, key=key)
        else:
            correlation = _text(raw_doc, "correlationid")
            rejection = new_event(
                payload,
                source=self.source,
                event_id=f"rejected-{self.service}-{self.settings.namespace}-{seq}",
                correlation_id=correlation if correlation and _valid_id(correlation) else None,
            )
        await self.publisher.publish(rejection)
        await message.reject()
        self.metrics.handled.labels(self.service, self.event_type, "rejected").inc()
        log.warning("%s: dead-lettered seq %s: %s", self.service, seq, reason)


MAX_REASON_CHARS = 2000
MAX_PROBLEM_CHARS = 500
MAX_PROBLEMS = 50
DLQ_HEADROOM = 16 * 1024  # headers and protocol overhead of a dead letter


def _bounded(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[: limit - 40] + f"... [{len(text) - limit + 40} more characters]"


def _foreign_artifacts(payload: Any, settings: CairnSettings) -> list[str]:
    """Every ArtifactRef in a payload whose URI is not in this deployment's artifact store."""
    from services.security import ArtifactLocationError, check_artifact_uri

    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, ArtifactRef):
            try:
                check_artifact_uri(value.uri, settings)
            except ArtifactLocationError as exc:
                found.append(str(exc))
        elif isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(getattr(value, name))
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)

    walk(payload)
    return found


def _decode(body: bytes, event_type: str) -> Envelope[Any]:
    return decode(body, expected={event_type})


def _text(doc: dict[str, Any] | None, key: str) -> str | None:
    value = (doc or {}).get(key)
    return value[:128] if isinstance(value, str) else None


def _valid_id(value: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}", value) is not None


def pull_inbox_prefix(settings: CairnSettings) -> bytes:
    """The deliver-inbox prefix of a pull subscriber: `_INBOX_<user>.` (see connection.inbox_prefix)."""
    return (inbox_prefix(settings.nats_user) + ".").encode() if settings.nats_user else b"_INBOX."


def _raw_body(message: Any) -> bytes:
    return message.body


def subscribe(
    broker: NatsBroker,
    consumer: EventConsumer,
    *,
    max_workers: int = 1,
) -> Any:
    """Register the consumer on the broker as a durable pull subscriber bound to the stream."""
    settings = consumer.settings
    subject = subject_for(consumer.payload_cls, settings.namespace)
    durable = durable_name(consumer.service, consumer.payload_cls, settings.namespace)
    config = ConsumerConfig(
        durable_name=durable,
        ack_policy=JsAckPolicy.EXPLICIT,
        ack_wait=consumer.ack_wait_s,
        max_deliver=-1,
        max_ack_pending=max(64, 4 * max_workers),
        deliver_policy=DeliverPolicy.ALL,
        filter_subject=subject,
    )
    options: dict[str, Any] = {}
    if settings.nats_user:
        # Pull deliveries arrive on this inbox; FastStream defaults to `_INBOX.` whatever the
        # connection's prefix. Per-user inboxes let NATS permissions keep each service's
        # deliveries private (services.security); without credentials nothing changes.
        options["inbox_prefix"] = pull_inbox_prefix(settings)
    if max_workers > 1:
        options["max_workers"] = max_workers
    sub = broker.subscriber(
        subject,
        stream=JStream(settings.stream, declare=False),
        durable=durable,
        config=config,
        pull_sub=PullSub(batch_size=1, timeout=2.0),
        ack_policy=AckPolicy.MANUAL,
        decoder=_raw_body,
        title=f"{consumer.service}:{consumer.event_type}",
        description=consumer.handler.__doc__,
        **options,
    )

    @sub
    async def _on_message(body: bytes, message: NatsMessage) -> None:
        await consumer(body, message)

    return sub
