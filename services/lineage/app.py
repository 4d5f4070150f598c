"""lineage: one durable consumer on everything (`cairn.>`), in stream order, into the hash-chained
lineage store; OpenLineage run events derived on the way."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from faststream.middlewares import AckPolicy
from faststream.nats import JStream, NatsBroker, NatsMessage, PullSub
from nats.js.api import AckPolicy as JsAckPolicy
from nats.js.api import ConsumerConfig, DeliverPolicy

from services.lineage.openlineage import STEPS, OpenLineageSink, run_events
from services.lineage.store import LineageStore, OutOfOrder, Record
from services.runtime import Route, Service

log = logging.getLogger(__name__)
DURABLE = "lineage"


class Lineage(Service):
    name = "lineage"

    def routes(self) -> Sequence[Route]:
        return []

    def extra_durables(self) -> list[str]:
        return [DURABLE]

    async def start(self) -> None:
        self.store = await asyncio.to_thread(LineageStore, self.settings.lineage_url)
        self.sink = OpenLineageSink(self.settings.openlineage_url) if self.settings.openlineage_url else None

    async def stop(self) -> None:
        self.store.close()

    def subscribe_extra(self, broker: NatsBroker) -> None:
        config = ConsumerConfig(
            durable_name=DURABLE,
            ack_policy=JsAckPolicy.EXPLICIT,
            ack_wait=self.settings.ack_wait_s,
            max_deliver=-1,
            max_ack_pending=1,  # strictly in stream order: the chain follows the stream
            deliver_policy=DeliverPolicy.ALL,
            filter_subject="cairn.>",
        )
        sub = broker.subscriber(
            "cairn.>",
            stream=JStream(self.settings.stream, declare=False),
            durable=DURABLE,
            config=config,
            pull_sub=PullSub(batch_size=1, timeout=2.0),
            ack_policy=AckPolicy.MANUAL,
            decoder=lambda message: message.body,
            title="lineage:cairn.>",
        )

        @sub
        async def on_message(body: bytes, message: NatsMessage) -> None:
            await self.record(body, message)

    async def record(self, body: bytes, message: NatsMessage) -> None:
        """Append the message to the chain; dead letters and invalid events are recorded too."""
        raw = message.raw_message
        seq = raw.metadata.sequence.stream
        try:
            record = await asyncio.to_thread(self.store.append, seq, raw.subject, body)
        except OutOfOrder as exc:
            log.info("lineage waits for an earlier message: %s", exc)
            await message.nack(delay=0.2)
            return
        except Exception:  # noqa: BLE001 - the store is down or busy: try again, lose nothing
            log.exception("lineage store write failed for seq %s", seq)
            await message.nack(delay=self.settings.backoff(raw.metadata.num_delivered))
            return
        if record is not None and self.sink is not None and record.type in STEPS:
            await asyncio.to_thread(self._emit, record)
        self.metrics.handled.labels(self.name, record.type if record else "duplicate", "ok").inc()
        await message.ack()

    def _emit(self, record: Record) -> None:
        cause = self.store.by_event_id(record.causationid) if record.causationid else None
        try:
            self.sink.emit(run_events(record, cause))  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - lineage reporting never blocks the record
            log.exception("OpenLineage emission failed for %s", record.event_id)
