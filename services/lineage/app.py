"""lineage: every stream message (`cairn.>`), strictly in stream order, into the hash-chained
lineage store; OpenLineage run events derived on the way and emitted with the openlineage client.

The service runs its own pull loop on the broker's connection instead of FastStream's batch
subscriber. That subscriber gathers a batch over several nats-py fetches and lets the bare
`asyncio.TimeoutError` a fetch raises near its deadline escape (it only catches nats-py's own
TimeoutError): the task restarts, the half-gathered messages are dropped unacknowledged until ack
wait (30 s by default), and every later batch is refused as out of order meanwhile. Here every
fetched message is held until it is recorded and acknowledged: the chain waits on a redelivery
only for a delivery lost in flight (a crashed process).

The loop is this module's; the rest has rooms of its own: the store writer (services.lineage.writer),
archive and trim (services.lineage.retention), OpenLineage emission (services.lineage.emission).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from faststream.nats import JStream, NatsBroker, PullSub
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError

from contracts import stream_filter
from services.lineage.openlineage import OpenLineageSink, make_client
from services.lineage.retention import from_archive, keep_archiving
from services.lineage.stopping import pause
from services.lineage.store import LineageStore
from services.lineage.writer import ChainWriter
from services.platform.bus.consumer import pull_inbox_prefix
from services.platform.bus.pull import LongPoll, ready
from services.platform.runtime import Route, Service
from services.platform.settings import CairnSettings

log = logging.getLogger(__name__)
DURABLE = "lineage"
SUBJECT = stream_filter()
BATCH = 256
# After the first message of a quiet spell, how long to let others gather before fetching them: one
# fetch, one store transaction (one fsync) and one chain extension for a burst, not one per event.
# The record lags the stream by this much at most; nothing waits on it (docs/DESIGN-NOTES.md).
LINGER_S = 0.1
# How long the fetch after the linger waits when nothing else came.
TAIL_WAIT_S = 0.02
# How long a stop waits for a store write in progress (the long poll itself is dropped at once;
# services.platform.bus.pull.LongPoll).
STOP_WAIT_S = 10.0


def consumer_config(settings: CairnSettings) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=DURABLE,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait_s,
        max_deliver=-1,
        max_ack_pending=BATCH,
        deliver_policy=DeliverPolicy.ALL,
        filter_subject=SUBJECT,
    )


@dataclass(frozen=True)
class LineageContext:
    """What a running lineage service holds: the chain's store and, if configured, the OpenLineage sink."""

    store: LineageStore
    sink: OpenLineageSink | None


