"""The bus against a real nats-server: standalone wire format, rejection and dead letters,
server-side dedup, replicas sharing one durable consumer, and redelivery after a crash."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from contracts import DataArrived, new_event
from services.ingestion.app import Ingestion
from services.platform.runtime import Route, Service, ServiceRunner
from services.tools.supervisor import free_port
from tests.conftest import collect, env_for, events_of, wait_for

ROOT = Path(__file__).resolve().parents[1]


def small_csv(folder: Path, name: str = "small.csv", rows: int = 40) -> Path:
    path = folder / name
    lines = ["x,colour,y"] + [f"{i},{'red' if i % 3 else 'blue'},{i * 2.5 + (i % 7)}" for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


async def test_standalone_publisher_with_plain_nats_py(settings, js, tmp_path):
    """An upstream system with nothing but nats-py and a JSON document drives ingestion."""
    csv = small_csv(tmp_path)
    document = f"""{{
      "specversion": "1.0", "id": "erp-export-0001", "source": "/erp/exports",
      "type": "cairn.data.arrived.v1", "time": "2026-11-26T08:00:00+01:00",
      "correlationid": "erp-export-0001",
      "data": {{"uri": "file://{csv}", "target": "y"}}
    }}"""
    runner = ServiceRunner(Ingestion(settings))
    await runner.start()
    try:
        nc = await nats.connect(settings.nats_url)
        ack = await nc.jetstream().publish(
            "cairn.data.arrived.v1", document.encode(), headers={"Nats-Msg-Id": "erp-export-0001"}
        )
        await nc.close()
        assert ack.stream == "CAIRN"
        msgs = await collect(js, "cairn.dataset.ingested.v1", lambda m: len(m) >= 1)
    finally:
        await runner.stop()
    ingested = events_of(msgs)[0]
    assert ingested.causationid == "erp-export-0001"
    assert ingested.correlationid == "erp-export-0001"
    assert ingested.data.rows == 40
    assert ingested.data.context.model_name == "small-y"


async def test_invalid_payload_rejected_and_dead_lettered_service_keeps_serving(settings, js, tmp_path):
    csv = small_csv(tmp_path)
    runner = ServiceRunner(Ingestion(settings))
    await runner.start()
    try:
        await js.publish("cairn.data.arrived.v1", b'{"type": "cairn.data.arrived.v1", "data": {}}')
        await js.publish("cairn.data.arrived.v1", b"\x00 not json at all")
        good = new_event(DataArrived(uri=csv.as_uri(), target="y"), source="/test")
        await js.publish("cairn.data.arrived.v1", good.encode(), headers={"Nats-Msg-Id": good.id})
        rejected = await collect(js, "cairn.event.rejected.v1", lambda m: len(m) >= 2)
        dead = await collect(js, "cairn.dlq.ingestion", lambda m: len(m) >= 2)
        ingested = await collect(js, "cairn.dataset.ingested.v1", lambda m: len(m) >= 1)
    finally:
        await runner.stop()
    reasons = [e.data.reason for e in events_of(rejected)]
    assert any("invalid cairn.data.arrived.v1" in r and "data.uri" in r for r in reasons), reasons
    assert any(r.startswith("not JSON") for r in reasons), reasons
    assert all(e.data.dead_letter_subject == "cairn.dlq.ingestion" for e in events_of(rejected))
    # The two run side by side, so their dead letters may come in either order.
    kept = {m.data: m.headers["Cairn-Reason"] for m in dead}
    assert "not JSON" in kept[b"\x00 not json at all"]  # the original bytes are kept
    assert events_of(ingested)[0].causationid == good.id


async def test_bad_data_gets_a_data_rejected_with_actionable_reason(settings, js, tmp_path):
    csv = small_csv(tmp_path)
    runner = ServiceRunner(Ingestion(settings))
    await runner.start()
    try:
        bad = new_event(DataArrived(uri=csv.as_uri(), target="price"), source="/test")
        await js.publish("cairn.data.arrived.v1", bad.encode(), headers={"Nats-Msg-Id": bad.id})
        msgs = await collect(js, "cairn.data.rejected.v1", lambda m: len(m) >= 1)
        dead = await collect(js, "cairn.dlq.ingestion", lambda m: len(m) >= 1)
    finally:
        await runner.stop()
    rejection = events_of(msgs)[0]
    assert rejection.causationid == bad.id
    assert "target column 'price' not found; columns are: x, colour, y" in rejection.data.reason
    assert json.loads(dead[0].data)["id"] == bad.id


async def test_republished_event_id_is_dropped_by_the_server(js):
    event = new_event(DataArrived(uri="file:///nowhere.csv", target="y"), source="/test")
    first = await js.publish("cairn.data.arrived.v1", event.encode(), headers={"Nats-Msg-Id": event.id})
    second = await js.publish("cairn.data.arrived.v1", event.encode(), headers={"Nats-Msg-Id": event.id})
    assert not first.duplicate and second.duplicate
    assert second.seq == first.seq
    info = await js.stream_info("CAIRN")
    assert info.state.messages == 1
    assert info.config.duplicate_window == pytest.approx(3600.0)


def _spawn(args: list[str], settings, extra_env: dict[str, str], log: Path) -> subprocess.Popen:
    env = {**os.environ, **env_for(settings), **extra_env}
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, *args], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )


async def _ready(port: int) -> bool:
    try:
        async with httpx.AsyncClient() as client:
            return (await client.get(f"http://127.0.0.1:{port}/readyz", timeout=1)).status_code == 200
    except httpx.HTTPError:
        return False


async def _disconnected(port: int) -> bool:
    async with httpx.AsyncClient() as client:
        reply = await client.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
    return reply.status_code == 503 and reply.json()["detail"] == "not connected to NATS"


def _handled(port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("cairn_events_handled_total{") and 'outcome="ok"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.slow
async def test_two_replicas_share_one_durable_consumer_exactly_once(settings, js, tmp_path):
    csv = small_csv(tmp_path)
    ports = [free_port(), free_port()]
    procs = [
        _spawn(
            ["-m", "services.tools.cli", "run", "ingestion"],
            settings,
            {"CAIRN_HTTP_PORT": str(p)},
            tmp_path / f"replica{i}.log",
        )
        for i, p in enumerate(ports)
    ]
    try:
        for p in ports:
            await wait_for(lambda p=p: _ready(p), 60, f"replica on {p}")
        ids = []
        for _ in range(500):
            event = new_event(DataArrived(uri=csv.as_uri(), target="y"), source="/test")
            ids.append(event.id)
            await js.publish("cairn.data.arrived.v1", event.encode(), headers={"Nats-Msg-Id": event.id})
        msgs = await collect(js, "cairn.dataset.ingested.v1", lambda m: len(m) >= 500, timeout=240)

        async def settled() -> bool:
            info = await js.consumer_info("CAIRN", "ingestion-data-arrived-v1")
            return info.num_ack_pending == 0 and info.num_pending == 0

        await wait_for(settled, 60, "the consumer to settle")  # a handler publishes, then acks
        stored = await subject_count(js, "cairn.dataset.ingested.v1")
        per_replica = [_handled(p) for p in ports]
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(30)
    causes = [e.causationid for e in events_of(msgs)]
    assert sorted(causes) == sorted(ids), "every event handled, none twice"
    assert stored == 500, "no duplicate outputs in the stream"
    assert sum(per_replica) == 500 and min(per_replica) > 0, per_replica


@pytest.mark.slow
async def test_a_service_stops_on_sigterm_while_its_server_is_gone(settings, js, tmp_path, nats_server):
    """`cairn run` stopped while NATS is unreachable (a SIGKILLed `cairn up` takes its embedded server
    down with the services): nats-py refuses to drain a reconnecting connection, so it is closed
    instead and the process exits, rather than waiting forever on nats-py's reconnect loop."""
    port = free_port()
    proc = _spawn(
        ["-m", "services.tools.cli", "run", "ingestion"],
        settings,
        {"CAIRN_HTTP_PORT": str(port)},
        tmp_path / "ingestion.log",
    )
    try:
        await wait_for(lambda: _ready(port), 60, "ingestion to be ready")
        await js._nc.close()
        nats_server.stop(kill=True)
        await wait_for(lambda: _disconnected(port), 30, "ingestion to see the server gone")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "connection closed without draining" in (tmp_path / "ingestion.log").read_text()


