"""The champion lock: one JetStream KV entry per model name, moved only by compare-and-set.

Two deployment replicas can hold decisions for the same model at once. Each reads the record and
its revision, and moves the champion with `update(..., last=revision)`: the server refuses the
second writer, whose decision is then stale (made against a champion that is no longer there).
The MLflow alias follows the record (`settle_alias`), so the registry never keeps a loser.
"""

from __future__ import annotations

import asyncio
from typing import Any

from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError

from services.deployment.logic import ChampionRecord
from services.platform.bus.provision import champion_bucket
from services.platform.tracking import Tracker


class ChampionLock:
    def __init__(self, kv: Any):
        self.kv = kv

    @classmethod
    async def open(cls, js: Any, namespace: str) -> ChampionLock:
        bucket = champion_bucket(namespace)
        try:
            return cls(await js.key_value(bucket))
        except (BucketNotFoundError, NotFoundError):
            raise RuntimeError(f"KV bucket {bucket} is missing: run `cairn provision`") from None

    async def read(self, name: str) -> tuple[ChampionRecord | None, int]:
        """The record and its revision; (None, 0) when no champion was ever decided here."""
        try:
            entry = await self.kv.get(name)
        except KeyNotFoundError:
            return None, 0
        return ChampionRecord.decode(entry.value), entry.revision

    async def swap(self, name: str, record: ChampionRecord, revision: int) -> bool:
        """Write the record only if the entry is still at `revision` (0: still absent)."""
        try:
            await self.kv.update(name, record.encode(), last=revision)
        except KeyWrongLastSequenceError:
            return False
        return True


async def settle_alias(lock: ChampionLock, tracker: Tracker, name: str) -> ChampionRecord:
    """Point the registry's alias at the record, and again if the record moved meanwhile.

    Every alias write is followed by a check that the record did not change since it was read,
    so whichever replica writes last, the alias ends on the latest decided champion.
    """
    while True:
        record, revision = await lock.read(name)
        if record is None:
            raise RuntimeError(f"no champion record for {name}")
        await asyncio.to_thread(tracker.set_champion, name, record.version)
        if (await lock.read(name))[1] == revision:
            return record
