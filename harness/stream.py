"""The event log as a test or a benchmark needs it: read incrementally through the client's reader,
viewed by run, with its lineage."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from contracts import TrialCompleted, is_dead_letter, type_ends_run
from services.platform.bus.connection import connect
from services.platform.settings import CairnSettings
from services.tools.client import Client


@dataclass
class Record:
    """One message of the log as a test inspects it: the event as plain JSON (None for a dead letter
    or bytes that are not an event), its headers and its stream time."""

    seq: int
    subject: str
    ts: datetime
    doc: dict[str, Any] | None
    headers: dict[str, str]

    @classmethod
    def of(cls, msg: Any) -> Record:
        try:
            doc = json.loads(msg.data) if not is_dead_letter(msg.subject) else None
        except (ValueError, RecursionError):
            doc = None
        meta = msg.metadata
        return cls(
            meta.sequence.stream,
            msg.subject,
            meta.timestamp,
            doc if isinstance(doc, dict) else None,
            dict(msg.headers or {}),
        )

    @property
    def type(self) -> str | None:
        return self.doc.get("type") if self.doc else None

    @property
    def correlation(self) -> str | None:
        return self.doc.get("correlationid") if self.doc else None

    @property
    def data(self) -> dict[str, Any]:
        return (self.doc or {}).get("data") or {}


@dataclass
class StreamLog:
    """The log read incrementally through the client, each poll on a fresh connection (so it
    survives server restarts)."""

    settings: CairnSettings
    records: list[Record] = field(default_factory=list)
    next_seq: int = 1

    async def poll(self) -> list[Record]:
        """What the stream gained since the last poll; a restart mid-read keeps what was read."""
        new: list[Record] = []
        with contextlib.suppress(Exception):  # the server is restarting: the next poll reads on
            async with Client(self.settings, "bench-reader") as client:
                async for msg in client.read_log(self.next_seq):
                    new.append(Record.of(msg))
                    self.next_seq = new[-1].seq + 1
        self.records.extend(new)
        return new

    async def wait(
        self, done: Callable[[StreamLog], Any], timeout: float, what: str, every: float = 0.5
    ) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            await self.poll()
            value = done(self)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            await asyncio.sleep(every)

    # Views ----------------------------------------------------------------------------------
    def of_type(self, event_type: str) -> list[Record]:
        return [r for r in self.records if r.type == event_type]

    def on(self, subject: str) -> list[Record]:
        return [r for r in self.records if r.subject == subject]

    def run(self, correlation: str) -> list[Record]:
        return [r for r in self.records if r.correlation == correlation]

    def terminal(self, correlation: str) -> Record | None:
        for r in self.records:
            if r.correlation != correlation:
                continue
            if type_ends_run(r.type, r.data.get("passed")):
                return r
        return None

    def terminals(self, correlations: set[str]) -> dict[str, Record]:
        out: dict[str, Record] = {}
        for r in self.records:
            c = r.correlation
            if c in correlations and c not in out and type_ends_run(r.type, r.data.get("passed")):
                out[c] = r
        return out

    def trial_counts(self) -> Counter[tuple[str, int, int]]:
        """trial-completed events per (study, trial, rung): each must be exactly 1."""
        return Counter(
            (r.data["study_id"], r.data["trial_id"], r.data["rung"])
            for r in self.of_type(TrialCompleted.EVENT_TYPE)
        )


@dataclass
class LineageWatch:
    """The lineage store seen from outside: its last sequence polled every `every` seconds, and the
    wall-clock time each sequence was first seen there (the service itself records nothing extra)."""

    settings: CairnSettings
    every: float = 0.05
    seen: int = 0
    first_seen: dict[int, datetime] = field(default_factory=dict)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def run(self) -> None:
        from services.lineage.store import LineageStore

        store = await asyncio.to_thread(LineageStore, self.settings.lineage_url)
        try:
            while True:
                try:
                    last = await asyncio.to_thread(store.last_seq)
                except Exception:  # noqa: BLE001 - a write holds the SQLite lock: ask again
                    last = self.seen
                now = datetime.now(UTC)
                for seq in range(self.seen + 1, last + 1):
                    self.first_seen[seq] = now
                self.seen = max(self.seen, last)
                async with self.changed:
                    self.changed.notify_all()
                await asyncio.sleep(self.every)
        finally:
            store.close()

    async def reached(self, seq: int, timeout: float) -> bool:
        """Wait until the store holds `seq` (True), or `timeout` passes (False)."""
        async with self.changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait_for(lambda: self.seen >= seq), timeout)
        return self.seen >= seq

    def lags(self, records: list[Record]) -> list[float]:
        """Seconds from each record's stream timestamp to its first sighting in the store."""
        return [(self.first_seen[r.seq] - r.ts).total_seconds() for r in records if r.seq in self.first_seen]


async def publish_all(settings: CairnSettings, events: list[Any], concurrency: int = 64) -> dict[str, float]:
    """Publish with PubAcks, many in flight; returns event id -> seconds since the first publish."""
    nc = await connect(settings, "bench-publisher")
    js = nc.jetstream()
    sent: dict[str, float] = {}
    started = time.perf_counter()
    gate = asyncio.Semaphore(concurrency)

    async def one(event: Any) -> None:
        async with gate:
            subject = event.type  # subjects equal types in the live namespace
            await js.publish(subject, event.encode(), headers={"Nats-Msg-Id": event.id}, timeout=30)
            sent[event.id] = time.perf_counter() - started

    try:
        await asyncio.gather(*(one(e) for e in events))
    finally:
        await nc.close()
    return sent


async def wait_streamed(settings: CairnSettings, n: int, subject: str, timeout: float = 30) -> None:
    nc = await connect(settings, "bench")
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = await js.stream_info(settings.stream, subjects_filter=subject)
            if (info.state.subjects or {}).get(subject, 0) >= n:
                return
            await asyncio.sleep(0.2)
        raise AssertionError(f"{subject}: fewer than {n} stored after {timeout}s")
    finally:
        await nc.close()