class Lineage(Service[LineageContext]):
    name = "lineage"

    def routes(self) -> Sequence[Route]:
        return []

    def extra_durables(self) -> list[str]:
        return [DURABLE]

    def __init__(self, settings: CairnSettings):
        super().__init__(settings)
        # The pull loop's own state, made by `attach` and ended by `detach`.
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._sub: Any = None
        self._archiver: asyncio.Task[None] | None = None
        self._js: Any = None
        self._poller: LongPoll | None = None

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[LineageContext]:
        store = await asyncio.to_thread(LineageStore, self.settings.lineage_url)
        sink = None
        try:
            try:
                client = await asyncio.to_thread(make_client, self.settings.openlineage_url)
                sink = OpenLineageSink(client) if client is not None else None
            except Exception:  # noqa: BLE001 - a bad OpenLineage config never stops the record
                log.exception("OpenLineage client not configured; recording without emitting")
            yield LineageContext(store, sink)
        finally:
            if sink is not None:
                with contextlib.suppress(Exception):  # a transport that cannot flush loses no record
                    await asyncio.to_thread(sink.close)
            store.close()

    @property
    def store(self) -> LineageStore:
        return self.context.store

    @property
    def sink(self) -> OpenLineageSink | None:
        return self.context.sink

    def subscribe_extra(self, broker: NatsBroker) -> None:
        """Declare the consumer without a handler: FastStream opens nothing for it, but it names the
        durable, filter and inbox the NATS permissions are derived from (services.tools.nats_auth)."""
        broker.subscriber(
            SUBJECT,
            stream=JStream(self.settings.stream, declare=False),
            durable=DURABLE,
            config=consumer_config(self.settings),
            pull_sub=PullSub(batch_size=BATCH),
            inbox_prefix=pull_inbox_prefix(self.settings),
            title=f"lineage:{SUBJECT}",
        )

    async def attach(self, broker: NatsBroker) -> None:
        """Bind the durable (created if missing, so readiness sees it at once) and start pulling."""
        js = broker.config.connection_state.stream
        self._sub = await js.pull_subscribe(
            SUBJECT,
            durable=DURABLE,
            stream=self.settings.stream,
            config=consumer_config(self.settings),
            inbox_prefix=pull_inbox_prefix(self.settings),
        )
        self._js = js
        self._poller = LongPoll(self._sub)
        self._stopping.clear()
        stopping = self._stopping
        writer = ChainWriter(self.settings, self.store, self.sink, stopping, self.metrics, self.name, SUBJECT)
        self._task = asyncio.create_task(self._follow(writer), name="lineage-follow")
        if self.settings.retention_max_age_s or self.settings.retention_max_bytes:
            archiving = keep_archiving(js, self.settings, self.store, self._stopping, self.metrics)
            self._archiver = asyncio.create_task(archiving, name="lineage-archive")

    async def detach(self) -> None:
        archiver, self._archiver = self._archiver, None
        if archiver is not None:
            archiver.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await archiver
        task, self._task = getattr(self, "_task", None), None
        if task is None:
            return
        self._stopping.set()
        if self._poller is not None:  # the loop, woken from its long poll, sees the stop
            self._poller.wake()
        done, _ = await asyncio.wait({task}, timeout=STOP_WAIT_S)
        if not done:  # a store call that hangs: what it wrote is kept, the rest is redelivered
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()

    # The loop ------------------------------------------------------------------------------
    async def _follow(self, writer: ChainWriter) -> None:
        """Fetch, record what continues the chain, ack after the commit; hold what comes early."""
        held: dict[int, Msg] = {}
        head = await writer.head()
        if head is not None and (self.settings.retention_max_age_s or self.settings.retention_max_bytes):
            try:
                head = await from_archive(head, self._js, self.settings, self.store)
            except Exception:  # noqa: BLE001 - without the archive the chain waits for the gap, loudly
                log.exception("could not read the archive")
        while not self._stopping.is_set() and head is not None:
            try:
                for msg in await self._fetch():
                    held[msg.metadata.sequence.stream] = msg  # a redelivery replaces the older copy
                if held:
                    head = await writer.record(held, head)
            except Exception:  # noqa: BLE001 - the loop is the service: log, and go on with what is held
                log.exception("lineage loop error")
                await pause(self._stopping, 1.0)

    def reconnected(self) -> None:
        """Drop the long poll in progress: a restarted server holds none of the old requests."""
        if self._poller is not None:
            self._poller.wake()

    async def _fetch(self) -> list[Msg]:
        """A long poll for one message, then what else the server holds (up to BATCH)."""
        try:
            first = await self._poller.next()  # type: ignore[union-attr]
            if not first:  # expired empty, or dropped (a reconnect, a stop)
                return []
            if first[0].metadata.num_pending:  # a backlog: take what is there now
                return first + await ready(self._sub, BATCH - 1)
            await pause(self._stopping, LINGER_S)
            try:
                return first + await self._sub.fetch(BATCH - 1, timeout=TAIL_WAIT_S)
            except (TimeoutError, APIError):  # nothing else came
                return first
        except TimeoutError:  # the no-wait request's reply lost: what came is redelivered
            return []
        except Exception as exc:  # noqa: BLE001 - reconnecting, a JetStream API error: try again
            log.warning("lineage fetch failed (%s: %s); retrying", type(exc).__name__, exc)
            await pause(self._stopping, 1.0)
            return []
