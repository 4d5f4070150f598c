"""Request records: which model version answered which request, off the hot path.

A sampled request leaves a `contracts.records.RequestRecord` in a bounded buffer; a background
task publishes the buffer `FLUSH_S` after its first record (and sleeps while none come) on the
record stream's subject (core NATS publish: JetStream stores it, nothing waits for an ack). A full
buffer drops records and counts them; a publish that fails drops that batch. Neither ever delays
or fails a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from typing import TYPE_CHECKING, Any

import orjson

from contracts.records import RequestRecord, record_subject
from services.platform.bus.provision import record_stream
from services.platform.settings import CairnSettings

if TYPE_CHECKING:
    from services.serving.champion import Served

log = logging.getLogger(__name__)
FLUSH_S = 0.5
MAX_BUFFERED = 10_000


def input_hash(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


class RequestRecorder:
    def __init__(self, settings: CairnSettings, rng: random.Random | None = None):
        self.rate = settings.request_record_rate
        self.subject = record_subject(settings.namespace)
        self.buffer: list[bytes] = []
        self.dropped = 0
        self.published = 0
        self.rng = rng or random.Random()  # noqa: S311 - sampling, not security
        self.nc: Any = None
        self._task: asyncio.Task[None] | None = None
        self._buffered = asyncio.Event()  # set by the first record after a flush

    def sampled(self) -> bool:
        return self.rate > 0 and (self.rate >= 1 or self.rng.random() < self.rate)

    def record(self, served: Served, route: str, body: bytes, rows: int, output: Any, start: float,
               request_id: str) -> None:
        """One answered request, if sampled: `start` is its perf_counter at arrival."""
        if not self.sampled():
            return
        self.add(
            RequestRecord(
                request_id=request_id, model_name=served.name, model_version=served.version,
                model_sha256=served.model.ref.sha256, route=route, input_sha256=input_hash(body), rows=rows,
                output=output, received_at=time.time() - (time.perf_counter() - start),
                latency_ms=(time.perf_counter() - start) * 1000,
            )
        )

    def add(self, record: RequestRecord) -> None:
        if len(self.buffer) >= MAX_BUFFERED:
            self.dropped += 1
            return
        self.buffer.append(orjson.dumps(record.model_dump(mode="json")))
        self._buffered.set()

    def start(self, nc: Any) -> None:
        if self.rate > 0:
            self.nc = nc
            self._task = asyncio.create_task(self._flush_forever())

    async def flush(self) -> None:
        batch, self.buffer = self.buffer, []
        if not batch or self.nc is None:
            return
        try:
            for data in batch:
                await self.nc.publish(self.subject, data)
            await self.nc.flush(timeout=2)
            self.published += len(batch)
        except Exception as exc:  # noqa: BLE001 - records are best effort by design
            self.dropped += len(batch)
            log.warning("dropped %d request records: %s", len(batch), type(exc).__name__)

    async def _flush_forever(self) -> None:
        """Every FLUSH_S while records come; asleep while none do (an idle endpoint wakes for nothing)."""
        while True:
            await self._buffered.wait()
            await asyncio.sleep(FLUSH_S)
            self._buffered.clear()
            await self.flush()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            await self.flush()


async def read_records(
    js: Any, settings: CairnSettings, *, model: str | None = None, last: int = 100
) -> list[RequestRecord]:
    """The newest `last` records of the record stream (of one model if named), oldest first.

    The reader behind a `cairn serving requests` command: direct gets by sequence, no consumer.
    """
    from nats.js.errors import NotFoundError

    try:
        state = (await js.stream_info(record_stream(settings))).state
    except NotFoundError:
        return []
    out: list[RequestRecord] = []
    seq = state.last_seq
    while seq >= max(state.first_seq, 1) and len(out) < last:
        try:
            msg = await js.get_msg(record_stream(settings), seq, direct=True)
        except NotFoundError:
            seq -= 1
            continue
        record = RequestRecord.model_validate_json(msg.data)
        if model is None or record.model_name == model:
            out.append(record)
        seq -= 1
    return out[::-1]
