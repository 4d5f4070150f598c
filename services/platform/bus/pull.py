"""The pull loop under every typed route: keep pull requests open for the free handler slots,
run each message as its own task under the consumer policy, keep their leases, drain on stop.

It replaces FastStream's pull subscriber on the hot path (measured in bench/bus.py): that one
pulls one message per request, wraps each in its own message object and middleware chain, and
runs the decoder in a thread pool per message. Here the open requests never ask for more than
the free slots, so a light route with many slots drains a backlog in batches while a heavy one
(training, one slot per trial it can run) never takes more than it can start: replicas still
share the work. The consumer (services.platform.bus.consumer.EventConsumer) keeps the policy:
ledger, retries, dead letters, exactly one result per cause.

The requests are JetStream's pull protocol spoken on a subscription of the loop's own
(`PullRequests`), as the Go client's `Consume` does: a request is sent as soon as slots free up,
while the messages of the last one are still being handled. nats-py's `fetch` returns a batch only
whole, so a loop on it sent its next request only after slots had freed and then waited a round
trip or two for the messages: on bench/bus.py's route of 256 slots, a third of them stood empty.
Lineage, which records a whole batch at once, still fetches (`LongPoll`, `ready`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
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
# A request the server neither filled nor ended this long past its expiry was lost with a server
# or a consumer leader; the slots it held are asked for again.
LOST_AFTER_S = 2.0


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
        self._changed = asyncio.Event()  # a slot freed, or a request ended
        self._stopping = asyncio.Event()
        self._requests: PullRequests | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # Ask again once a quarter of the slots is free (or nothing is asked): a request per slot
        # would cost a round trip per message.
        self._ask_at = max(1, self.slots // 4)

    async def start(self, js: Any, nc: Any) -> None:
        """Bind the durable (created when missing, so readiness sees it at once) and start pulling."""
        options = {"inbox_prefix": self.inbox_prefix} if self.inbox_prefix else {}
        bound = await js.pull_subscribe(
            self.subject, durable=self.durable, stream=self.stream, config=self.config, **options
        )
        await bound.unsubscribe()  # it only bound the durable: the requests have a subscription of their own
        self._requests = PullRequests(nc, self.stream, self.durable, self._arrived, self._changed.set)
        self._stopping.clear()
        name = f"pull:{self.durable}"
        self._tasks = [
            asyncio.create_task(self._pull(), name=name),
            asyncio.create_task(self._keep_leases(), name=name + ":leases"),
            asyncio.create_task(self._sweep(), name=name + ":sweep"),
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
        if self._requests is not None:
            await self._requests.close()
            self._requests = None

    async def _pull(self) -> None:
        """Keep requests open for every free slot: the server holds each until its messages came or
        it expired (FETCH_WAIT_S), so a quiet route costs one request per expiry."""
        requests = self._requests
        assert requests is not None
        while not self._stopping.is_set():
            self._changed.clear()
            free = self.slots - len(self._in_flight) - requests.owed
            if free > 0 and (free >= self._ask_at or not requests.owed):
                try:
                    await requests.ask(free)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - reconnecting: try again
                    why = f"{type(exc).__name__}: {exc}"
                    log.warning("%s: pull request failed (%s); retrying", self.durable, why)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), 1.0)
                    continue
            await self._changed.wait()

    async def _sweep(self) -> None:
        """Forget requests lost with a server or a consumer leader, so their slots are asked again."""
        while True:
            await asyncio.sleep(1.0)
            if self._requests is not None and self._requests.forget_lost():
                self._changed.set()

    def wake(self) -> None:
        """After a reconnect: forget the open requests, so fresh ones reach the server (a restarted
        one holds none of the old requests)."""
        if self._requests is not None:
            self._requests.forget_all()
            self._changed.set()

    async def _arrived(self, msg: Msg) -> None:
        if self._stopping.is_set():
            # Asked for before the stop: handed back at once rather than after its ack wait.
            with contextlib.suppress(Exception):
                await msg.nak()
            return
        self._start(msg)

    def _start(self, msg: Msg) -> None:
        """One task per message, under the consumer policy; its lease is kept while it runs."""
        task = asyncio.create_task(self.consumer(msg))
        self._in_flight[task] = (msg, time.monotonic())
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.pop(task, None)
        self._changed.set()
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


class PullRequests:
    """Open pull requests of one durable, each on a subscription of its own.

    A delivered message carries its stream subject, not the request's, so only the subscription it
    came on tells which request it answers; a status (404, 408: expired; 409: refused, a consumer
    leader changed or the consumer was deleted) ends its request. `owed` is what the open requests
    may still bring: the loop never asks for more than its free slots minus that.
    """

    def __init__(
        self,
        nc: Any,
        stream: str,
        durable: str,
        on_message: Callable[[Msg], Awaitable[None]],
        on_ended: Callable[[], None],
    ):
        self.nc = nc
        self.subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.durable = durable
        self.on_message = on_message
        self.on_ended = on_ended
        self.owed = 0
        self._open: dict[int, _Request] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._next = 0
        # Under the connection's inbox prefix: the NATS permissions grant a service's deliveries there.
        self._inbox = nc.new_inbox() + "."

    async def ask(self, batch: int) -> None:
        self._next += 1
        number = self._next
        sub = await self.nc.subscribe(self._inbox + str(number), cb=partial(self._on_reply, number))
        self._open[number] = _Request(sub, batch, time.monotonic() + FETCH_WAIT_S + LOST_AFTER_S)
        self.owed += batch
        body = json.dumps({"batch": batch, "expires": int(FETCH_WAIT_S * 1e9)}).encode()
        try:
            await self.nc.publish(self.subject, body, reply=sub.subject)
        except BaseException:
            self._end(number)
            raise

    def forget_lost(self) -> bool:
        now = time.monotonic()
        lost = [number for number, request in self._open.items() if request.lost_after < now]
        for number in lost:
            self._end(number)
        return bool(lost)

    def forget_all(self) -> None:
        for number in list(self._open):
            self._end(number)

    async def close(self) -> None:
        self.forget_all()
        await asyncio.gather(*self._closing)

    def _end(self, number: int) -> None:
        """Forget a request and drop its subscription, from a task of its own: the request's last
        message or status ends it from inside the subscription's callback, which `unsubscribe`
        would cancel."""
        request = self._open.pop(number, None)
        if request is not None:
            self.owed -= request.owed
            task = asyncio.ensure_future(_unsubscribe(request.sub))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _on_reply(self, number: int, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status is None:
            request = self._open.get(number)
            if request is not None:
                request.owed -= 1
                self.owed -= 1
                if not request.owed:
                    self._end(number)
            await self.on_message(msg)  # a message of a request forgotten is handled all the same
            return
        if status == "100":  # a heartbeat (none asked for) or flow control: nothing ends
            return
        if status == "409":
            log.info("%s: pull request ended: %s", self.durable, msg.headers.get("Description", ""))
        self._end(number)
        self.on_ended()


async def _unsubscribe(sub: Any) -> None:
    with contextlib.suppress(Exception):  # a closed connection has dropped it already
        await sub.unsubscribe()


@dataclass
class _Request:
    sub: Any
    owed: int
    lost_after: float  # monotonic


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
