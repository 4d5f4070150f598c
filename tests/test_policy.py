"""The consumer policy's guarantees on real processes (tests/probe_service.py) and a real nats-server.

- A step that kills its process on every delivery ends in a rejection that names the original event
  and belongs to its run (so `cairn submit --wait` ends).
- Input that makes any pre-handler step raise is dead-lettered on the first delivery, with a reason.
- A hung step times out, is retried with backoff, then dead-lettered; the service carries on.
- One result per cause, beyond the duplicate window: a redelivered input is never handled again.
- A replay's dead letters stay in its namespace; a recreated durable does not re-run history.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import ServerVersion
from nats.aio.msg import Msg
from nats.js.errors import APIError

from contracts import (
    ArtifactRef,
    DataArrived,
    DatasetIngested,
    Envelope,
    PipelineContext,
    Task,
    TuningSpec,
    new_event,
)
from services.platform.bus.connection import connect, make_broker
from services.platform.bus.ledger import OK, HandledLedger, kept_value
from services.platform.bus.provision import async_persist, handled_bucket, provision_all
from services.platform.bus.publisher import EventPublisher
from services.platform.settings import CairnSettings
from tests.conftest import collect, env_for, events_of, make_settings, wait_for

ROOT = Path(__file__).resolve().parents[1]
ARRIVED = "cairn.data.arrived.v1"
RESULT = "cairn.data.rejected.v1"  # what the probe answers each data-arrived with
REJECTED = "cairn.event.rejected.v1"
DURABLE = "probe-data-arrived-v1"


@contextlib.asynccontextmanager
async def bus(server: Any, home: Path, **overrides: Any) -> AsyncIterator[tuple[CairnSettings, Any]]:
    """Settings for this test, and a JetStream context on a provisioned stream."""
    settings = make_settings(server.url, home, **overrides)
    nc = await connect(settings, "test")
    try:
        js = nc.jetstream()
        await provision_all(js, settings)
        yield settings, js
    finally:
        await nc.close()


class Probes:
    """Probe service processes, started (and restarted) the way a supervisor would."""

    def __init__(self, settings: CairnSettings, extra_env: dict[str, str] | None = None):
        self.env = {**os.environ, **env_for(settings), **(extra_env or {})}
        self.log = settings.home_dir / "probe.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self) -> subprocess.Popen[bytes]:
        with open(self.log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.probe_service", "0"],
                env=self.env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.started.append(proc)
        return proc

    async def exited(self, proc: subprocess.Popen[bytes], timeout: float = 60) -> int:
        return await asyncio.wait_for(asyncio.to_thread(proc.wait), timeout)

    async def supervise(self) -> None:
        """Restart the probe each time it dies, until cancelled."""
        while True:
            await asyncio.to_thread(self.start().wait)

    def stop(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.started:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def tail(self) -> str:
        return self.log.read_text()[-3000:] if self.log.exists() else ""


@contextlib.asynccontextmanager
async def supervised(probes: Probes) -> AsyncIterator[None]:
    task = asyncio.create_task(probes.supervise())
    try:
        yield
    finally:
        task.cancel()
        probes.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def arrival(uri: str) -> Envelope[DataArrived]:
    return new_event(DataArrived(uri=uri, target="y"), source="/test")


async def publish(js: Any, event: Envelope[Any], subject: str | None = None) -> Any:
    ack = await js.publish(subject or event.type, event.encode(), headers={"Nats-Msg-Id": event.id})
    assert not ack.duplicate
    return ack


def runs(settings: CairnSettings) -> list[str]:
    """Event ids, one per handler run of the probe (it appends them to a file)."""
    path = settings.home_dir / "probe-runs.log"
    return path.read_text().split() if path.exists() else []


async def settled(js: Any, durable: str, delivered: int = 0) -> bool:
    """The durable exists, has delivered past `delivered` stream messages and holds nothing."""
    try:
        info = await js.consumer_info("CAIRN", durable)
    except nats.js.errors.NotFoundError:
        return False
    return info.num_pending == 0 and info.num_ack_pending == 0 and info.delivered.stream_seq >= delivered


async def results(js: Any, subject: str, done: Callable[[list[Envelope[Any]]], bool], timeout: float = 60):
    msgs = await collect(js, subject, lambda m: done(events_of(m)), timeout=timeout)
    return events_of(msgs)


async def count(js: Any, subject: str) -> int:
    info = await js.stream_info("CAIRN", subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)


async def window_passed(js: Any) -> None:
    """Wait until the stream's duplicate window has passed for everything published so far: a
    message published now is dropped as a duplicate when republished, until the window ends."""
    marker = "window-" + uuid.uuid4().hex

    async def accepted_again() -> bool:
        ack = await js.publish("cairn.test.window", b"{}", headers={"Nats-Msg-Id": marker})
        return not ack.duplicate

    assert await accepted_again()
    await wait_for(accepted_again, 60, "the duplicate window to pass")


# 1. Give-up dead letters keep the run ------------------------------------------------------------
@pytest.mark.slow
async def test_a_step_that_kills_its_process_every_time_is_rejected_with_its_run(nats_server, tmp_path):
    async with bus(nats_server, tmp_path, ack_wait_s=1.0) as (settings, js):
        event = arrival("file:///probe-kill-always.csv")
        ack = await publish(js, event)
        probes = Probes(settings)
        async with supervised(probes):
            found = await results(
                js, REJECTED, lambda evs: any(e.data.stream_sequence == ack.seq for e in evs), timeout=180
            )
            await wait_for(lambda: settled(js, DURABLE, ack.seq), 60, "the consumer to settle")
        rejection = next(e for e in found if e.data.stream_sequence == ack.seq)
        dead = await collect(js, "cairn.dlq.probe", lambda m: len(m) >= 1)
    assert rejection.data.original_id == event.id, rejection.data
    assert rejection.data.original_type == ARRIVED
    assert rejection.correlationid == event.correlationid, "the rejection belongs to the run"
    assert rejection.causationid == event.id
    assert rejection.data.reason == "gave up after 3 attempts", rejection.data.reason
    assert rejection.data.deliveries == 4
    assert runs(settings).count(event.id) == 3, "each attempt crashed the process"
    assert len(probes.started) >= 4, probes.tail()
    assert json.loads(dead[0].data)["id"] == event.id


@pytest.mark.slow
async def test_submit_wait_ends_with_the_give_up_instead_of_its_timeout(nats_server, tmp_path):
    """The user's side of the same crash loop: `cairn submit --wait` returns 1 with the reason."""
    async with bus(nats_server, tmp_path, ack_wait_s=1.0) as (settings, _js):
        data = tmp_path / "data" / "probe-kill-always.csv"  # the probe crashes on this name
        data.parent.mkdir()
        data.write_text("x,y\n1,2\n")
        probes = Probes(settings)
        async with supervised(probes):
            submit = await asyncio.create_subprocess_exec(
                str(Path(sys.executable).with_name("cairn")),
                "submit",
                str(data),
                "--target",
                "y",
                "--wait",
                "--timeout",
                "600",
                env=probes.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(submit.communicate(), 300)
    assert submit.returncode == 1, (out + err).decode()
    assert "gave up after 3 attempts" in out.decode(), out.decode()
    assert "timed out" not in (out + err).decode()


# 2. Nothing escapes the policy ------------------------------------------------------------------
def dataset_event(uri: str) -> Envelope[DatasetIngested]:
    context = PipelineContext(
        model_name="probe", target="y", task=Task.regression, seed=0, tuning=TuningSpec(trials=1)
    )
    dataset = ArtifactRef(uri=uri, sha256="a" * 64, size=1, media_type="application/vnd.apache.parquet")
    payload = DatasetIngested(
        context=context,
        source_uri="file:///x.csv",
        source_sha256="b" * 64,
        dataset=dataset,
        rows=1,
        columns=[],
    )
    return new_event(payload, source="/test")


@pytest.mark.slow
async def test_an_input_that_breaks_a_check_is_dead_lettered_at_once(nats_server, tmp_path):
    async with bus(nats_server, tmp_path) as (settings, js):
        store = settings.artifacts
        cases = {
            # %00 passes the contract; unquoted it is a NUL, on which path resolution raises.
            f"{store}/sha256/aa/x%00y": "contains a control character",
            # urlsplit raises on a malformed IPv6 host: the policy's catch-all names the exception.
            "file://[::1/x": "cannot check input: ValueError: Invalid IPv6 URL",
            f"{store}/" + "n" * 400: "path segment over 255 bytes",
            f"{store}/../../../etc/passwd": "outside the artifact store",
        }
        sent: dict[int, tuple[str, str]] = {}
        for uri, expect in cases.items():
            event = dataset_event(uri)
            sent[(await publish(js, event)).seq] = (event.id, expect)
        # A raw NUL never gets that far: the contract's Uri pattern refuses control characters.
        raw = dataset_event(f"{store}/ok")
        body = raw.encode().replace(f"{store}/ok".encode(), f"{store}/a\\u0000b".encode())
        ack = await js.publish(raw.type, body, headers={"Nats-Msg-Id": raw.id})
        sent[ack.seq] = (raw.id, "invalid cairn.dataset.ingested.v1: data.dataset.uri")
        after = arrival("file:///after.csv")
        await publish(js, after)
        probes = Probes(settings)
        async with supervised(probes):
            found = await results(
                js, REJECTED, lambda evs: {e.data.stream_sequence for e in evs} >= set(sent), timeout=60
            )
            handled = await results(js, RESULT, lambda evs: any(e.causationid == after.id for e in evs))
        problems = []
        for rejection in found:
            event_id, expect = sent[rejection.data.stream_sequence]
            if expect not in rejection.data.reason or rejection.data.deliveries != 1:
                problems.append((expect, rejection.data.reason, rejection.data.deliveries))
            if rejection.data.original_id != event_id:
                problems.append((expect, "original id", rejection.data.original_id))
        assert not problems, problems
        assert len(found) == len(sent), "one rejection each"
        assert await count(js, "cairn.dlq.probe") == len(sent), "one dead letter each"
        assert [e.data.reason for e in handled] == ["handled on attempt 1"], "the service carried on"
        assert runs(settings) == [after.id], "no handler ran on a refused input"
        assert len(probes.started) == 1, "nothing crashed the service"


# 3. A step cannot hang forever ---------------------------------------------------------------------
@pytest.mark.slow
async def test_a_hung_step_times_out_is_retried_then_dead_lettered(nats_server, tmp_path):
    async with bus(nats_server, tmp_path, ack_wait_s=1.0) as (settings, js):
        hung = arrival("file:///probe-hang.csv")
        await publish(js, hung)
        after = arrival("file:///after.csv")
        await publish(js, after)
        probes = Probes(settings, {"CAIRN_HANDLER_TIMEOUT_S": "1"})
        async with supervised(probes):
            found = await results(js, REJECTED, lambda evs: any(e.data.original_id == hung.id for e in evs))
            handled = await results(js, RESULT, lambda evs: any(e.causationid == after.id for e in evs))
            await wait_for(lambda: settled(js, DURABLE, 2), 60, "the consumer to settle")
    rejection = next(e for e in found if e.data.original_id == hung.id)
    assert rejection.data.reason == "failed 3 times; last: timed out after 1 s", rejection.data.reason
    assert rejection.data.deliveries == 3
    assert rejection.correlationid == hung.correlationid
    assert runs(settings).count(hung.id) == 3, "retried after each timeout"
    assert [e.data.reason for e in handled] == ["handled on attempt 1"], "the service carried on"
    assert len(probes.started) == 1, probes.tail()


# 4. Exactly one result per cause, beyond the duplicate window ----------------------------------------
@pytest.mark.slow
async def test_an_input_redelivered_after_the_duplicate_window_is_not_handled_again(nats_server, tmp_path):
    async with bus(nats_server, tmp_path, duplicate_window_s=2.0) as (settings, js):
        event = arrival("file:///once.csv")
        first = await publish(js, event)
        probes = Probes(settings)
        async with supervised(probes):
            await results(js, RESULT, lambda evs: len(evs) >= 1)
            await wait_for(lambda: settled(js, DURABLE, first.seq), 60, "the first delivery to be acked")
            # Past the window the server stores the same event again: a second delivery of one cause.
            await window_passed(js)
            again = await js.publish(ARRIVED, event.encode(), headers={"Nats-Msg-Id": event.id})
            assert not again.duplicate and again.seq > first.seq
            later = arrival("file:///later.csv")
            await publish(js, later)
            found = await results(js, RESULT, lambda evs: any(e.causationid == later.id for e in evs))
            await wait_for(lambda: settled(js, DURABLE, again.seq + 1), 60, "the consumer to settle")
            stored = await count(js, RESULT)
    assert runs(settings) == [event.id, later.id], "the handler ran once per cause"
    assert [e.causationid for e in found] == [event.id, later.id]
    assert stored == 2, "one result per cause in the log"


@pytest.mark.slow
async def test_a_crash_after_publishing_republishes_the_kept_outputs_without_rerunning(nats_server, tmp_path):
    async with bus(nats_server, tmp_path, ack_wait_s=1.0) as (settings, js):
        event = arrival("file:///probe-kill-after-publish.csv")
        ack = await publish(js, event)
        probes = Probes(settings)
        async with supervised(probes):
            await wait_for(lambda: len(probes.started) >= 2, 120, "the probe to die once and restart")
            await wait_for(lambda: settled(js, DURABLE, ack.seq), 60, "the redelivery to be acked")
            stored = await count(js, RESULT)
            info = await js.consumer_info("CAIRN", DURABLE)
    assert (settings.home_dir / f"probe-died-{event.id}").exists()
    assert info.delivered.consumer_seq >= 2, "the message was delivered again after the crash"
    assert runs(settings) == [event.id], "the step was not run again"
    assert stored == 1


@pytest.mark.slow
async def test_a_crash_before_the_ack_is_not_handled_again_after_the_window(nats_server, tmp_path):
    async with bus(nats_server, tmp_path, ack_wait_s=1.0, duplicate_window_s=2.0) as (settings, js):
        event = arrival("file:///probe-kill-after-record.csv")
        ack = await publish(js, event)
        probes = Probes(settings)
        try:
            first = probes.start()
            assert await probes.exited(first, 120) == -signal.SIGKILL, probes.tail()
            assert await count(js, RESULT) == 1, "published and recorded, not acked"
            await window_passed(js)  # a republished output would now be stored again
            probes.start()
            await wait_for(lambda: settled(js, DURABLE, ack.seq), 60, "the redelivery to be acked")
            stored = await count(js, RESULT)
            info = await js.consumer_info("CAIRN", DURABLE)
        finally:
            probes.stop()
    assert info.delivered.consumer_seq >= 2, "the message was delivered again after the crash"
    assert runs(settings) == [event.id], "the step was not run again"
    assert stored == 1, "one result per cause in the log"


# 5. Replays and durables -------------------------------------------------------------------------
@pytest.mark.slow
async def test_a_replays_dead_letters_stay_in_its_namespace(nats_server, tmp_path):
    namespace = "cairn.replay.abc123"
    async with bus(nats_server, tmp_path, namespace=namespace) as (settings, js):
        ack = await js.publish(f"{namespace}.data.arrived.v1", b"not json")
        probes = Probes(settings, {"CAIRN_NAMESPACE": namespace})
        async with supervised(probes):
            dead = await collect(js, f"{namespace}.dlq.probe", lambda m: len(m) >= 1)
            found = await results(js, f"{namespace}.event.rejected.v1", lambda evs: len(evs) >= 1)
        live = await count(js, "cairn.dlq.probe") + await count(js, REJECTED)
    assert dead[0].data == b"not json"
    assert dead[0].headers["Cairn-Stream-Sequence"] == str(ack.seq)
    assert found[0].data.dead_letter_subject == f"{namespace}.dlq.probe"
    assert live == 0, "nothing of the replay reached the live namespace"


@pytest.mark.slow
async def test_a_recreated_durable_does_not_rerun_history(nats_server, tmp_path):
    async with bus(nats_server, tmp_path, duplicate_window_s=2.0) as (settings, js):
        before = [arrival(f"file:///before-{i}.csv") for i in range(3)]
        for event in before:
            last = await publish(js, event)
        probes = Probes(settings)
        try:
            probes.start()
            await results(js, RESULT, lambda evs: len(evs) >= 3)
            await wait_for(lambda: settled(js, DURABLE, last.seq), 60, "the first three to be acked")
            probes.stop()
            await js.delete_consumer("CAIRN", DURABLE)  # deleted, as by an operator or a rename
            await window_passed(js)  # republished outputs would now be stored again
            probes.start()
            after = arrival("file:///after.csv")
            ack = await publish(js, after)
            found = await results(js, RESULT, lambda evs: any(e.causationid == after.id for e in evs))
            await wait_for(lambda: settled(js, DURABLE, ack.seq), 60, "the new durable to settle")
            stored = await count(js, RESULT)
        finally:
            probes.stop()
    assert runs(settings) == [e.id for e in before] + [after.id], "history was not handled again"
    assert sorted(e.causationid for e in found) == sorted(e.id for e in [*before, after])
    assert stored == 4, "no duplicate outputs"


# The ledger's persistence -----------------------------------------------------------------------
async def _ledger_stream_config(js: Any, settings: CairnSettings) -> dict[str, Any]:
    name = "KV_" + handled_bucket(settings.namespace)
    reply = await js._nc.request(f"$JS.API.STREAM.INFO.{name}", b"", timeout=5)
    return json.loads(reply.data)["config"]


async def test_the_ledger_acknowledges_before_disk_and_keeps_it_through_a_ttl_change(nats_server, tmp_path):
    """One fsync per handled event (the output's) instead of three; the events stay fsynced."""
    async with bus(nats_server, tmp_path) as (settings, js):
        config = await _ledger_stream_config(js, settings)
        assert config["persist_mode"] == "async"
        assert config["max_msgs_per_subject"] == 1 and config["allow_direct"] is True
        events = json.loads((await js._nc.request(f"$JS.API.STREAM.INFO.{settings.stream}", b"")).data)
        assert events["config"].get("persist_mode", "default") == "default", "the event log is fsynced"
        shorter = settings.model_copy(update={"handled_ttl_s": 3600.0})
        await provision_all(js, shorter)
        config = await _ledger_stream_config(js, settings)
        assert config["max_age"] == 3600 * 10**9 and config["persist_mode"] == "async"


async def test_the_ledger_reads_none_only_where_nothing_is_kept(nats_server, tmp_path):
    """Its direct get on the publisher's reply subscription: a record, none for a key never kept or
    deleted, an error (never "none", which would run the input again) for any other answer."""
    async with bus(nats_server, tmp_path) as (settings, js):
        broker = make_broker(settings, "ledger-test")
        await broker.connect()
        try:
            ledger = HandledLedger(broker, settings, "probe", EventPublisher(broker, settings))
            assert await ledger.get("probe.never") is None
            await ledger.done("probe.kept", OK, ["out-1"])
            record = await ledger.get("probe.kept")
            assert record is not None and (record.outcome, record.output_ids) == (OK, ["out-1"])
            await (await js.key_value(handled_bucket(settings.namespace))).delete("probe.kept")
            assert await ledger.get("probe.kept") is None
            subject = f"$KV.{ledger.bucket}.probe.x"
            failed = Msg(None, subject="_", headers={"Status": "503", "Description": "No Responders"})
            with pytest.raises(APIError, match="503"):
                kept_value(failed, subject)
            elsewhere = Msg(None, subject="_", data=b"{}", headers={"Nats-Subject": f"$KV.{ledger.bucket}.y"})
            with pytest.raises(APIError, match="answered for"):
                kept_value(elsewhere, subject)
        finally:
            await broker.stop()


async def test_a_ledger_without_direct_gets_is_refused_by_name(nats_server, tmp_path):
    async with bus(nats_server, tmp_path) as (settings, js):
        name = "KV_" + handled_bucket(settings.namespace)
        config = (await js.stream_info(name)).config
        config.allow_direct = False
        await js.update_stream(config)
        broker = make_broker(settings, "ledger-test")
        await broker.connect()
        try:
            ledger = HandledLedger(broker, settings, "probe", EventPublisher(broker, settings))
            with pytest.raises(LookupError, match="direct gets: run `cairn provision`"):
                await ledger.get("probe.any")
        finally:
            await broker.stop()


async def test_the_ledger_is_fsynced_when_asked_to(nats_server, tmp_path):
    async with bus(nats_server, tmp_path, ledger_async_persist=False) as (settings, js):
        config = await _ledger_stream_config(js, settings)
        assert config.get("persist_mode", "default") == "default"


@pytest.mark.parametrize(
    ("version", "replicas", "expected"),
    [
        ("2.15.1", 1, True),
        ("2.12.0", 1, True),
        ("2.11.9", 1, False),
        ("2.9.10", 1, False),
        ("2.15.1", 3, False),
    ],
)
def test_async_persistence_only_where_the_server_supports_it(version, replicas, expected):
    assert async_persist(ServerVersion(version), replicas) is expected
