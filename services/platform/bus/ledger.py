"""Which inputs a service has handled, and what it published for each: exactly one result per cause.

The stream's duplicate window (CAIRN_DUPLICATE_WINDOW_S) drops a republished output only while the
window lasts. Past it, a redelivered input (an ack lost in a crash, an upstream retry, a recreated
durable reading history again) would run the step again and store its outputs a second time. So
the consumer policy keeps its own record in a JetStream key-value bucket (`cairn_handled`, one per
namespace, entries kept `CAIRN_HANDLED_TTL_S`, a week by default), one key per service and input:

- `pending` + the encoded outputs, written after the handler and before the first publish: a
  redelivery republishes exactly these (same ids) without running the handler again;
- `ok` / `rejected` + the output ids, written after the last PubAck and stored (its own PubAck
  awaited) before the input is acked: a redelivery is only acked. Not waiting for that PubAck was
  tried: a kill right after the record was handed to the client lost both record and ack, and the
  redelivery past the duplicate window published the outputs again.

The bucket's stream acknowledges records before they reach disk where the server allows it
(`persist_mode: async`, services.platform.bus.provision): the events stay fsynced, the ledger costs no
fsync, and a record a server crash forgets only makes its input run again inside the duplicate
window (docs/RELIABILITY.md, "The ledger is the exception").

The one gap left is an `ok` record that is not stored (a crash between an output's PubAck and the
record, or the server failing to store it) for an input that is delivered again after the
duplicate window: the stored outputs are republished and the log holds that event twice, under one
id (consumers' own ledgers make the second copy a no-op); a step without outputs runs again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from faststream.nats import NatsBroker
from nats.aio.msg import Msg
from nats.js.errors import APIError, NotFoundError

from contracts import Envelope, decode
from services.platform.bus.provision import handled_bucket
from services.platform.bus.publisher import EventPublisher
from services.platform.settings import CairnSettings

log = logging.getLogger(__name__)

PENDING, OK, REJECTED = "pending", "ok", "rejected"
# Room left in a record for everything but the outputs (the server's max_payload bounds a value).
RECORD_HEADROOM = 64 * 1024


@dataclass(frozen=True)
class Record:
    outcome: str
    output_ids: list[str] = field(default_factory=list)
    encoded: list[str] = field(default_factory=list)  # pending only: the outputs as JSON text
    at: float = 0.0

    def outputs(self) -> list[Envelope[Any]]:
        return [decode(text.encode()) for text in self.encoded]


class HandledLedger:
    """One per service process; the KV handle is opened on first use (never at construction)."""

    def __init__(self, broker: NatsBroker, settings: CairnSettings, service: str, publisher: EventPublisher):
        self.broker = broker
        self.settings = settings
        self.service = service
        self.publisher = publisher  # its PubAck futures carry the records' writes
        self.bucket = handled_bucket(settings.namespace)
        self.stream = f"KV_{self.bucket}"
        self._opened = False
        self._opening: asyncio.Future[None] | None = None

    def key(self, event: Envelope[Any] | None, stream_sequence: int | None) -> str:
        """`<service>.<digest of type and id>`; a message that is no event is known by its sequence.

        Hashed: event ids may hold ':' and '..', which are not valid in KV keys.
        """
        if event is None:
            return f"{self.service}.seq.{stream_sequence}"
        digest = hashlib.sha256(f"{event.type}\n{event.id}".encode()).hexdigest()[:40]
        return f"{self.service}.{digest}"

    async def _bucket(self) -> None:
        if not self._opened:
            # Many messages may ask at once on a cold start: one lookup serves them all.
            if self._opening is None or (self._opening.done() and self._opening.exception()):
                self._opening = asyncio.ensure_future(self._open())
            await asyncio.shield(self._opening)
            self._opened = True

    async def _open(self) -> None:
        """The bucket is there and answers direct gets: looked up once (a stream-info call)."""
        js = self.broker.config.connection_state.stream
        try:
            info = await js.stream_info(self.stream)
        except NotFoundError:
            raise LookupError(f"KV bucket {self.bucket} not found: run `cairn provision`") from None
        if not info.config.allow_direct:
            raise LookupError(f"KV bucket {self.bucket} does not allow direct gets: run `cairn provision`")

    async def get(self, key: str) -> Record | None:
        """The record kept for `key`, or None: never kept, expired, or deleted.

        A direct get of the key's last value, the request nats-py's `KeyValue.get` sends, on the
        publisher's reply subscription (bus.acks: no random token nor timer per call)."""
        await self._bucket()
        subject = f"$KV.{self.bucket}.{key}"
        reply = await (await self.publisher.acks.request(f"$JS.API.DIRECT.GET.{self.stream}.{subject}"))
        value = kept_value(reply, subject)
        if not value:
            return None
        doc = orjson.loads(value)
        return Record(doc["outcome"], doc.get("outputs", []), doc.get("encoded", []), doc.get("at", 0.0))

    async def pending(self, key: str, outputs: Sequence[Envelope[Any]], limit: int) -> bool:
        """Keep the outputs before publishing them; False (nothing kept) when they exceed `limit`
        bytes: a redelivery then runs the handler again, and only the duplicate window dedups."""
        kept = await self.pending_async(key, outputs, [out.encode() for out in outputs], limit)
        for ack in kept:
            await ack
        return bool(kept)

    async def pending_async(
        self, key: str, outputs: Sequence[Envelope[Any]], encoded: Sequence[bytes], limit: int
    ) -> list[asyncio.Future[Any]]:
        """`pending`, sent without waiting: its PubAck as a future (none when nothing is kept), so
        the outputs can follow it on the wire at once."""
        if sum(len(body) for body in encoded) > limit - RECORD_HEADROOM:
            log.warning("%s: outputs of %s too large to keep; a redelivery would rerun it", self.service, key)
            return []
        value = _record_bytes(
            self.service, PENDING, [out.id for out in outputs], [b.decode() for b in encoded]
        )
        return [await self._send(key, value)]

    async def done(self, key: str, outcome: str, output_ids: Sequence[str]) -> None:
        """The last record, stored before the input is acked: once it returns, a crash before the
        ack costs nothing (the redelivery finds `ok` and is only acked)."""
        value = _record_bytes(self.service, outcome, list(output_ids), [])
        await self.publisher.gathered([await self._send(key, value)])

    async def _send(self, key: str, value: bytes) -> asyncio.Future[Any]:
        """kv.put, its PubAck as a future, so the outputs can follow it on the wire at once."""
        await self._bucket()  # the bucket exists (LookupError otherwise)
        # Where nats-py's KeyValue.put publishes a key (cairn uses no JetStream domain).
        return await self.publisher.acks.send(f"$KV.{self.bucket}.{key}", value)


def kept_value(reply: Msg, subject: str) -> bytes | None:
    """A direct get's reply read as a KV value (None: no value). Only "not found" reads as none:
    any other status raises, since a record read as missing would run its input again."""
    headers = reply.headers or {}
    status = headers.get("Status")
    if status == "404":
        return None
    if status:
        raise APIError(code=int(status), description=headers.get("Description", "direct get failed"))
    if headers.get("Nats-Subject") != subject:
        raise APIError(description=f"direct get of {subject} answered for {headers.get('Nats-Subject')}")
    if headers.get("KV-Operation") in ("DEL", "PURGE"):
        return None
    return reply.data


def _record_bytes(service: str, outcome: str, output_ids: list[str], encoded: list[str]) -> bytes:
    doc: dict[str, Any] = {"service": service, "outcome": outcome, "outputs": output_ids, "at": time.time()}
    if encoded:
        doc["encoded"] = encoded
    return orjson.dumps(doc)
