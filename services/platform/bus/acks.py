"""JetStream publishes whose PubAcks come back as futures, on one reply subscription; requests too.

What nats-py's `publish_async` offers, and within twice the cost (issue 28's rule would take it):
`.venv/bin/python bench/public_api.py`, bursts of 256 events with every PubAck awaited, gives 2.3 ms
per event here and 1.7 ms through `publish_async` (0.93 of this, paired rounds 0.46 to 1.67: the
server's fsync per event sets the pace), and 0.022 against 0.038 ms of the publisher's CPU (1.77
times). It stays for one fault: in nats-py 2.16 a publish the server refuses (an expected stream
or last sequence that does not match) leaves its `publish_async` future pending forever, the error
raised inside the client's reply callback instead (nats-io/nats.py#985, fix proposed in #994). Here
a refusal fails its future with nats-py's own exception, and a reply that never comes fails it
after `timeout_s` (one sweeper per connection, instead of a timer per message). A reply is only
looked at for an error; the caller asked for the message to be stored, not for its sequence.

`request` sends any request on the same subscription and hands back the reply as it came. The
handled-inputs ledger reads a record with it on every message: nats-py's `request` draws a random
reply token and starts an `asyncio.wait_for` per call, a quarter of the consumer's own CPU there
(docs/DESIGN-NOTES.md, "Both bus levers").
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from nats.aio.msg import Msg
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
        # token -> (future, deadline, whether the reply is handed back as it came)
        self._waiting: dict[str, tuple[asyncio.Future[Any], float, bool]] = {}
        self._started: asyncio.Future[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def _start(self) -> None:
        # A new inbox, under the connection's own inbox prefix, which the NATS permissions already grant.
        prefix = self._nc.new_inbox() + "."
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
            for token, (future, deadline, _raw) in list(self._waiting.items()):
                if deadline > now:
                    break
                del self._waiting[token]
                if not future.done():
                    future.set_exception(TimeoutError(f"no reply within {self.timeout_s:g} s"))

    async def send(
        self, subject: str, body: bytes, headers: dict[str, str] | None = None
    ) -> asyncio.Future[bytes]:
        """Publish for the stream; the future holds the PubAck's bytes, or its error."""
        return await self._publish(subject, body, headers, raw=False)

    async def request(self, subject: str, body: bytes = b"") -> asyncio.Future[Msg]:
        """A request whose future holds the reply message as it came, status headers and all
        (only a reply that never comes fails it); the caller reads it."""
        return await self._publish(subject, body, None, raw=True)

    async def _publish(
        self, subject: str, body: bytes, headers: dict[str, str] | None, *, raw: bool
    ) -> asyncio.Future[Any]:
        if not self._prefix:
            if self._started is None:
                self._started = asyncio.ensure_future(self._start())
            await asyncio.shield(self._started)
        self._next += 1
        token = str(self._next)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting[token] = (future, loop.time() + self.timeout_s, raw)
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
        future = waiting[0]
        if waiting[2]:
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