@pytest.mark.slow
async def test_killed_mid_event_is_redelivered_with_one_result(settings, js, tmp_path):
    first = _spawn(["-m", "tests.probe_service", "30"], settings, {}, tmp_path / "probe1.log")
    event = new_event(DataArrived(uri="file:///slow.csv", target="y"), source="/test")
    await js.publish("cairn.data.arrived.v1", event.encode(), headers={"Nats-Msg-Id": event.id})

    async def in_flight() -> bool:
        try:
            return (await js.consumer_info("CAIRN", "probe-data-arrived-v1")).num_ack_pending == 1
        except nats.js.errors.NotFoundError:
            return False

    await wait_for(in_flight, 60, "the probe to hold the message")
    first.send_signal(signal.SIGKILL)  # crash mid-event: no ack, no nak
    first.wait(10)
    second = _spawn(["-m", "tests.probe_service", "0.1"], settings, {}, tmp_path / "probe2.log")
    try:
        msgs = await collect(js, "cairn.data.rejected.v1", lambda m: len(m) >= 1, timeout=60)

        async def settled() -> bool:
            info = await js.consumer_info("CAIRN", "probe-data-arrived-v1")
            return info.num_ack_pending == 0 and info.num_pending == 0

        await wait_for(settled, 30, "the consumer to settle")
        stored = await subject_count(js, "cairn.data.rejected.v1")
        info = await js.consumer_info("CAIRN", "probe-data-arrived-v1")
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(30)
    result = events_of(msgs)[0]
    assert result.causationid == event.id
    assert result.data.reason == "handled on attempt 2"
    assert stored == 1, "one result despite two deliveries"
    assert info.num_redelivered == 0 and info.delivered.consumer_seq == 2


