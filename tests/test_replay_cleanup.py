"""A replay leaves nothing on the bus, however it ends: real nats-server, the `cairn` executable.

A replay SIGKILLed half-way cannot clean up after itself; its consumers must still go (NATS deletes
them once idle, `CAIRN_REPLAY_INACTIVE_S`), so that a message left unprocessed in its namespace does
not hold the stream's retention floor forever. A replay that ends leaves no consumer, bucket or
stream of its own, and removes what a killed one left.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from contracts import DataArrived, new_event, replay_namespace, subject_for
from services.lineage.archive import Archive, archive_and_trim, signing_key
from services.lineage.audit import stream_records
from services.lineage.store import LineageStore
from services.tools.replay import replay_of, replay_ttl, stale_replays
from tests.conftest import data_dir, make_settings, wait_for
from tests.test_journeys import CAIRN, user_env

INACTIVE_S = 2.0


def test_replay_resources_are_told_from_live_ones_by_name() -> None:
    token = replay_namespace("0123abcdef").replace(".", "_")
    assert replay_of(f"ingestion-data-arrived-v1-{token}") == token
    assert replay_of(f"KV_cairn_studies_{token}") == token
    assert replay_of(f"CAIRN_REQUESTS_{token}") == token
    for live in (
        "ingestion-data-arrived-v1",
        "KV_cairn_handled",
        "CAIRN",
        "CAIRN_REQUESTS",
        "KV_cairn_holds",
    ):
        assert replay_of(live) is None, live
    assert replay_ttl(2, 100) > 200, "every run to its timeout, and more"


def test_only_replays_without_consumers_and_older_than_the_threshold_are_stale() -> None:
    dead, live, young = (
        replay_namespace(r).replace(".", "_") for r in ("aaaaaaaaaa", "bbbbbbbbbb", "cccccccccc")
    )
    ages = {
        f"KV_cairn_studies_{dead}": 90.0,
        f"KV_cairn_handled_{dead}": 80.0,
        f"KV_cairn_studies_{live}": 500.0,
    }
    ages |= {f"KV_cairn_studies_{young}": 5.0, "KV_cairn_handled": 1e6, "CAIRN": 1e6}
    consumers = [f"training-trial-requested-v1-{live}", "training-trial-requested-v1"]
    assert stale_replays(consumers, ages, min_age_s=60) == {
        dead: [f"KV_cairn_handled_{dead}", f"KV_cairn_studies_{dead}"]
    }


async def replay_names(js, stream: str) -> tuple[set[str], set[str]]:
    """(consumers on the event stream, streams) that belong to some replay."""
    consumers = {c.name for c in await js.consumers_info(stream) if replay_of(c.name)}
    streams = {s.config.name for s in await js.streams_info() if replay_of(s.config.name)}
    return consumers, streams


def gone(pids: list[int]) -> bool:
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            continue
    return True


@pytest.mark.slow
async def test_a_killed_replay_cannot_pin_retention_and_a_finished_one_leaves_nothing(
    nats_server, tmp_path: Path, js
) -> None:
    # The `js` fixture provisioned the stream for the fixture's settings; these share its home.
    settings = make_settings(nats_server.url, tmp_path, replay_inactive_s=INACTIVE_S, retention_max_bytes=1)
    env = user_env(settings.home_dir, **settings.to_env())
    # A recorded run: an arrival whose file is missing, so the replayed run ends at ingestion.
    root = new_event(DataArrived(uri=(data_dir(settings) / "gone.csv").as_uri(), target="y"), source="/test")
    await js.publish(
        subject_for(DataArrived, settings.namespace), root.encode(), headers={"Nats-Msg-Id": root.id}
    )
    store = LineageStore(settings.lineage_url)
    store.append_many(await stream_records(js, settings.stream))

    # 1. Killed mid-replay: once its services have bound their consumers.
    log = (tmp_path / "killed.log").open("wb")
    replay = await asyncio.create_subprocess_exec(
        CAIRN, "replay", "--correlation", root.id, "--timeout", "120",
        env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        consumers = await wait_for(
            lambda: _names(js, settings.stream), timeout=240, what="the replay's services bound consumers"
        )
        token = replay_of(next(iter(consumers)))
        replay.send_signal(signal.SIGKILL)
        await asyncio.wait_for(replay.wait(), 30)
    finally:
        if replay.returncode is None:
            replay.kill()
        log.close()
    rid = token.rsplit("_", 1)[1]
    runtime = json.loads((settings.home_dir / "replays" / rid / "runtime.json").read_text())
    await wait_for(lambda: gone(list(runtime["pids"].values())), 60, "the replay's services dying with it")

    # Work left in its namespace that nobody will process: while a consumer waits on it, the
    # archiver may not trim past it (services.lineage.archive.consumers_floor).
    late = new_event(DataArrived(uri=root.data.uri, target="y"), source="/test")
    sent = await js.publish(subject_for(DataArrived, replay_namespace(rid)), late.encode())

    async def no_consumer_left() -> bool:
        return not {c for c in (await replay_names(js, settings.stream))[0] if replay_of(c) == token}

    await wait_for(no_consumer_left, INACTIVE_S + 60, "NATS deleting the killed replay's idle consumers")
    store.append_many(await stream_records(js, settings.stream))
    trim = await archive_and_trim(js, settings, store, Archive.of(settings), signing_key(settings))
    assert trim.held_by is None, trim.held_by
    assert trim.first_kept > sent.seq, "retention trims past what the killed replay left unprocessed"

    # 2. A replay that ends leaves nothing, and removes the killed one's buckets.
    done = await asyncio.create_subprocess_exec(
        CAIRN, "replay", "--correlation", root.id, "--timeout", "120",
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    output = (await asyncio.wait_for(done.communicate(), 400))[0].decode()
    assert "replayed as" in output, output
    assert await replay_names(js, settings.stream) == (set(), set())


async def _names(js, stream: str) -> set[str]:
    return (await replay_names(js, stream))[0]
