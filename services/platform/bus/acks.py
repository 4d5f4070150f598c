"""JetStream publishes whose PubAcks come back as futures, on one reply subscription.

nats-py's `publish_async` does the same, but per message it waits on a semaphore through
`asyncio.wait_for`, draws two random tokens and builds a `PubAck` dataclass from the reply: on
the event path that was a tenth of a service's CPU per event (bench/bus.py). Here a reply is only
looked at for an error; the caller asked for the message to be stored, not for its sequence. A
reply that never comes fails its future after `timeout_s` (one sweeper per connection, instead of
a timer per message). `request` shares the same subscription for replies read whole (the
ledger's direct gets): nats-py's `request` draws a token and arms a timer per call.
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
        # token -> (future, deadline, whether the reply is a PubAck to check or a message to return)
        self._waiting: dict[str, tuple[asyncio.Future[Any], float, bool]] = {}
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
            for token, (future, deadline, _) in list(self._waiting.items()):
                if deadline > now:
                    break
                del self._waiting[token]
                if not future.done():
                    future.set_exception(TimeoutError(f"no reply within {self.timeout_s:g} s"))

    async def send(
        self, subject: str, body: bytes, headers: dict[str, str] | None = None
    ) -> asyncio.Future[bytes]:
        """Publish for the stream; the future holds the PubAck's bytes, or its error."""
        return await self._publish(subject, body, headers, pub_ack=True)

    async def request(self, subject: str, body: bytes = b"") -> asyncio.Future[Any]:
        """A request whose reply message (headers, data) the future holds, unread."""
        return await self._publish(subject, body, None, pub_ack=False)

    async def _publish(
        self, subject: str, body: bytes, headers: dict[str, str] | None, pub_ack: bool
    ) -> asyncio.Future[Any]:
        if not self._prefix:
            if self._started is None:
                self._started = asyncio.ensure_future(self._start())
            await asyncio.shield(self._started)
        self._next += 1
        token = str(self._next)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting[token] = (future, loop.time() + self.timeout_s, pub_ack)
        try:
            await self._nc.publish(subject, body, reply=self._prefix + token, headers=headers)
        except BaseException:
            self._waiting.pop(token, None)
            future.cancel()
            raise
        return future

    async def _on_reply(self, msg: Any) -> None:
        # Popped here or by the sweeper; a future cancelled by its caller is popped when its reply
        # comes or its deadline passes.
        waiting = self._waiting.pop(msg.subject[len(self._prefix) :], None)
        if waiting is None or waiting[0].done():
            return
        future, _, pub_ack = waiting
        if not pub_ack:
            future.set_result(msg)
        elif msg.headers and msg.headers.get("Status") == NO_RESPONDERS:
            future.set_exception(NoStreamResponseError())
        elif b'"error"' in msg.data and "error" in (doc := json.loads(msg.data)):
            future.set_exception(_api_error(doc["error"]))
        else:
            future.set_result(msg.data)


def _api_error(error: dict[str, Any]) -> APIError:
    """The server's refusal as nats-py's exception class for its code. `APIError.from_error` raises
    it instead of returning it: called bare in the reply callback, it escaped there and left the
    future waiting (until the timeout, as if no PubAck had come)."""
    try:
        APIError.from_error(error)
    except APIError as exc:
        return exc
    return APIError(**error)
