"""The client's reader of the log, on a real nats-server: from any sequence to the end, events decoded
and refusals skipped, archive and stream as one history; the harness's StreamLog, the demo and gc read
through it."""

from __future__ import annotations

from pathlib import Path

import pytest

from contracts import DataArrived, dead_letter_subject, new_event, subject_for
from harness.stream import StreamLog
from services.lineage.archive import Archive, archive_and_trim, signing_key
from services.lineage.audit import stream_records
from services.lineage.store import LineageStore
from services.tools import demo, gc
from services.tools.client import Client
from tests.conftest import make_settings


async def publish(client: Client, count: int) -> list[str]:
    ids = []
    for i in range(count):
        event = new_event(DataArrived(uri=f"file:///data/{i}.csv", target="y"), source="/test")
        await client.publish(event)
        ids.append(event.id)
    return ids


async def test_read_log_reads_from_any_sequence_to_the_end_and_events_skip_refusals(settings, js) -> None:
    async with Client(settings, "test") as client:
        assert [m async for m in client.read_log()] == [], "an empty stream reads as nothing"
        ids = await publish(client, 3)
        await client.js.publish(dead_letter_subject("ingestion"), b"refused bytes")
        await client.js.publish(subject_for(DataArrived), b"{not an event")
        ids += await publish(client, 1)

        seqs = [m.metadata.sequence.stream async for m in client.read_log()]
        assert seqs == [1, 2, 3, 4, 5, 6]
        assert [m.metadata.sequence.stream async for m in client.read_log(5)] == [5, 6]
        assert [m async for m in client.read_log(7)] == [], "past the end reads as nothing"
        assert [e.id async for e in client.events()] == ids
        assert [e.id for e in await demo.run_events(settings)] == ids

        log = StreamLog(settings)
        assert [r.seq for r in await log.poll()] == seqs
        assert await log.poll() == [], "a poll reads only what is new"
        [late] = await publish(client, 1)
        [record] = await log.poll()
        assert record.seq == 7 and record.doc["id"] == late
        assert [r.doc is None for r in log.records] == [False] * 3 + [True, True, False, False]


@pytest.fixture
def small_retention(nats_server, tmp_path: Path):
    return make_settings(nats_server.url, tmp_path, retention_max_bytes=6000, archive_segment_records=7)


async def test_history_is_the_archive_then_the_stream_and_gc_sees_archived_runs(js, small_retention) -> None:
    settings = small_retention
    store = LineageStore(settings.lineage_url)
    async with Client(settings, "test") as client:
        ids = await publish(client, 40)
        everything = await stream_records(js, settings.stream)
        store.append_many(everything)
        trim = await archive_and_trim(js, settings, store, Archive.of(settings), signing_key(settings))
        assert trim.first_kept > 1, "retention moved the start of the log into the archive"

        assert await client.history() == everything
        runs = gc.runs_of_log(await client.history())
        assert set(runs) == set(ids), "every run, archived ones too (a DataArrived starts its own run)"
        assert runs[ids[0]].first_seq == 1
