"""The one consumer policy every service uses.

- Durable *pull* consumer, shared by every replica of the service (work is split, not copied).
  A new or recreated durable starts `handled_ttl_s` back in the stream, not at its beginning.
  Messages are fetched in batches up to the route's free handler slots (services.platform.bus.pull).
- Manual acknowledgement: FastStream's NATS default (REJECT_ON_ERROR) would terminate a message
  on any exception; here a failure is retried with a delay instead.
- A long step renews its lease with in-progress acks (the pull loop renews every message it holds),
  so ack wait can stay short for crashes; but
  each attempt is bounded (`Route.handler_timeout_s`), so a hung step cannot hold a message forever.
- Bounded attempts: past `max_deliver` (also after crashes, which the server counts) the message
  is dead-lettered on `<namespace>.dlq.<service>` with a rejection event naming the reason and, when
  the bytes decode, the original event (id, type, run). The server's own MaxDeliver is unlimited
  so that nothing is ever silently left behind.
- Input no retry can fix is dead-lettered at once: invalid payloads, artifact URIs outside the
  store, and anything that raises before the handler runs.
- Exactly one result per cause: inputs already handled are recognised by the ledger
  (services.platform.bus.ledger), beyond the stream's duplicate window too.
- Outputs are pipelined, in a fixed order on the one connection: the ledger's `pending` record,
  then every output, sent without waiting in between, their PubAcks gathered; then `done`, then
  the ack. A crash can cut that sequence only after what it already sent, so an output on the
  wire always has its pending record before it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from faststream.nats import JStream, NatsBroker, PullSub
from nats.aio.msg import Msg
from nats.js.api import AckPolicy as JsAckPolicy
from nats.js.api import ConsumerConfig, DeliverPolicy

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
from contracts.subjects import is_live
from contracts.types import Contract
from services.platform.bus.connection import inbox_prefix
from services.platform.bus.ledger import OK, PENDING, REJECTED, HandledLedger, Record
from services.platform.bus.metrics import ServiceMetrics
from services.platform.bus.publisher import EventPublisher
from services.platform.bus.pull import PullLoop
from services.platform.settings import CairnSettings

log = logging.getLogger(__name__)

# After a timeout the handler is cancelled; one that ignores cancellation is abandoned after this.
CANCEL_GRACE_S = 5.0


class PermanentError(Exception):
    """Input no retry can fix. `event` is the domain rejection to publish (else EventRejected)."""

    def __init__(self, reason: str, problems: Sequence[str] = (), event: Contract | None = None):
        super().__init__(reason)
        self.reason = reason
        self.problems = list(problems)
        self.event = event


class HandlerTimeout(Exception):
    """One attempt ran past its route's bound: it counts as failed (retried, then dead-lettered)."""

    def __init__(self, seconds: float):
        super().__init__(f"timed out after {seconds:g} s")


@dataclass
class Delivery:
    """What a handler may know about a message besides its content."""

    attempt: int
    stream_sequence: int | None
    message: Msg = field(repr=False)

    @property
    def redelivered(self) -> bool:
        return self.attempt > 1


@dataclass
class Inbound:
    """One delivery as received, decoded as far as it goes (never raises)."""

    body: bytes
    subject: str
    seq: int | None
    attempt: int
    message: Msg = field(repr=False)
    event: Envelope[Any] | None = None
    raw_doc: dict[str, Any] | None = None  # the JSON object, when it parsed but did not validate
    problem: str | None = None  # why it is no valid event here
    problems: list[str] = field(default_factory=list)
    key: str = ""  # its entry in the ledger


Handler = Callable[[Envelope[Any], Delivery], Awaitable[Sequence[Envelope[Any]]]]
InputCheck = Callable[[Any], list[str]]


