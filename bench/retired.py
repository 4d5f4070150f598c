"""The private paths bench/public_api.py measured and services/ no longer has (issue 28, item 3).

nats-py's public API costs less than twice as much as each of them, so cairn uses it now. They are
kept here, as they worked in services/platform/bus/ before the switch (kv.py's FastKeyValue,
acks.py's `request` without its timeout sweeper, pull.py's `ready`), only so that the figures in
docs/DESIGN-NOTES.md can be measured again. They read nats-py internals (`kv._pre`, `_direct`,
`_js._prefix`, `_stream`; `sub._nc`, `_nms`, `_deliver`, `_sub`), so a nats-py upgrade may break
this file and nothing else.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nats.aio.msg import Msg
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from services.platform.bus.acks import PubAcks

WRONG_LAST_SEQUENCE = 10071
READY_WAIT_S = 1.0


class Replies:
    """PubAcks' `request`: requests whose replies share one subscription, no timer per call."""

    def __init__(self, nc: Any):
        self.nc = nc
        self.prefix = ""
        self.next = 0
        self.waiting: dict[str, asyncio.Future[Any]] = {}

    async def request(self, subject: str) -> asyncio.Future[Any]:
        if not self.prefix:
            prefix = self.nc.new_inbox() + "."
            await self.nc.subscribe(prefix + "*", cb=self.on_reply)
            self.prefix = prefix
        self.next += 1
        token = str(self.next)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiting[token] = future
        await self.nc.publish(subject, b"", reply=self.prefix + token)
        return future

    async def on_reply(self, msg: Any) -> None:
        future = self.waiting.pop(msg.subject[len(self.prefix) :], None)
        if future is not None and not future.done():
            future.set_result(msg)


@dataclass(frozen=True)
class Entry:
    key: str
    value: bytes
    revision: int


class FastKeyValue:
    """bus/kv.py: `get` as a direct get on a shared reply subscription, `update` over PubAcks."""

    def __init__(self, kv: KeyValue, acks: Callable[[], PubAcks], replies: Replies):
        self.kv = kv
        self.acks = acks
        self.replies = replies

    def subject(self, key: str) -> str:
        return f"{self.kv._pre}{key}"

    async def get(self, key: str) -> Entry:
        kv = self.kv
        if not kv._direct:
            entry = await kv.get(key)
            return Entry(key, entry.value or b"", entry.revision or 0)
        subject = f"{kv._js._prefix}.DIRECT.GET.{kv._stream}.{self.subject(key)}"
        reply = await (await self.replies.request(subject))
        headers = reply.headers or {}
        status = headers.get("Status")
        if status == "404" or headers.get("KV-Operation") in ("DEL", "PURGE"):
            raise KeyNotFoundError
        if status:
            raise APIError(code=int(status), description=headers.get("Description", ""))
        return Entry(key, reply.data, int(headers["Nats-Sequence"]))

    async def update(self, key: str, value: bytes, last: int) -> int:
        headers = {"Nats-Expected-Last-Subject-Sequence": str(last)}
        try:
            ack = await (await self.acks().send(self.subject(key), value, headers))
        except APIError as err:
            if err.err_code == WRONG_LAST_SEQUENCE:
                raise KeyWrongLastSequenceError(description=err.description) from None
            raise
        return int(json.loads(ack)["seq"])


async def ready(sub: Any, batch: int) -> list[Msg]:
    """bus/pull.py: a no-wait pull request, read until the server's status line or a full batch."""
    request = json.dumps({"batch": batch, "no_wait": True}).encode()
    await sub._nc.publish(sub._nms, request, sub._deliver)
    out: list[Msg] = []
    while len(out) < batch:
        try:
            msg = await sub._sub.next_msg(timeout=READY_WAIT_S)
        except TimeoutError:
            break
        if msg.headers and msg.headers.get("Status"):
            break
        out.append(msg)
    return out
