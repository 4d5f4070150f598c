"""The stream's archive on a real nats-server and a real lineage store: what retention sends out of
the stream is archived first, signed and chained, and archive plus stream read as one history."""

from __future__ import annotations

import gzip
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from contracts import DataArrived, new_event, subject_for
from services.lineage import signing
from services.lineage.archive import (
    Archive,
    ArchiveError,
    MissingKey,
    archive_and_trim,
    history,
    retention_cutoff,
    signing_key,
    store_range,
)
from services.lineage.audit import stream_records, verify_records
from services.lineage.store import LineageStore, make_record
from tests.conftest import make_settings


async def publish(js, settings, count: int, start: int = 0) -> None:
    subject = subject_for(DataArrived, settings.namespace)
    for i in range(start, start + count):
        event = new_event(DataArrived(uri=f"file:///data/{i}.csv", target="y"), source="/test")
        await js.publish(subject, event.encode(), headers={"Nats-Msg-Id": event.id})


async def record_all(js, settings, store: LineageStore) -> None:
    """What the lineage service does: every stream message into the chained store."""
    store.append_many(await stream_records(js, settings.stream))


@pytest.fixture
def small_retention(nats_server, tmp_path: Path):
    return make_settings(nats_server.url, tmp_path, retention_max_bytes=6000, archive_segment_records=7)


async def test_trim_archives_before_the_stream_forgets_and_history_is_whole(js, small_retention):
    settings = small_retention
    store = LineageStore(settings.lineage_url)
    archive = Archive.of(settings)
    key = signing_key(settings)
    public = (settings.home_dir / "archive-keys" / "audit-public.pem").read_bytes()

    await publish(js, settings, 40)
    await record_all(js, settings, store)
    before = await stream_records(js, settings.stream)
    trim = await archive_and_trim(js, settings, store, archive, key)

    info = await js.stream_info(settings.stream)
    assert trim.archived > 0 and info.state.first_seq == trim.first_kept > 1
    assert info.state.bytes <= settings.retention_max_bytes
    assert archive.last_seq() == info.state.first_seq - 1  # nothing gone that is not archived
    assert len(archive.segments()) >= 2  # segments of at most 7 records, chained
    whole = history(archive, await stream_records(js, settings.stream), public)
    assert whole == before  # byte for byte, in order, nothing missing
    assert verify_records(archive.records(public) + store_range(store, trim.first_kept, 10**9)).ok

    # Later events: a second trim continues the archive where it ended.
    await publish(js, settings, 20, start=40)
    await record_all(js, settings, store)
    everything = before + (await stream_records(js, settings.stream))[-20:]
    await archive_and_trim(js, settings, store, archive, key)
    assert history(archive, await stream_records(js, settings.stream), public) == everything


async def test_nothing_leaves_the_stream_that_a_consumer_or_the_store_has_not_seen(js, small_retention):
    settings = small_retention
    store = LineageStore(settings.lineage_url)
    archive = Archive.of(settings)
    await publish(js, settings, 30)
    store.append_many((await stream_records(js, settings.stream))[:5])  # the store lags at seq 5
    trim = await archive_and_trim(js, settings, store, archive, signing_key(settings))
    assert archive.last_seq() <= 5 and trim.first_kept <= 6
    first = trim.first_kept

    await record_all(js, settings, store)
    sub = await js.pull_subscribe(subject_for(DataArrived, settings.namespace), durable="slow-reader")
    (msg,) = await sub.fetch(1)
    await msg.ack()  # the consumer has processed the stream's first message only
    trim = await archive_and_trim(js, settings, store, archive, signing_key(settings))
    assert trim.first_kept == first + 1 and trim.held_by and "slow-reader" in trim.held_by


def test_a_changed_dropped_or_foreign_segment_is_named(tmp_path: Path, small_retention):
    settings = small_retention
    archive = Archive(str(tmp_path / "archive"), "CAIRN")
    key = signing_key(settings)
    public = (settings.home_dir / "archive-keys" / "audit-public.pem").read_bytes()
    recs, prev = [], "0" * 64
    for seq in range(1, 13):
        rec = make_record(seq, "cairn.x.v1", json.dumps({"n": seq}).encode(), prev)
        recs.append(rec)
        prev = rec.hash
    first = archive.write(recs[:6], key)
    second = archive.write(recs[6:], key)
    assert [r.seq for r in archive.records(public)] == list(range(1, 13))
    with pytest.raises(ArchiveError, match="continues at 13"):
        archive.write(recs[:2], key)

    # A foreign key does not verify the honest archive.
    other = signing.keygen(tmp_path / "other")[1].read_bytes()
    with pytest.raises(ArchiveError, match="signature does not verify"):
        archive.records(other)

    # One record changed inside the first segment, re-gzipped: its signature no longer matches.
    doc = json.loads(gzip.decompress(Path(first.path).read_bytes()))
    doc["records"][2]["body"] = "u:" + json.dumps({"n": 999})
    Path(first.path).write_bytes(gzip.compress(json.dumps(doc).encode(), mtime=0))
    with pytest.raises(ArchiveError, match="segment 1-6 was changed after it was signed"):
        archive.records(public)
    with pytest.raises(MissingKey, match="segment 1-6 is signed, but there is no public key"):
        archive.records()  # without the key the archive is not read at all, never read unchecked

    # A dropped segment: the gap is named.
    Path(first.path).unlink()
    with pytest.raises(ArchiveError, match="records 1..6 are missing"):
        archive.records(public)
    assert second.first_seq == 7


def test_retention_cutoff_takes_the_oldest_first_and_keeps_a_suffix():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    recs, prev = [], "0" * 64
    for seq, age_s in enumerate([500, 400, 300, 10, 600], start=1):
        time = (now - timedelta(seconds=age_s)).isoformat()
        rec = make_record(seq, "cairn.x.v1", json.dumps({"id": f"e{seq}", "time": time}).encode(), prev)
        recs.append(rec)
        prev = rec.hash
    by_age = retention_cutoff(recs, now=now, max_age_s=200, stream_bytes=0, max_bytes=0)
    assert by_age == 3  # record 5 is old too, but record 4 is young: the stream keeps 4 and 5
    assert retention_cutoff(recs, now=now, max_age_s=0, stream_bytes=10_000, max_bytes=0) == 0
    by_bytes = retention_cutoff(recs, now=now, max_age_s=0, stream_bytes=500, max_bytes=300)
    assert 1 <= by_bytes < 5