async def subject_count(js, subject: str) -> int:
    info = await js.stream_info("CAIRN", subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)


async def test_pub_acks_resolve_refuse_and_time_out(settings, js):
    """PubAcks: a stored publish resolves with its PubAck, a refused one with the server's error
    (nats-py 2.16's publish_async leaves that future pending: nats-io/nats.py#985), and a reply that
    never comes fails its future after the timeout without leaving its entry behind."""
    from nats.js.errors import APIError, NoStreamResponseError

    from services.platform.bus.acks import PubAcks

    nc = await nats.connect(settings.nats_url)
    try:
        acks = PubAcks(nc, timeout_s=0.5)
        stored = await (await acks.send("cairn.data.arrived.v1", b"{}", {"Nats-Msg-Id": "pubacks-1"}))
        assert json.loads(stored)["stream"] == settings.stream
        wrong_stream = {"Nats-Msg-Id": "pubacks-2", "Nats-Expected-Stream": "NOT_THIS_ONE"}
        with pytest.raises(APIError):
            await (await acks.send("cairn.data.arrived.v1", b"{}", wrong_stream))
        with pytest.raises(NoStreamResponseError):
            await (await acks.send("nowhere.in.any.stream", b"{}"))

        async def answer_nothing(_msg: object) -> None:
            return None

        await nc.subscribe("silent.responder", cb=answer_nothing)
        with pytest.raises(TimeoutError):
            await (await acks.send("silent.responder", b"{}"))
        assert not acks._waiting, "every settled publish left the table"
    finally:
        await nc.close()


async def test_idle_routes_ask_again_at_once_when_a_restarted_server_is_back(
    settings, js, tmp_path, nats_server, monkeypatch
):
    """An idle route's pull request waits on the server for up to FETCH_WAIT_S; a restarted server
    has forgotten it. The runner drops the long polls on reconnect (`PullLoop.wake`, lineage's
    too) and asks again: here the polls last 10 minutes, so work after the restart would wait for
    them without that."""
    from services.lineage.app import Lineage
    from services.lineage.store import LineageStore
    from services.platform.bus import pull

    monkeypatch.setattr(pull, "FETCH_WAIT_S", 600.0)
    csv = small_csv(tmp_path)
    runners = [ServiceRunner(Ingestion(settings)), ServiceRunner(Lineage(settings))]
    for runner in runners:
        await runner.start()
    store = LineageStore(settings.lineage_url)
    try:
        await js._nc.close()
        nats_server.restart(kill=True)  # as a crash: the server keeps no pull request
        nc = await nats.connect(settings.nats_url)
        try:
            arrived = new_event(DataArrived(uri=csv.as_uri(), target="y"), source="/test")
            ack = await nc.jetstream().publish(
                "cairn.data.arrived.v1", arrived.encode(), headers={"Nats-Msg-Id": arrived.id}
            )
            ingested = await collect(nc.jetstream(), "cairn.dataset.ingested.v1", lambda m: len(m) >= 1, 60)
            assert events_of(ingested)[0].causationid == arrived.id
            await wait_for(lambda: store.last_seq() > ack.seq, 60, "lineage to record past the restart")
        finally:
            await nc.close()
    finally:
        store.close()
        for runner in reversed(runners):
            await runner.stop()