def durable_name(service: str, payload_cls: type[Contract], namespace: str) -> str:
    """`<service>-<event>-v<N>`; replays get their own consumers so they never steal live work.

    The version is part of the name: a v1 and a v2 route of one service are two consumers, and an
    upgrade from v1 to v2 creates a new durable instead of re-pointing the old one at another
    filter (docs/CONTRACTS.md, "Moving a route from v1 to v2").
    """
    event = event_type_of(payload_cls).split(".")[1:]
    name = "-".join([service, *event])
    if not is_live(namespace):
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
        ledger: HandledLedger,
        ack_wait_s: float | None = None,
        handler_timeout_s: float | None = None,
        input_check: InputCheck | None = None,
        permanent: tuple[type[Exception], ...] = (),
    ):
        """`input_check`: problems with a payload before the handler may see it (the runtime gives
        the artifact-location policy); `permanent`: exceptions no retry can fix (dead-lettered at once)."""
        self.service = service
        self.payload_cls = payload_cls
        self.event_type = event_type_of(payload_cls)
        self.handler = handler
        self.settings = settings
        self.publisher = publisher
        self.metrics = metrics
        self.ledger = ledger
        self.ack_wait_s = ack_wait_s or settings.ack_wait_s
        self.handler_timeout_s = handler_timeout_s or settings.handler_timeout_s
        self.input_check = input_check or (lambda _payload: [])
        self.permanent = permanent
        self.source = f"/cairn/{service}"
        # Metric children looked up once, not per message.
        self._in_flight = metrics.in_flight.labels(service)
        self._latency = metrics.latency.labels(service, self.event_type)
        self._outcome = {
            outcome: metrics.handled.labels(service, self.event_type, outcome)
            for outcome in ("ok", "duplicate", "retried", "rejected")
        }

    async def __call__(self, message: Msg) -> None:
        """Every step from receipt to ack is inside the policy: nothing raised here escapes it."""
        inbound = self._receive(message)
        try:
            record = await self.ledger.get(inbound.key)
        except Exception as exc:  # noqa: BLE001 - the ledger is infrastructure: retry, then dead-letter
            await self._failed(inbound, f"handled-inputs ledger: {type(exc).__name__}: {exc}")
            return
        if record is not None:
            await self._already_handled(inbound, record)
            return
        if inbound.attempt > self.settings.max_deliver:
            # Every attempt crashed the process (the server counts those deliveries too).
            await self._dead_letter(inbound, f"gave up after {inbound.attempt - 1} attempts")
            return
        if inbound.problem is not None:
            await self._dead_letter(inbound, inbound.problem, inbound.problems)
            return
        event = inbound.event
        assert event is not None
        try:
            outside = self.input_check(event.data)
        except Exception as exc:  # noqa: BLE001 - an input that breaks a check is refused, not retried
            await self._dead_letter(inbound, f"cannot check input: {type(exc).__name__}: {exc}")
            return
        if outside:
            # Artifact URIs come from events; a forged one would make this service (or a Dask
            # worker) fetch an arbitrary address before the hash check could refuse the bytes.
            reason = "artifact URI outside the artifact store: " + outside[0]
            await self._dead_letter(inbound, reason, outside)
            return
        await self._handle(inbound, event)

    def _receive(self, message: Msg) -> Inbound:
        meta = message.metadata
        body = message.data
        inbound = Inbound(body, message.subject, meta.sequence.stream, meta.num_delivered, message)
        try:
            inbound.event = _decode(body, self.event_type)
        except ContractError as exc:
            inbound.problem, inbound.problems, inbound.raw_doc = exc.reason, exc.problems, exc.raw
        except Exception as exc:  # noqa: BLE001
            # Hostile input the parser itself chokes on (JSON nested 100,000 deep, ...): without
            # this the message would be redelivered on every ack wait until max_deliver.
            inbound.problem = f"cannot decode: {type(exc).__name__}"
        inbound.key = self.ledger.key(inbound.event, inbound.seq)
        return inbound

    async def _already_handled(self, inbound: Inbound, record: Record) -> None:
        """A redelivery of an input already handled: never run the step again."""
        if record.outcome == PENDING:
            # The outputs were kept but maybe not all published: publish exactly those again.
            try:
                await self.publisher.publish_all(record.outputs())
                await self.ledger.done(inbound.key, OK, record.output_ids)
            except Exception as exc:  # noqa: BLE001
                await self._failed(inbound, f"republishing kept outputs: {type(exc).__name__}: {exc}")
                return
        log.info("%s: seq %s already handled (%s); acked", self.service, inbound.seq, record.outcome)
        await inbound.message.ack()
        self._outcome["duplicate"].inc()

    async def _handle(self, inbound: Inbound, event: Envelope[Any]) -> None:
        message = inbound.message
        self._in_flight.inc()
        started = time.perf_counter()
        try:
            outputs = await self._run_handler(event, Delivery(inbound.attempt, inbound.seq, message))
            await self._publish(inbound.key, outputs)
        except PermanentError as exc:
            await self._dead_letter(inbound, exc.reason, exc.problems, domain=exc.event)
            return
        except self.permanent as exc:
            # E.g. content-addressed bytes that do not match their hash: wrong on every retry.
            await self._dead_letter(inbound, f"{type(exc).__name__}: {exc}")
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure is retried, then dead-lettered
            reason = str(exc) if isinstance(exc, HandlerTimeout) else f"{type(exc).__name__}: {exc}"
            await self._failed(inbound, reason)
            return
        finally:
            self._in_flight.dec()
            self._latency.observe(time.perf_counter() - started)
        await message.ack()
        self._outcome["ok"].inc()

    async def _publish(self, key: str, outputs: Sequence[Envelope[Any]]) -> None:
        """Pending record and outputs sent back to back, PubAcks gathered, then `done`."""
        if outputs:
            encoded = [out.encode() for out in outputs]
            kept = await self.ledger.pending_async(key, outputs, encoded, self.publisher.max_payload())
            await self.publisher.publish_all(outputs, encoded, waiting=kept)
        await self.ledger.done(key, OK, [out.id for out in outputs])
        for out in outputs:
            self.metrics.published.labels(self.service, out.type).inc()

    async def _run_handler(self, event: Envelope[Any], delivery: Delivery) -> Sequence[Envelope[Any]]:
        """The handler, bounded by `handler_timeout_s`; past it, cancelled and HandlerTimeout raised.

        Cancelling stops coroutines, not threads: a handler waiting in `asyncio.to_thread` gives up
        its result, but the thread runs on to its end (Python cannot stop it). Blocking code that may
        hang must bound itself; a Dask future is only abandoned, the cluster finishes the task.
        """
        task = asyncio.ensure_future(self.handler(event, delivery))
        try:
            done, _ = await asyncio.wait({task}, timeout=self.handler_timeout_s)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if done:
            return task.result()
        task.cancel()
        task.add_done_callback(_retrieve)
        await asyncio.wait({task}, timeout=CANCEL_GRACE_S)
        log.warning("%s: %s timed out after %gs", self.service, event.id, self.handler_timeout_s)
        raise HandlerTimeout(self.handler_timeout_s)

    async def _failed(self, inbound: Inbound, reason: str) -> None:
        """A failure a retry may fix: nak with backoff, or dead-letter after the last attempt."""
        attempt = inbound.attempt
        name = inbound.event.id if inbound.event else f"seq {inbound.seq}"
        if attempt >= self.settings.max_deliver:
            log.error("%s: %s failed for the last time: %s", self.service, name, reason)
            await self._dead_letter(inbound, f"failed {attempt} times; last: {reason}")
            return
        delay = self.settings.backoff(attempt)
        log.warning(
            "%s: %s failed (attempt %d), retry in %.1fs: %s", self.service, name, attempt, delay, reason
        )
        self._outcome["retried"].inc()
        await inbound.message.nak(delay=delay)

    async def _dead_letter(
        self,
        inbound: Inbound,
        reason: str,
        problems: Sequence[str] = (),
        domain: Contract | None = None,
    ) -> None:
        """Keep the original bytes on the DLQ subject, say why in an event, then stop redelivery.

        The rejection names the original event and is caused by it whenever the bytes decode, so
        whoever follows the run (`cairn submit --wait`) sees it end.
        """
        event, raw_doc, seq, body = inbound.event, inbound.raw_doc, inbound.seq, inbound.body
        dlq = dead_letter_subject(self.service, self.settings.namespace)
        original_id = event.id if event else _text(raw_doc, "id")
        # Hostile input can make the reason itself huge (an 8 MB "type" is echoed in it): bound
        # what we write, so the rejection and the dead letter always fit in a message.
        reason = _bounded(reason, MAX_REASON_CHARS)
        problems = [_bounded(p, MAX_PROBLEM_CHARS) for p in list(problems)[:MAX_PROBLEMS]]
        headers = {
            "Nats-Msg-Id": f"dlq-{self.service}-{self.settings.namespace}-{seq}",
            "Cairn-Reason": reason[:1000].replace("\n", " "),
            "Cairn-Original-Subject": inbound.subject,
            "Cairn-Stream-Sequence": str(seq),
            "Cairn-Deliveries": str(inbound.attempt),
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
            subject=inbound.subject,
            stream_sequence=seq,
            original_id=original_id,
            original_type=event.type if event else _text(raw_doc, "type"),
            deliveries=inbound.attempt,
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
        self.metrics.published.labels(self.service, rejection.type).inc()
        try:
            await self.ledger.done(inbound.key, REJECTED, [rejection.id])
        except Exception:  # noqa: BLE001 - the dead letter stands; a redelivery would only repeat it
            log.warning("%s: could not record the rejection of seq %s", self.service, seq, exc_info=True)
        await inbound.message.term()
        self._outcome["rejected"].inc()
        log.warning("%s: dead-lettered seq %s: %s", self.service, seq, reason)


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Consume the outcome of an abandoned handler, so asyncio does not report it as lost."""
    if not task.cancelled():
        task.exception()


MAX_REASON_CHARS = 2000
MAX_PROBLEM_CHARS = 500
MAX_PROBLEMS = 50
DLQ_HEADROOM = 16 * 1024  # headers and protocol overhead of a dead letter


def _bounded(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[: limit - 40] + f"... [{len(text) - limit + 40} more characters]"


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


def subscribe(
    broker: NatsBroker,
    consumer: EventConsumer,
    *,
    max_workers: int = 1,
) -> PullLoop:
    """The route's durable pull consumer: its pull loop, started by the runner once connected.

    The consumer is also declared on the broker, without a handler (FastStream opens nothing for
    it): that declaration names the durable, filter and inbox the NATS permissions are derived
    from (services.tools.nats_auth), the same one the pull loop binds.
    """
    settings = consumer.settings
    subject = subject_for(consumer.payload_cls, settings.namespace)
    durable = durable_name(consumer.service, consumer.payload_cls, settings.namespace)
    config = ConsumerConfig(
        durable_name=durable,
        ack_policy=JsAckPolicy.EXPLICIT,
        ack_wait=consumer.ack_wait_s,
        max_deliver=-1,
        max_ack_pending=max(64, 4 * max_workers),
        # A new durable (or one deleted and recreated, or renamed in an upgrade) starts as far back
        # as the ledger remembers: older history is never re-run, newer inputs it already handled
        # are recognised and acked, and nothing published while it was missing is skipped.
        # An existing durable keeps its position (nats-py binds to it without changing it).
        deliver_policy=DeliverPolicy.BY_START_TIME,
        opt_start_time=datetime.now(UTC) - timedelta(seconds=settings.handled_ttl_s),
        filter_subject=subject,
        # A replay's durables go when idle: one killed outright (SIGKILL) would otherwise keep its
        # unprocessed messages, and with them the stream's retention floor, forever. Live ones stay.
        inactive_threshold=None if is_live(settings.namespace) else settings.replay_inactive_s,
    )
    # Pull deliveries arrive on this inbox. Per-user inboxes let NATS permissions keep each
    # service's deliveries private (services.tools.nats_auth); without credentials nothing changes.
    inbox = pull_inbox_prefix(settings) if settings.nats_user else None
    broker.subscriber(
        subject,
        stream=JStream(settings.stream, declare=False),
        durable=durable,
        config=config,
        pull_sub=PullSub(batch_size=max_workers),
        title=f"{consumer.service}:{consumer.event_type}",
        description=consumer.handler.__doc__,
        **({"inbox_prefix": inbox} if inbox else {}),
    )
    return PullLoop(
        consumer,
        subject=subject,
        durable=durable,
        stream=settings.stream,
        config=config,
        slots=max_workers,
        inbox_prefix=inbox,
        stop_grace_s=consumer.ack_wait_s,
    )
