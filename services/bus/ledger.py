"""Which inputs a service has handled, and what it published for each: exactly one result per cause.

The stream's duplicate window (CAIRN_DUPLICATE_WINDOW_S) drops a republished output only while the
window lasts. Past it, a redelivered input (an ack lost in a crash, an upstream retry, a recreated
durable reading history again) would run the step again and store its outputs a second time. So
the consumer policy keeps its own record in a JetStream key-value bucket (`cairn_handled`, one per
namespace, entries kept `CAIRN_HANDLED_TTL_S`, a week by default), one key per service and input:

- `pending` + the encoded outputs, written after the handler and before the first publish: a
  redelivery republishes exactly these (same ids) without running the handler again;
- `ok` / `rejected` + the output ids, written after the last publish: a redelivery is only acked.

The one gap left is a crash between an output's PubAck and the `ok` record whose redelivery then
comes after the duplicate window: the stored outputs are republished and the log holds that event
twice, under one id (consumers' own ledgers make the second copy a no-op).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from faststream.nats import NatsBroker
from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KeyValue

from contracts import Envelope, decode
from services.bus.provision import handled_bucket
from services.settings import CairnSettings

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

    def __init__(self, broker: NatsBroker, settings: CairnSettings, service: str):
        self.broker = broker
        self.settings = settings
        self.service = service
        self.bucket = handled_bucket(settings.namespace)
        self._kv: KeyValue | None = None

    def key(self, event: Envelope[Any] | None, stream_sequence: int | None) -> str:
        """`<service>.<digest of type and id>`; a message that is no event is known by its sequence.

        Hashed: event ids may hold ':' and '..', which are not valid in KV keys.
        """
        if event is None:
            return f"{self.service}.seq.{stream_sequence}"
        digest = hashlib.sha256(f"{event.type}\n{event.id}".encode()).hexdigest()[:40]
        return f"{self.service}.{digest}"

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            js = self.broker.config.connection_state.stream
            try:
                self._kv = await js.key_value(self.bucket)
            except BucketNotFoundError:
                raise LookupError(f"KV bucket {self.bucket} not found: run `cairn provision`") from None
        return self._kv

    async def get(self, key: str) -> Record | None:
        kv = await self._bucket()
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        doc = json.loads(entry.value)
        return Record(doc["outcome"], doc.get("outputs", []), doc.get("encoded", []), doc.get("at", 0.0))

    async def pending(self, key: str, outputs: Sequence[Envelope[Any]], limit: int) -> bool:
        """Keep the outputs before publishing them; False (nothing kept) when they exceed `limit`
        bytes: a redelivery then runs the handler again, and only the duplicate window dedups."""
        encoded = [out.encode().decode() for out in outputs]
        if sum(len(text) for text in encoded) > limit - RECORD_HEADROOM:
            log.warning("%s: outputs of %s too large to keep; a redelivery would rerun it", self.service, key)
            return False
        await self._put(key, PENDING, [out.id for out in outputs], encoded)
        return True

    async def done(self, key: str, outcome: str, output_ids: Sequence[str]) -> None:
        await self._put(key, outcome, list(output_ids), [])

    async def _put(self, key: str, outcome: str, output_ids: list[str], encoded: list[str]) -> None:
        doc = {"service": self.service, "outcome": outcome, "outputs": output_ids, "at": time.time()}
        if encoded:
            doc["encoded"] = encoded
        kv = await self._bucket()
        await kv.put(key, json.dumps(doc).encode())
