"""lineage: every stream message (`cairn.>`), strictly in stream order, into the hash-chained
lineage store; OpenLineage run events derived on the way and emitted with the openlineage client.

The service runs its own pull loop on the broker's connection instead of FastStream's batch
subscriber. That subscriber gathers a batch over several nats-py fetches and lets the bare
`asyncio.TimeoutError` a fetch raises near its deadline escape (it only catches nats-py's own
TimeoutError): the task restarts, the half-gathered messages are dropped unacknowledged until ack
wait (30 s by default), and every later batch is refused as out of order meanwhile. Here every
fetched message is held until it is recorded and acknowledged: the chain waits on a redelivery
only for a delivery lost in flight (a crashed process).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from faststream.nats import JStream, NatsBroker, PullSub
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from contracts import stream_filter
from services.lineage.archive import Archive, archive_and_trim, signing_key
from services.lineage.logic import plan
from services.lineage.openlineage import STEPS, OpenLineageSink, make_client, run_events
from services.lineage.store import LineageStore, OutOfOrder, Record
from services.platform.bus.consumer import pull_inbox_prefix
from services.platform.bus.pull import LongPoll, ready
from services.platform.runtime import Route, Service
from services.platform.settings import CairnSettings

log = logging.getLogger(__name__)
DURABLE = "lineage"
SUBJECT = stream_filter()
BATCH = 256
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
        self._gap = 0  # the sequence the chain waits for, once logged
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
        self._task = asyncio.create_task(self._follow(), name="lineage-follow")
        if self.settings.retention_max_age_s or self.settings.retention_max_bytes:
            self._archiver = asyncio.create_task(self._archive(js), name="lineage-archive")

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

    # Retention ------------------------------------------------------------------------------
    async def _archive(self, js: Any) -> None:
        """Every CAIRN_ARCHIVE_INTERVAL_S: archive what retention sends out, then trim the stream."""
        archive = Archive.of(self.settings)
        key = await asyncio.to_thread(signing_key, self.settings)
        while not self._stopping.is_set():
            await self._pause(self.settings.archive_interval_s)
            if self._stopping.is_set():
                return
            try:
                trim = await archive_and_trim(js, self.settings, self.store, archive, key)
                if trim.held_by:
                    log.info("retention held back: %s", trim.held_by)
            except Exception:  # noqa: BLE001 - the stream keeps everything until the next try
                log.exception("archiving failed; the stream keeps its events")

    async def _from_archive(self, head: int, js: Any) -> int:
        """A store newer than the archive (rebuilt, or a new database) first reads what the stream
        no longer holds from the archive, so the chain starts at sequence 1."""
        info = await js.stream_info(self.settings.stream)
        if head + 1 >= info.state.first_seq:
            return head
        archive = Archive.of(self.settings)
        messages = await asyncio.to_thread(archive.messages, None, info.state.first_seq)
        added = await asyncio.to_thread(self.store.append_many, [m for m in messages if m[0] > head])
        return added[-1].seq if added else head

    # The loop ------------------------------------------------------------------------------
    async def _follow(self) -> None:
        """Fetch, record what continues the chain, ack after the commit; hold what comes early."""
        held: dict[int, Msg] = {}
        head = await self._head()
        if head is not None and (self.settings.retention_max_age_s or self.settings.retention_max_bytes):
            try:
                head = await self._from_archive(head, self._js)
            except Exception:  # noqa: BLE001 - without the archive the chain waits for the gap, loudly
                log.exception("could not read the archive")
        while not self._stopping.is_set() and head is not None:
            try:
                for msg in await self._fetch():
                    held[msg.metadata.sequence.stream] = msg  # a redelivery replaces the older copy
                if held:
                    head = await self._record(held, head)
            except Exception:  # noqa: BLE001 - the loop is the service: log, and go on with what is held
                log.exception("lineage loop error")
                await self._pause(1.0)

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
            return first + (await ready(self._sub, BATCH - 1) if first[0].metadata.num_pending else [])
        except TimeoutError:  # the no-wait request's reply lost: what came is redelivered
            return []
        except Exception as exc:  # noqa: BLE001 - reconnecting, a JetStream API error: try again
            log.warning("lineage fetch failed (%s: %s); retrying", type(exc).__name__, exc)
            await self._pause(1.0)
            return []

    async def _head(self) -> int | None:
        """The store's last sequence, retried with backoff while the store is down; None on stop."""
        attempt = 0
        while not self._stopping.is_set():
            try:
                return await asyncio.to_thread(self.store.last_seq)
            except Exception:  # noqa: BLE001 - the store is down: wait for it
                attempt += 1
                log.exception("lineage store unreachable (attempt %d)", attempt)
                await self._pause(self.settings.backoff(attempt))
        return None

    async def _record(self, held: dict[int, Msg], head: int) -> int | None:
        """Append the run that continues the chain in one transaction, then ack it; returns the new
        head. A store failure is retried with backoff while the messages stay held: nothing lost."""
        attempt, stale = 0, True
        while not self._stopping.is_set():
            step = plan(head, held)
            if step.waiting and not step.run and stale:
                # Another replica on a shared store may have recorded the gap: ask the store once.
                stale, fresh = False, await self._head()
                if fresh is None:
                    return None
                if fresh != head:
                    head = fresh
                    continue
            messages = [(s, held[s].subject, held[s].data) for s in step.run]
            try:
                added = await asyncio.to_thread(self.store.append_many, messages) if messages else []
            except OutOfOrder:  # another writer moved the store: plan from its head
                fresh = await self._head()
                if fresh is None:
                    return None
                head, stale = fresh, False
                continue
            except Exception:  # noqa: BLE001 - the store is down or busy: try again, lose nothing
                attempt += 1
                log.exception("lineage store write failed for seqs %s..%s", step.run[0], step.run[-1])
                await self._renew(held.values())
                await self._pause(self.settings.backoff(attempt))
                continue
            steps = [r for r in added if r.type in STEPS] if self.sink is not None else []
            if steps:
                await asyncio.to_thread(self._emit_all, steps)
            if step.run:
                head = step.run[-1]
                self.metrics.handled.labels(self.name, SUBJECT, "ok").inc(len(step.run))
            for seq in step.recorded + step.run:
                await _ack(held.pop(seq))
            if step.waiting and self._gap != head + 1:
                log.info("lineage waits for stream sequence %d (%d later held)", head + 1, len(step.waiting))
            self._gap = head + 1 if step.waiting else 0
            return head
        return None

    async def _pause(self, seconds: float) -> None:
        """Sleep, but end at once on stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    @staticmethod
    async def _renew(messages: Iterable[Msg]) -> None:
        """Extend the lease of held messages while the store is down, so they are not redelivered."""
        for msg in messages:
            with contextlib.suppress(Exception):
                await msg.in_progress()

    def _emit_all(self, records: list[Record]) -> None:
        for record in records:
            self._emit(record)

    def _emit(self, record: Record) -> None:
        try:
            cause = self.store.by_event_id(record.causationid) if record.causationid else None
            self.sink.emit(run_events(record, cause))  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - lineage reporting never blocks the record
            log.exception("OpenLineage emission failed for %s", record.event_id)


async def _ack(msg: Msg) -> None:
    """Ack after the commit; a lost ack only means a redelivery, which is acked as already recorded."""
    with contextlib.suppress(Exception):
        await msg.ack()
