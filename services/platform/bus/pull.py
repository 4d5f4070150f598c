"""The pull loop under every typed route: fetch as many messages as there are free handler slots,
run each as its own task under the consumer policy, keep their leases, drain on stop.

It replaces FastStream's pull subscriber on the hot path (measured in bench/bus.py): that one
pulls one message per request, wraps each in its own message object and middleware chain, and
runs the decoder in a thread pool per message. Here a fetch asks for up to `slots` messages at
once, so a light route with many slots drains a backlog in batches while a heavy one (training,
one slot per trial it can run) never takes more than it can start: replicas still share the work.
The consumer (services.platform.bus.consumer.EventConsumer) keeps the policy: ledger, retries,
dead letters, exactly one result per cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig
from nats.js.errors import APIError

log = logging.getLogger(__name__)

# One long poll. Idle, every route asks the server once per poll: at 2 s, the idle services and
# the server spent about 5 ms of CPU per second on it (a third of a 15 s trial phase's cost per
# trial); at 10 s about half that. A stop cancels the poll at once, and a reconnect (`wake`)
# replaces it: a restarted server has forgotten the request.
FETCH_WAIT_S = 10.0
READY_WAIT_S = 1.0  # bounds `ready` where the consumer turned out empty, and a lost reply


class PullLoop:
    """One durable, one route: at most `slots` messages in flight, each acked by its own task."""

    def __init__(
        self,
        consumer: Any,  # services.platform.bus.consumer.EventConsumer: called with each message
        *,
        subject: str,
        durable: str,
        stream: str,
        config: ConsumerConfig,
        slots: int,
        inbox_prefix: bytes | None,
        stop_grace_s: float,
    ):
        self.consumer = consumer
        self.subject, self.durable, self.stream, self.config = subject, durable, stream, config
        self.slots = max(slots, 1)
        self.inbox_prefix = inbox_prefix
        self.stop_grace_s = stop_grace_s
        self._in_flight: dict[asyncio.Task[None], tuple[Msg, float]] = {}
        self._slot_free = asyncio.Event()
        self._stopping = asyncio.Event()
        self._sub: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._poller: LongPoll | None = None

    async def start(self, js: Any) -> None:
        """Bind the durable (created when missing, so readiness sees it at once) and start pulling."""
        options = {"inbox_prefix": self.inbox_prefix} if self.inbox_prefix else {}
        self._sub = await js.pull_subscribe(
            self.subject, durable=self.durable, stream=self.stream, config=self.config, **options
        )
        self._poller = LongPoll(self._sub)
        self._stopping.clear()
        name = f"pull:{self.durable}"
        self._tasks = [
            asyncio.create_task(self._pull(), name=name),
            asyncio.create_task(self._keep_leases(), name=name + ":leases"),
        ]

    async def stop(self) -> None:
        """Stop fetching, let in-flight messages finish (up to the grace), cancel the rest: those are
        not acked and come back after their ack wait, to this replica or another."""
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._in_flight:
            _, late = await asyncio.wait(set(self._in_flight), timeout=self.stop_grace_s)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=5.0)
                log.warning(
                    "%s: %d messages left unacked at stop (redelivered later)", self.durable, len(late)
                )
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = self._poller = None

    async def _pull(self) -> None:
        while not self._stopping.is_set():
            free = self.slots - len(self._in_flight)
            if free <= 0:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            # A long poll for one message, started at once, then whatever else is ready, without
            # waiting. nats-py's `fetch(batch=n)` on an empty queue sends a pull request with an
            # expiry, which the server keeps open until n messages came or the expiry passed: a
            # route with free slots would hold the first message for up to FETCH_WAIT_S.
            # The first message says how many more the consumer holds (`num_pending`): the
            # no-wait request is sent only when there are some, not once per message on a quiet
            # route (a request and a "none" status the server would answer for nothing).
            try:
                first = await self._poller.next()  # type: ignore[union-attr]
                if first is None:  # woken: ask again
                    continue
                self._start(first)
                if free > 1 and first and first[0].metadata.num_pending:
                    self._start(await ready(self._sub, free - 1))
            except TimeoutError:  # nats-py's own and asyncio's bare one: nothing new
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reconnecting, a JetStream API error: try again
                log.warning("%s: fetch failed (%s: %s); retrying", self.durable, type(exc).__name__, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), 1.0)

    def wake(self) -> None:
        """After a reconnect: drop the poll in progress, so a fresh request reaches the server (a
        restarted one holds none of the old requests)."""
        if self._poller is not None:
            self._poller.wake()

    def _start(self, messages: list[Msg]) -> None:
        """One task per message, under the consumer policy; its lease is kept while it runs."""
        now = time.monotonic()
        for msg in messages:
            task = asyncio.create_task(self.consumer(msg))
            self._in_flight[task] = (msg, now)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.pop(task, None)
        self._slot_free.set()
        if not task.cancelled() and (exc := task.exception()) is not None:
            # The policy catches everything it can name; what escapes it is a bug, not a message fault.
            log.error("%s: message task failed", self.durable, exc_info=exc)

    async def _keep_leases(self) -> None:
        """Renew the lease of every message in flight for longer than a third of its ack wait:
        a long step keeps its message, a dead process stops renewing and loses it."""
        interval = max(self.consumer.ack_wait_s / 3, 0.2)
        while True:
            await asyncio.sleep(interval)
            due = time.monotonic() - interval
            for msg, since in list(self._in_flight.values()):
                if since <= due:
                    with contextlib.suppress(Exception):  # connection blips: the next tick tries again
                        await msg.in_progress()


class LongPoll:
    """The long poll for one message on a pull subscription, which `wake` can drop.

    Only the wait for the first message is dropped: nats-py's one-message fetch has taken nothing
    from the subscription until it returns, so a message the server sends meanwhile waits in the
    subscription's queue for the next poll. (A batch fetch dropped half-way would lose what it had
    gathered until the ack wait sent it again.)
    """

    def __init__(self, sub: Any):
        self.sub = sub
        self._polling: asyncio.Future[list[Msg]] | None = None

    async def next(self) -> list[Msg] | None:
        """One message, [] when the poll expired empty, None when `wake` dropped it."""
        self._polling = asyncio.ensure_future(self.sub.fetch(batch=1, timeout=FETCH_WAIT_S))
        try:
            return await self._polling
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # type: ignore[union-attr]  # the caller is stopping
                raise
            return None
        except TimeoutError:  # nats-py's own and asyncio's bare one: nothing new
            return []
        finally:
            self._polling = None

    def wake(self) -> None:
        if self._polling is not None:
            self._polling.cancel()


async def ready(sub: Any, batch: int) -> list[Msg]:
    """Up to `batch` messages the server holds now: nats-py's batch fetch, whose first request is a
    no-wait one, answered with what the consumer holds and a status line. Only where the consumer
    turned out empty (another replica took what `num_pending` counted) does it wait, up to
    READY_WAIT_S, for the next message. Cairn read that first reply itself, on the subscription's
    internals, until the fetch measured no dearer (bench/public_api.py, docs/DESIGN-NOTES.md)."""
    try:
        return await sub.fetch(batch, timeout=READY_WAIT_S)
    except (TimeoutError, APIError):  # nothing taken: nats-py raises only before the first message
        return []
