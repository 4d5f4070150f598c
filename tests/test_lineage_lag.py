"""The lineage store keeps up with the stream, and lineage queries read their writes.

A real nats-server and the lineage service in-process. Bursts of events, and the tail of a run
after a quiet spell, must be in the store, in stream order, within a bound that a batch left
waiting on a redelivery (ack wait, 30 s by default) cannot meet: a correctness bound, not a speed
target (bench/load.py reports the lag).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
import uuid

import pytest

from services.lineage.app import DURABLE, Lineage
from services.lineage.audit import verify_records
from services.lineage.catchup import wait_until_caught_up
from services.lineage.store import LineageStore
from services.platform.runtime import ServiceRunner
from tests.conftest import make_settings, wait_for

ACK_WAIT_S = 30.0  # the default lease: what a message dropped in flight would hold the chain back
CAUGHT_UP_S = 10.0

# (quiet spell before, events in the burst). Many short runs back to back or after a short pause
# (each one's tail must land), the tail of a run after a longer pause, a burst larger than one
# fetch. The pauses shape the traffic; no assertion depends on them.
SCHEDULE = (
    [(0.0, 40), (0.0, 1), (0.0, 3)]
    + [((0.0, 0.0, 0.02, 0.1)[i % 4], 1 + i * 7 % 30) for i in range(300)]
    + [(0.25, 5), (1.5, 3), (0.0, 300), (1.2, 2)]
)


@pytest.fixture
def settings(nats_server, tmp_path):
    return make_settings(nats_server.url, tmp_path, ack_wait_s=ACK_WAIT_S)


async def start_lineage(settings) -> ServiceRunner:
    runner = ServiceRunner(Lineage(settings))
    await runner.start()
    return runner


@pytest.fixture
async def lineage(settings, js):
    runner = await start_lineage(settings)
    yield runner
    await runner.stop()


def body(i: int) -> bytes:
    """Mostly CloudEvents; now and then bytes that are not JSON at all, which lineage keeps too."""
    if i % 17 == 5:
        return b"\xff\x00 not json"
    doc = {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "type": "cairn.test.v1",
        "source": "/test",
        "correlationid": "lag",
        "data": {"i": i},
    }
    return json.dumps(doc).encode()


async def publish_burst(js, n: int) -> int:
    """n events in flight at once, as services publish them; returns the last stream sequence."""
    acks = await asyncio.gather(*(js.publish(f"cairn.test.{i % 3}", body(i)) for i in range(n)))
    return max(a.seq for a in acks)


async def settled(js) -> bool:
    info = await js.consumer_info("CAIRN", DURABLE)
    return info.num_pending == 0 and info.num_ack_pending == 0


async def recorded(store: LineageStore, seq: int, what: str) -> None:
    """Wait until the store holds `seq`, polled every few ms: a round costs what lineage takes."""
    deadline = time.monotonic() + CAUGHT_UP_S
    while store.last_seq() < seq:
        assert time.monotonic() < deadline, f"{what}: stream seq {seq} not recorded after {CAUGHT_UP_S}s"
        await asyncio.sleep(0.005)


def assert_whole_chain(store: LineageStore, last: int) -> None:
    records = store.all()
    assert [r.seq for r in records] == list(range(1, last + 1))
    verdict = verify_records(records)
    assert verdict.ok, verdict


async def test_bursts_and_tails_reach_the_store_in_order(settings, js, lineage):
    store = LineageStore(settings.lineage_url)
    last = 0
    for round_no, (quiet, n) in enumerate(SCHEDULE):
        if quiet:
            await asyncio.sleep(quiet)  # the quiet spell before a run's tail
        last = await publish_burst(js, n)
        await recorded(store, last, f"round {round_no}")
    assert_whole_chain(store, last)
    await wait_for(lambda: settled(js), CAUGHT_UP_S, "every message acknowledged after its commit")


async def test_store_down_loses_nothing(settings, js, tmp_path, caplog):
    """A locked store fails every write; lineage holds the messages and retries with backoff."""
    db = tmp_path / "lineage-locked.db"
    settings = settings.model_copy(update={"lineage_db": f"sqlite:///{db}?timeout=0.2"})
    runner = await start_lineage(settings)
    store = LineageStore(settings.lineage_url)
    try:
        first = await publish_burst(js, 5)
        await wait_for(lambda: store.last_seq() >= first, CAUGHT_UP_S, "the first burst")
        lock = sqlite3.connect(db, isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        try:
            with caplog.at_level(logging.ERROR, logger="services.lineage.writer"):
                last = await publish_burst(js, 30)
                await wait_for(
                    lambda: any("store write failed" in r.getMessage() for r in caplog.records),
                    CAUGHT_UP_S,
                    "a failed write while the store is locked",
                )
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        await wait_for(lambda: store.last_seq() >= last, CAUGHT_UP_S, "lineage to catch up after the lock")
        assert_whole_chain(store, last)
        await wait_for(lambda: settled(js), CAUGHT_UP_S, "every message acknowledged after its commit")
    finally:
        await runner.stop()


async def test_a_delivery_lost_in_flight_holds_the_chain_only_until_redelivered(settings, js):
    """A replica took a message and died: later messages are held (not refused) until it comes back."""
    settings = settings.model_copy(update={"ack_wait_s": 2.0})
    store = LineageStore(settings.lineage_url)
    runner = await start_lineage(settings)
    first = await publish_burst(js, 3)
    await wait_for(lambda: store.last_seq() >= first, CAUGHT_UP_S, "the first burst")
    await runner.stop()
    last = await publish_burst(js, 20)
    crashed = await js.pull_subscribe_bind(DURABLE, stream="CAIRN")
    assert await crashed.fetch(1, timeout=5)  # never acked: its lease runs out after ack wait
    await crashed.unsubscribe()
    runner = await start_lineage(settings)
    try:
        await wait_for(lambda: store.last_seq() >= last, CAUGHT_UP_S, "the chain past the lost delivery")
        assert_whole_chain(store, last)
        await wait_for(lambda: settled(js), CAUGHT_UP_S, "every message acknowledged after its commit")
    finally:
        await runner.stop()


async def test_caught_up_store_answers_at_once(settings, js, lineage):
    store = LineageStore(settings.lineage_url)
    waits: list[tuple[int, int]] = []
    assert await wait_until_caught_up(settings, store, CAUGHT_UP_S, lambda *a: waits.append(a)) == (0, 0)
    last = await publish_burst(js, 12)
    await wait_for(lambda: store.last_seq() >= last, CAUGHT_UP_S, "the store to catch up")
    answer = await wait_until_caught_up(settings, store, CAUGHT_UP_S, lambda *a: waits.append(a))
    assert answer == (last, last)
    assert waits == []


async def test_query_waits_for_the_lineage_service_then_reads_its_writes(settings, js):
    """Events published while lineage is down: a query waits (saying so once) until it records them."""
    store = LineageStore(settings.lineage_url)
    await publish_burst(js, 20)
    newest = str(uuid.uuid4())
    event = {"id": newest, "type": "cairn.test.v1", "source": "/test"}
    last = (await js.publish("cairn.test.0", json.dumps(event).encode())).seq
    waits: list[tuple[int, int]] = []
    query = asyncio.create_task(wait_until_caught_up(settings, store, 60, lambda *a: waits.append(a)))
    await wait_for(lambda: waits, CAUGHT_UP_S, "the query to say it waits")
    assert not query.done()
    runner = await start_lineage(settings)
    try:
        assert await asyncio.wait_for(query, CAUGHT_UP_S) == (last, last)
    finally:
        await runner.stop()
    assert waits == [(0, last)]
    assert store.by_event_id(newest) is not None


async def test_query_gives_up_after_its_timeout_without_the_lineage_service(settings, js):
    store = LineageStore(settings.lineage_url)
    last = await publish_burst(js, 7)
    waits: list[tuple[int, int]] = []
    started = time.monotonic()
    assert await wait_until_caught_up(settings, store, 0.5, lambda *a: waits.append(a)) == (0, last)
    assert time.monotonic() - started >= 0.5
    assert waits == [(0, last)]
