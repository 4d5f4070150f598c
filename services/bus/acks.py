"""JetStream publishes whose PubAcks come back as futures, on one reply subscription.

nats-py's `publish_async` does the same, but per message it waits on a semaphore through
`asyncio.wait_for`, draws two random tokens and builds a `PubAck` dataclass from the reply: on
the event path that was a tenth of a service's CPU per event (bench/bus.py). Here a reply is only
looked at for an error; the caller asked for the message to be stored, not for its sequence. A
reply that never comes fails its future after `timeout_s` (one sweeper per connection, instead of
a timer per message).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from nats.js.errors import APIError, NoStreamResponseError

NO_RESPONDERS = "503"


class PubAcks:
    """One per connection: `send` publishes with a reply subject and returns the PubAck's future."""

    def __init__(self, nc: Any, timeout_s: float = 10.0):
        self.connection = nc
        self._nc = nc
        self.timeout_s = timeout_s
        self._prefix = ""
        self._next = 0
        self._waiting: dict[str, tuple[asyncio.Future[bytes], float]] = {}
        self._started: asyncio.Future[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def _start(self) -> None:
        # Under the connection's own inbox prefix, which the NATS permissions already grant.
        prefix = f"{bytes(self._nc._inbox_prefix).decode()}.{self._nc._nuid.next().decode()}."
        await self._nc.subscribe(prefix + "*", cb=self._on_reply)
        self._prefix = prefix
        self._sweeper = asyncio.create_task(self._sweep(), name="pubacks-sweeper")

    async def _sweep(self) -> None:
        """Fail what waited past its deadline; sends are in deadline order, so stop at the first
        one still in time."""
        loop = asyncio.get_running_loop()
        while not self._nc.is_closed:
            await asyncio.sleep(min(1.0, self.timeout_s / 4))
            now = loop.time()
            for future, deadline in list(self._waiting.values()):
                if deadline > now:
                    break
                if not future.done():
                    future.set_exception(TimeoutError(f"no PubAck within {self.timeout_s:g} s"))

    async def send(
        self, subject: str, body: bytes, headers: dict[str, str] | None = None
    ) -> asyncio.Future[bytes]:
        if not self._prefix:
            if self._started is None:
                self._started = asyncio.ensure_future(self._start())
            await asyncio.shield(self._started)
        self._next += 1
        token = str(self._next)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        self._waiting[token] = (future, loop.time() + self.timeout_s)
        future.add_done_callback(lambda _, t=token: self._waiting.pop(t, None))
        try:
            await self._nc.publish(subject, body, reply=self._prefix + token, headers=headers)
        except BaseException:
            future.cancel()
            raise
        return future

    async def _on_reply(self, msg: Any) -> None:
        waiting = self._waiting.get(msg.subject[len(self._prefix) :])
        if waiting is None or waiting[0].done():
            return
        future = waiting[0]
        if msg.headers and msg.headers.get("Status") == NO_RESPONDERS:
            future.set_exception(NoStreamResponseError())
        elif b'"error"' in msg.data and "error" in (doc := json.loads(msg.data)):
            future.set_exception(APIError.from_error(doc["error"]))
        else:
            future.set_result(msg.data)
