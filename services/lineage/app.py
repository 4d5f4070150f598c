"""lineage: one durable consumer on everything (`cairn.>`), in stream order, into the hash-chained
lineage store; OpenLineage run events derived on the way."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Annotated, Any

from faststream import Context
from faststream.middlewares import AckPolicy
from faststream.nats import JStream, NatsBroker, PullSub
from faststream.nats.message import NatsBatchMessage
from nats.js.api import AckPolicy as JsAckPolicy
from nats.js.api import ConsumerConfig, DeliverPolicy

from services.bus.consumer import pull_inbox_prefix
from services.lineage.openlineage import STEPS, OpenLineageSink, run_events
from services.lineage.store import LineageStore, OutOfOrder, Record
from services.runtime import Route, Service

log = logging.getLogger(__name__)
DURABLE = "lineage"
BATCH = 256


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
            max_ack_pending=BATCH,
            deliver_policy=DeliverPolicy.ALL,
            filter_subject="cairn.>",
        )
        sub = broker.subscriber(
            "cairn.>",
            stream=JStream(self.settings.stream, declare=False),
            durable=DURABLE,
            config=config,
            pull_sub=PullSub(batch_size=BATCH, timeout=0.5, batch=True),
            ack_policy=AckPolicy.MANUAL,
            decoder=lambda message: message.body,  # raw bytes: a hostile body must not stall the batch
            inbox_prefix=pull_inbox_prefix(self.settings),
            title="lineage:cairn.>",
        )

        @sub
        async def on_batch(bodies: Any, message: Annotated[NatsBatchMessage, Context("message")]) -> None:
            await self.record(message)

    async def record(self, batch: NatsBatchMessage) -> None:
        """Append a batch to the chain in one transaction; dead letters and invalid events too.

        A fetch returns messages in stream order; a redelivery can arrive after later messages,
        and then the batch is refused (nak) until its predecessor is in, so the chain always
        follows the stream.
        """
        messages = [(m.metadata.sequence.stream, m.subject, m.data) for m in batch.raw_message]
        try:
            added = await asyncio.to_thread(self.store.append_many, messages)
        except OutOfOrder as exc:
            log.info("lineage waits for an earlier message: %s", exc)
            await batch.nack(delay=0.2)
            return
        except Exception:  # noqa: BLE001 - the store is down or busy: try again, lose nothing
            log.exception("lineage store write failed for seqs %s..%s", messages[0][0], messages[-1][0])
            await batch.nack(delay=self.settings.backoff(batch.raw_message[0].metadata.num_delivered))
            return
        if self.sink is not None:
            steps = [r for r in added if r.type in STEPS]
            if steps:
                await asyncio.to_thread(self._emit_all, steps)
        self.metrics.handled.labels(self.name, "cairn.>", "ok").inc(len(messages))
        await batch.ack()

    def _emit_all(self, records: list[Record]) -> None:
        for record in records:
            self._emit(record)

    def _emit(self, record: Record) -> None:
        cause = self.store.by_event_id(record.causationid) if record.causationid else None
        try:
            self.sink.emit(run_events(record, cause))  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - lineage reporting never blocks the record
            log.exception("OpenLineage emission failed for %s", record.event_id)
