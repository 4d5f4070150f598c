"""A key-value bucket read and written on the publisher's reply subscription (services.platform.bus.acks).

nats-py's KeyValue answers each get and each write through its own request: a reply token, a
timer and a parsed `PubAck` or `RawStreamMsg` per call. Tuning makes two or three such calls per
trial result (the result, the tally's compare-and-set, the tally read when its copy is stale) and
the ledger reads once per message; here they share one reply subscription, with no timer per call.
Only what those callers use is offered: `get`, `create` and `update`, with nats-py's own errors
(KeyNotFoundError, KeyWrongLastSequenceError), so a nats-py KeyValue can stand in for it.

Reads are direct gets where the bucket allows them (`allow_direct`); otherwise they go through
nats-py's own `get` (the stream API), as before.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from services.platform.bus.acks import PubAcks

WRONG_LAST_SEQUENCE = 10071  # JetStream's error code for a failed expected-last-subject-sequence


@dataclass(frozen=True)
class Entry:
    key: str
    value: bytes
    revision: int


class FastKeyValue:
    """`get`, `create` and `update` of a bucket over `acks()` (the current connection's PubAcks)."""

    def __init__(self, kv: KeyValue, acks: Callable[[], PubAcks]):
        self.kv = kv
        self.acks = acks

    def subject(self, key: str) -> str:
        """Where a write of `key` is published (the bucket's prefix, domains included)."""
        return f"{self.kv._pre}{key}"

    async def get(self, key: str) -> Entry:
        """The latest value; KeyNotFoundError when there is none (or it was deleted)."""
        kv = self.kv
        if not kv._direct:
            entry = await kv.get(key)
            return Entry(key, entry.value or b"", entry.revision or 0)
        subject = f"{kv._js._prefix}.DIRECT.GET.{kv._stream}.{self.subject(key)}"
        reply = await (await self.acks().request(subject))
        headers = reply.headers or {}
        status = headers.get("Status")
        if status == "404" or headers.get("KV-Operation") in ("DEL", "PURGE"):
            raise KeyNotFoundError
        if status:
            raise APIError(code=int(status), description=headers.get("Description", ""))
        return Entry(key, reply.data, int(headers["Nats-Sequence"]))

    async def create(self, key: str, value: bytes) -> int:
        """Write only if the key has never been written; KeyWrongLastSequenceError otherwise."""
        return await self.update(key, value, last=0)

    async def update(self, key: str, value: bytes, last: int) -> int:
        """Write only if the key's latest revision is `last`; KeyWrongLastSequenceError otherwise.
        Returns the new revision."""
        headers = {"Nats-Expected-Last-Subject-Sequence": str(last)}
        try:
            ack = await (await self.acks().send(self.subject(key), value, headers))
        except APIError as err:
            if err.err_code == WRONG_LAST_SEQUENCE:
                raise KeyWrongLastSequenceError(description=err.description) from None
            raise
        return int(json.loads(ack)["seq"])
