"""The store writer: the held messages that continue the chain, appended in one transaction, then
acknowledged; a store that is down or moved by another writer is waited for, losing nothing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

from nats.aio.msg import Msg

from services.lineage.emission import emit_all
from services.lineage.logic import plan
from services.lineage.openlineage import STEPS, OpenLineageSink
from services.lineage.stopping import pause
from services.lineage.store import LineageStore, OutOfOrder
from services.platform.bus.metrics import ServiceMetrics
from services.platform.settings import CairnSettings

log = logging.getLogger(__name__)


class ChainWriter:
    def __init__(
        self,
        settings: CairnSettings,
        store: LineageStore,
        sink: OpenLineageSink | None,
        stopping: asyncio.Event,
        metrics: ServiceMetrics,
        service: str,
        subject: str,
    ):
        self.settings = settings
        self.store = store
        self.sink = sink
        self._stopping = stopping
        self.metrics = metrics
        self.service = service
        self.subject = subject
        self._gap = 0  # the sequence the chain waits for, once logged

    async def head(self) -> int | None:
        """The store's last sequence, retried with backoff while the store is down; None on stop."""
        attempt = 0
        while not self._stopping.is_set():
            try:
                return await asyncio.to_thread(self.store.last_seq)
            except Exception:  # noqa: BLE001 - the store is down: wait for it
                attempt += 1
                log.exception("lineage store unreachable (attempt %d)", attempt)
                await pause(self._stopping, self.settings.backoff(attempt))
        return None

    async def record(self, held: dict[int, Msg], head: int) -> int | None:
        """Append the run that continues the chain in one transaction, then ack it; returns the new
        head. A store failure is retried with backoff while the messages stay held: nothing lost."""
        attempt, stale = 0, True
        while not self._stopping.is_set():
            step = plan(head, held)
            if step.waiting and not step.run and stale:
                # Another replica on a shared store may have recorded the gap: ask the store once.
                stale, fresh = False, await self.head()
                if fresh is None:
                    return None
                if fresh != head:
                    head = fresh
                    continue
            messages = [(s, held[s].subject, held[s].data) for s in step.run]
            try:
                added = await asyncio.to_thread(self.store.append_many, messages) if messages else []
            except OutOfOrder:  # another writer moved the store: plan from its head
                fresh = await self.head()
                if fresh is None:
                    return None
                head, stale = fresh, False
                continue
            except Exception:  # noqa: BLE001 - the store is down or busy: try again, lose nothing
                attempt += 1
                log.exception("lineage store write failed for seqs %s..%s", step.run[0], step.run[-1])
                await _renew(held.values())
                await pause(self._stopping, self.settings.backoff(attempt))
                continue
            steps = [r for r in added if r.type in STEPS] if self.sink is not None else []
            if steps:
                await asyncio.to_thread(emit_all, self.sink, self.store, steps)
            if step.run:
                head = step.run[-1]
                self.metrics.handled.labels(self.service, self.subject, "ok").inc(len(step.run))
            for seq in step.recorded + step.run:
                await _ack(held.pop(seq))
            if step.waiting and self._gap != head + 1:
                log.info("lineage waits for stream sequence %d (%d later held)", head + 1, len(step.waiting))
            self._gap = head + 1 if step.waiting else 0
            return head
        return None


async def _renew(messages: Iterable[Msg]) -> None:
    """Extend the lease of held messages while the store is down, so they are not redelivered."""
    for msg in messages:
        with contextlib.suppress(Exception):
            await msg.in_progress()


async def _ack(msg: Msg) -> None:
    """Ack after the commit; a lost ack only means a redelivery, which is acked as already recorded."""
    with contextlib.suppress(Exception):
        await msg.ack()