async def test_a_cluster_busy_for_now_is_waited_for_and_anything_else_is_not():
    """JetStream's 503 and its "no suitable peers for placement" (10005: a cluster that has not yet
    counted its peers online, seen by `cairn provision` right after a three-server cluster started)
    are retried, each new reason said once; any other refusal is raised at once, and a busy spell
    that outlasts the patience is raised as it came."""
    from nats.js.errors import APIError, ServiceUnavailableError

    from services.platform.bus.availability import busy_for_now, jetstream_when_available

    offline = "no suitable peers for placement, peer offline"
    placement = APIError(code=400, err_code=10005, description=offline)
    refusals = [ServiceUnavailableError(code=503), placement, placement]
    said: list[str] = []

    async def call() -> str:
        if refusals:
            raise refusals.pop(0)
        return "provisioned"

    assert await jetstream_when_available(call, 30, said.append) == "provisioned"
    assert said == ["JetStream temporarily unavailable", offline]

    other = APIError(code=400, err_code=10058, description="stream name already in use")
    assert busy_for_now(other) is None

    async def refused() -> None:
        raise other

    with pytest.raises(APIError) as raised:
        await jetstream_when_available(refused, 30)
    assert raised.value is other

    async def always_busy() -> None:
        raise placement

    with pytest.raises(APIError) as raised:
        await jetstream_when_available(always_busy, 0)
    assert raised.value.err_code == 10005

    # A reply that did not come in time (seen in CI: `cairn provision` against a cluster a moment
    # old) is asked again only for a call that may run twice, such as provisioning or a publish
    # under its id; any other call gets the timeout at once.
    from nats.errors import TimeoutError as NatsTimeout

    late = [NatsTimeout()]

    async def slow_once() -> str:
        if late:
            raise late.pop(0)
        return "provisioned"

    heard: list[str] = []
    assert await jetstream_when_available(slow_once, 30, heard.append, idempotent=True) == "provisioned"
    assert heard == ["no reply in time"]
    late.append(NatsTimeout())
    with pytest.raises(NatsTimeout):
        await jetstream_when_available(slow_once, 30)


class Gate(Service):
    """A route of two slots whose steps run until the test lets them end."""

    name = "gate"

    def __init__(self, settings: Any):
        super().__init__(settings)
        self.busy = self.most = self.handled = 0
        self.release = asyncio.Event()

    def routes(self) -> list[Route]:
        return [Route(DataArrived, self.handle, max_workers=2)]

    async def handle(self, event: Any, delivery: Any) -> list[Any]:
        self.busy += 1
        self.most = max(self.most, self.busy)
        await self.release.wait()
        self.busy -= 1
        self.handled += 1
        return []


async def test_a_route_holds_no_more_than_its_slots_and_asks_again_as_they_free(settings, js, tmp_path):
    """The open pull requests never ask for more than the free slots: with both slots busy the
    server holds two messages for the route and no request, the other four wait in the stream
    for whichever replica frees first; freed, the route asks again and handles them all."""
    csv = small_csv(tmp_path)
    durable = "gate-data-arrived-v1"
    for _ in range(6):
        event = new_event(DataArrived(uri=csv.as_uri(), target="y"), source="/test")
        await js.publish("cairn.data.arrived.v1", event.encode(), headers={"Nats-Msg-Id": event.id})
    gate = Gate(settings)
    runner = ServiceRunner(gate)
    await runner.start()
    try:
        await wait_for(lambda: gate.busy == 2, 30, "both slots to be busy")

        async def holding_two_asking_none() -> bool:
            info = await js.consumer_info("CAIRN", durable)
            return info.num_ack_pending == 2 and info.num_waiting == 0 and info.num_pending == 4

        await wait_for(holding_two_asking_none, 10, "the server to hold two messages and no request")
        gate.release.set()
        await wait_for(lambda: gate.handled == 6, 30, "all six handled")
        assert gate.most == 2
    finally:
        await runner.stop()
        await js.delete_consumer("CAIRN", durable)
