"""A hostile-input corpus through every service's entry point, on a running system.

Raw bytes go onto each service's input subjects with nats-py (tests/hostile/: malformed JSON,
wrong types, unknown types and versions; data with path traversal, forbidden schemes, a bad
checksum, enormous lines, a million columns; plus huge fields and payloads over the server's
limit, made here). Well-formed events whose artifact references point outside the artifact store
or at bytes that do not match their hash go to the services that read artifacts, and forged
deployments to the inference endpoint.

Each message must end in exactly one rejection (cairn.event.rejected.v1, or the domain's own:
cairn.data.rejected.v1, cairn.deployment.failed.v1) whose reason names the problem, and one dead
letter on cairn.dlq.<service> keeping the bytes. No service may crash: every /readyz stays 200,
a loopback listener named in the events is never contacted, and a valid pipeline runs end to end
afterwards. The inference endpoint's HTTP input is checked the same way (413, 422, 400).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import nats
import numpy as np
import pytest

from contracts import (
    DataArrived,
    ModelFamily,
    SearchStrategy,
    TuningSpec,
    dead_letter_subject,
    new_event,
    subject_for,
)
from harness.stream import Record, StreamLog
from harness.system import System, start_system
from services.platform.bus.connection import connect
from services.tools.catalog import SERVICES, build_service

CORPUS = Path(__file__).parent / "hostile"
MAX_PAYLOAD = 8 * 1024 * 1024
LONG_SEGMENT = "n" * 400  # a file name over any file system's 255-byte limit
OVER_LONG = "o" * 3000  # a URI over the contracts' 2,048 characters


class Listener:
    """A TCP listener on loopback that counts connections: events name it, nobody may call it."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None
        self.url = ""

    async def start(self) -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            writer.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        if self.server:
            self.server.close()


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    home = tmp_path_factory.mktemp("hostile")
    system = start_system(home, ack_wait_s=5.0, retry_backoff_s=[0.2, 0.5], max_deliver=3, dask_workers=1)
    yield system
    system.stop()


def inputs() -> dict[str, list[str]]:
    """Every service's input subjects, from its own routes."""
    from services.platform.settings import CairnSettings

    settings = CairnSettings(nats_url="nats://127.0.0.1:1")
    out = {}
    for name in SERVICES:
        routes = build_service(name, settings).routes()
        if routes:
            out[name] = [subject_for(r.payload_cls) for r in routes]
    return out


def small_csv(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(80, 2))
    y = 1.5 * x[:, 0] - x[:, 1] + rng.normal(scale=0.2, size=80)
    path.write_text("a,b,y\n" + "".join(f"{a:.4f},{b:.4f},{t:.4f}\n" for (a, b), t in zip(x, y, strict=True)))
    return path


def quick() -> TuningSpec:
    return TuningSpec(trials=2, families=[ModelFamily.linear], strategy=SearchStrategy.random, max_budget=10)


def fresh_id() -> str:
    return "hostile-" + uuid.uuid4().hex


def make_files(root: Path) -> None:
    folder = root / "hostile"
    folder.mkdir(exist_ok=True)
    link = folder / "innocent.csv"
    if not link.exists():
        link.symlink_to("/etc/passwd")
    (folder / "garbage.csv").write_bytes((CORPUS / "garbage.csv").read_bytes())
    (folder / "enormous-line.csv").write_bytes(b"a,b,y\n1,2," + b"9" * (2 * 1024 * 1024) + b"\n")
    header = ",".join(f"c{i}" for i in range(1_000_000)) + ",y\n"
    (folder / "million-columns.csv").write_text(header + ",".join("1" for _ in range(1_000_001)) + "\n")
    name = "n" * 300
    (folder / "long-column-name.csv").write_text(f"{name},y\n" + "".join(f"{i},{i}\n" for i in range(40)))


class Corpus:
    """What was sent, by stream sequence, and what each message must come back as."""

    def __init__(self, js: Any):
        self.js = js
        self.sent: list[dict[str, Any]] = []

    async def send(
        self,
        service: str,
        subject: str,
        body: bytes,
        case: str,
        expect: str,
        rejected: str = "event",
        event_id: str | None = None,
    ) -> None:
        headers = {"Nats-Msg-Id": event_id} if event_id else None
        ack = await self.js.publish(subject, body, headers=headers, timeout=30)
        assert not ack.duplicate, case
        self.sent.append(
            {
                "service": service,
                "subject": subject,
                "seq": ack.seq,
                "case": case,
                "expect": expect,
                "rejected": rejected,
                "id": event_id,
                "size": len(body),
            }
        )


def envelope(event_type: str, data: Any, event_id: str) -> bytes:
    return json.dumps(
        {
            "specversion": "1.0",
            "id": event_id,
            "source": "/hostile",
            "type": event_type,
            "time": "2026-01-01T00:00:00Z",
            "correlationid": event_id,
            "data": data,
        }
    ).encode()


def variant(record: Record, mutate: Any) -> tuple[str, bytes]:
    """A real event of the run with a fresh id, changed by `mutate(doc["data"])`."""
    doc = copy.deepcopy(record.doc)
    doc["id"] = fresh_id()
    doc["correlationid"] = doc["id"]
    doc.pop("causationid", None)
    mutate(doc["data"])
    return doc["id"], json.dumps(doc).encode()


async def raw_publish_over_limit(url: str, subject: str, size: int) -> bytes:
    """Speak the NATS protocol directly, so the *server* judges the size (nats-py refuses first).

    The server reads the size from the PUB line, answers -ERR and closes the connection before
    taking a byte of the payload.
    """
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    assert (await reader.readline()).startswith(b"INFO ")
    writer.write(b'CONNECT {"verbose":false,"pedantic":false,"protocol":1}\r\n')
    writer.write(f"PUB {subject} {size}\r\n".encode() + b"x" * 65536)
    reply = b""
    with contextlib.suppress(ConnectionError, TimeoutError):
        await writer.drain()
        while b"-ERR" not in reply:
            chunk = await asyncio.wait_for(reader.read(4096), 10)
            if not chunk:
                break
            reply += chunk
    writer.close()
    return reply


async def count(js: Any, subject: str) -> int:
    info = await js.stream_info("CAIRN", subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)


async def ready(urls: list[str]) -> dict[str, int]:
    async with httpx.AsyncClient(timeout=5) as client:
        return {u: (await client.get(u + "/readyz")).status_code for u in urls}


@pytest.mark.slow
async def test_hostile_corpus_is_rejected_by_every_service_and_nothing_else_is_lost(system: System):
    home = system.home
    log = StreamLog(system.settings)
    listener = Listener()
    await listener.start()
    nc = await connect(system.settings, "hostile")
    js = nc.jetstream()
    corpus = Corpus(js)
    try:
        # A valid run first: its events are the templates of the well-formed hostile variants.
        before = new_event(
            DataArrived(
                uri=small_csv(home / "valid.csv").as_uri(), target="y", model_name="valid", tuning=quick()
            ),
            source="/test",
        )
        await js.publish(before.type, before.encode(), headers={"Nats-Msg-Id": before.id})
        first = await log.wait(lambda lg: lg.terminal(before.id), 120, "the valid run")
        assert first.type == "cairn.model.deployed.v1", first.data
        run = {r.type: r for r in log.run(before.id)}
        base_seq = log.next_seq

        # 1. Malformed envelopes on every input subject of every service.
        spec = json.loads((CORPUS / "envelopes.json").read_text())
        subjects = inputs()
        known = sorted({s for subs in subjects.values() for s in subs})
        for service, subs in subjects.items():
            for subject in subs:
                other = next(s for s in known if s != subject)
                v99 = subject.rsplit(".", 1)[0] + ".v99"
                for case in spec["cases"]:
                    eid = fresh_id()
                    fill = {"{TYPE}": subject, "{OTHER}": other, "{TYPE_V99}": v99, "{ID}": eid}
                    if "file" in case:
                        body = (CORPUS / case["file"]).read_bytes()
                    else:
                        body = case["body"]
                        for k, v in fill.items():
                            body = body.replace(k, v)
                        body = body.encode()
                    expect = case["expect"]
                    for k, v in fill.items():
                        expect = expect.replace(k, v)
                    await corpus.send(service, subject, body, f"{service}:{case['name']}", expect)
                # Generated: nesting deeper than any parser's recursion limit, and huge fields.
                deep = (
                    b'{"type": "' + subject.encode() + b'", "data": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
                )
                await corpus.send(service, subject, deep, f"{service}:deep-nesting", "RecursionError")
                huge = 1024 * 1024 if service != "ingestion" else 7 * 1024 * 1024
                eid = fresh_id()
                doc = json.loads(envelope(subject, {}, eid))
                doc["subject"] = "s" * 16
                doc["id"] = "i" * huge
                await corpus.send(
                    service,
                    subject,
                    json.dumps(doc).encode(),
                    f"{service}:huge-id",
                    "String should have at most 128 characters",
                )
                await corpus.send(
                    service,
                    subject,
                    envelope("x" * huge, {}, fresh_id()),
                    f"{service}:huge-type",
                    "unknown event type 'xxxx",
                )

        # An event just under the server's limit: kept whole in the stream, and in the dead letter
        # as its head (Cairn-Truncated says how long it was).
        near = envelope(
            "cairn.data.arrived.v1", {"uri": "u" * (MAX_PAYLOAD - 4096), "target": "y"}, fresh_id()
        )
        assert MAX_PAYLOAD - 16 * 1024 < len(near) < MAX_PAYLOAD
        await corpus.send(
            "ingestion",
            "cairn.data.arrived.v1",
            near,
            "ingestion:near-max-payload",
            "String should have at most 2048 characters",
        )

        # 2. Hostile data on ingestion: traversal, schemes, checksum, enormous CSVs.
        make_files(home)
        valid_csv = small_csv(home / "for-checksum.csv", 1)
        data_spec = json.loads((CORPUS / "data_arrived.json").read_text())
        for case in data_spec["cases"]:
            text = json.dumps(case["data"])
            text = (
                text.replace("{ROOT}", str(home))
                .replace("{LOOPBACK}", listener.url)
                .replace("{CSV}", str(valid_csv))
                .replace("{LONG_SEGMENT}", LONG_SEGMENT)
                .replace("{OVER_LONG}", OVER_LONG)
            )
            eid = fresh_id()
            await corpus.send(
                "ingestion",
                "cairn.data.arrived.v1",
                envelope("cairn.data.arrived.v1", json.loads(text), eid),
                f"ingestion:{case['name']}",
                case["expect"],
                case["rejected"],
                eid,
            )

        # 3. Well-formed events whose artifacts are not what they claim, to the services that read them.
        out = "http://127.0.0.1:" + listener.url.rsplit(":", 1)[1] + "/latest/meta-data"
        bad_sha = "f" * 64

        def point(field: str, uri: str | None = None, sha: str | None = None):
            def mutate(data: dict[str, Any]) -> None:
                target = data
                *path, last = field.split(".")
                for p in path:
                    target = target[p]
                if uri is not None:
                    target[last]["uri"] = uri
                if sha is not None:
                    target[last]["sha256"] = sha

            return mutate

        artifact_cases = [
            ("features", "cairn.dataset.ingested.v1", "dataset"),
            ("tuning", "cairn.features.built.v1", "featureset"),
            ("training", "cairn.trial.requested.v1", "featureset"),
            ("evaluation", "cairn.model.trained.v1", "model"),
            ("deployment", "cairn.model.evaluated.v1", "model"),
        ]
        uri_spec = json.loads((CORPUS / "artifact_uris.json").read_text())
        fill = {
            "{STORE}": system.settings.artifacts,
            "{LOOPBACK}": listener.url,
            "{LONG_SEGMENT}": LONG_SEGMENT,
            "{OVER_LONG}": OVER_LONG,
        }
        for service, event_type, field in artifact_cases:
            for case in uri_spec["cases"]:
                uri, expect = case["uri"], case["expect"].replace("{TYPE}", event_type)
                for k, v in fill.items():
                    uri = uri.replace(k, v)
                eid, body = variant(run[event_type], point(field, uri=uri))
                label = f"{service}:{case['name']}"
                await corpus.send(service, event_type, body, label, expect, "event", eid)
        # Fields that reach a query or a key: MLflow filter strings (model names), tuning's KV keys
        # (study ids), MLflow's API (run ids). Their patterns refuse quotes, wildcards and slashes.
        field_cases = [
            ("training", "cairn.trial.requested.v1", "model_name", "x' or name like '%", "data.model_name"),
            ("tuning", "cairn.trial.completed.v1", "study_id", "study.*.>", "data.study_id"),
            ("evaluation", "cairn.model.trained.v1", "mlflow_run_id", "../../etc", "data.mlflow_run_id"),
            (
                "deployment",
                "cairn.model.evaluated.v1",
                "context.model_name",
                "x' or '1'='1",
                "data.context.model_name",
            ),
        ]
        for service, event_type, field, value, where in field_cases:

            def put(data: dict[str, Any], field: str = field, value: str = value) -> None:
                *path, last = field.split(".")
                for p in path:
                    data = data[p]
                data[last] = value

            eid, body = variant(run[event_type], put)
            expect = f"{where}: String should match pattern"
            await corpus.send(service, event_type, body, f"{service}:hostile-{field}", expect, "event", eid)
        tampered = [
            ("features", "cairn.dataset.ingested.v1", "dataset", "IntegrityError", "event"),
            ("training", "cairn.trial.requested.v1", "featureset", "IntegrityError", "event"),
            ("evaluation", "cairn.model.trained.v1", "model", "IntegrityError", "event"),
            ("deployment", "cairn.model.evaluated.v1", "model", "model artifact unusable", "deployment"),
        ]
        for service, event_type, field, expect, kind in tampered:
            eid, body = variant(run[event_type], point(field, sha=bad_sha))
            await corpus.send(service, event_type, body, f"{service}:hash-mismatch", expect, kind, eid)
        eid, body = variant(
            run["cairn.trial.completed.v1"], lambda d: d.update(study_id="study-that-never-was")
        )
        await corpus.send(
            "tuning", "cairn.trial.completed.v1", body, "tuning:unknown-study", "never planned", "event", eid
        )

        # 4. Over the limit: nats-py refuses before sending; the server refuses on its own too.
        over = b"x" * (MAX_PAYLOAD + 1024)
        with pytest.raises(nats.errors.MaxPayloadError):
            await js.publish("cairn.data.arrived.v1", over)
        arrivals = await count(js, "cairn.data.arrived.v1")
        reply = await raw_publish_over_limit(
            system.settings.nats_url, "cairn.data.arrived.v1", MAX_PAYLOAD + 1024
        )
        assert b"Maximum Payload" in reply, reply[:200]
        assert await count(js, "cairn.data.arrived.v1") == arrivals, "nothing stored"

        # 5. Forged deployments to the inference endpoint (it reads them outside the consumer policy).
        serve = system.runtime["serve_url"]
        for label, mutate in (("loopback", point("model", uri=out)), ("hash", point("model", sha=bad_sha))):
            eid, body = variant(
                run["cairn.model.deployed.v1"], lambda d, m=mutate: (m(d), d.update(version=99))
            )
            await js.publish("cairn.model.deployed.v1", body, headers={"Nats-Msg-Id": eid})
            corpus.sent.append({"service": "deployment-watch", "case": f"serve:{label}", "seq": None})

        # Every message sent to a service comes back as one rejection and one dead letter.
        to_services = [s for s in corpus.sent if s["seq"] is not None]
        seqs = {s["seq"] for s in to_services}

        def settled(lg: StreamLog) -> bool:
            dead = {
                int(r.headers.get("Cairn-Stream-Sequence", 0))
                for r in lg.records
                if r.subject.startswith("cairn.dlq.")
            }
            return seqs <= dead

        await log.wait(settled, 180, f"{len(seqs)} dead letters", every=1.0)
        await log.wait(lambda lg: len(rejections(lg, to_services)) == len(to_services), 30, "every rejection")
        found = rejections(log, to_services)
        problems = []
        for sent in to_services:
            reason, kind = found[sent["seq"]]
            if sent["expect"] not in reason:
                problems.append(f"{sent['case']}: expected {sent['expect']!r} in {reason[:300]!r}")
            if kind != sent["rejected"]:
                problems.append(f"{sent['case']}: rejected by {kind}, expected {sent['rejected']}")
            if len(reason) > 2000:
                problems.append(f"{sent['case']}: reason of {len(reason)} characters")
        assert not problems, "\n".join(problems)
        for sent in to_services:
            dlq = [
                r
                for r in log.records
                if r.subject == dead_letter_subject(sent["service"])
                and int(r.headers["Cairn-Stream-Sequence"]) == sent["seq"]
            ]
            assert len(dlq) == 1, (sent["case"], len(dlq))
        truncated = [
            r for r in log.records if r.subject == "cairn.dlq.ingestion" and "Cairn-Truncated" in r.headers
        ]
        assert [int(r.headers["Cairn-Truncated"]) for r in truncated] == [len(near)]

        # Nothing answered a hostile message with anything but a rejection.
        hostile_ids = {s["id"] for s in corpus.sent if s.get("id")}
        outputs = [
            r
            for r in log.records
            if r.seq >= base_seq
            and r.doc
            and r.doc.get("causationid") in hostile_ids
            and r.type
            not in {"cairn.event.rejected.v1", "cairn.data.rejected.v1", "cairn.deployment.failed.v1"}
        ]
        assert not outputs, [(r.subject, r.doc.get("causationid")) for r in outputs]
        dead = [r for r in log.records if r.subject.startswith("cairn.dlq.")]
        assert len(dead) == len(to_services), "no valid message was dead-lettered"

        # No service crashed; no artifact or data address named by an event was ever contacted.
        for name, pid in system.pids.items():
            assert Path(f"/proc/{pid}").exists(), f"{name} died"
        urls = list(system.runtime["health"].values()) + [serve]
        assert set((await ready(urls)).values()) == {200}
        assert listener.connections == 0

        # A valid pipeline afterwards goes through every service; the endpoint swaps to it and
        # never took the forged deployments.
        after = new_event(
            DataArrived(
                uri=small_csv(home / "after.csv", 2).as_uri(),
                target="y",
                model_name="valid",
                seed=1,
                tuning=quick(),
            ),
            source="/test",
        )
        await js.publish(after.type, after.encode(), headers={"Nats-Msg-Id": after.id})
        last = await log.wait(lambda lg: lg.terminal(after.id), 120, "the valid run after the corpus")
        assert last.type in ("cairn.model.deployed.v1", "cairn.model.evaluated.v1"), last.data
        async with httpx.AsyncClient(timeout=5) as client:
            models = (await client.get(serve + "/v1/models")).json()
            assert models["valid"]["version"] != 99
            assert models["valid"]["sha256"] != bad_sha
            refused = (await client.get(serve + "/metrics")).text
        assert 'cairn_models_refused_total{model="valid"} 2.0' in refused
        state = (await js.stream_info("CAIRN")).state
        assert state.first_seq == 1 and state.messages == state.last_seq, "the log kept everything"
    finally:
        await nc.close()
        await listener.stop()


def rejections(log: StreamLog, sent: list[dict[str, Any]]) -> dict[int, tuple[str, str]]:
    """stream seq of a hostile message -> (reason, which rejection said no)."""
    by_id = {s["id"]: s["seq"] for s in sent if s.get("id")}
    out: dict[int, tuple[str, str]] = {}
    for r in log.records:
        if r.type == "cairn.event.rejected.v1" and r.data.get("stream_sequence") is not None:
            seq = r.data["stream_sequence"]
            if any(s["seq"] == seq and s["service"] == r.data["service"] for s in sent):
                out[seq] = (r.data["reason"], "event")
        elif (
            r.type in ("cairn.data.rejected.v1", "cairn.deployment.failed.v1")
            and r.doc.get("causationid") in by_id
        ):
            out[by_id[r.doc["causationid"]]] = (
                r.data["reason"],
                "data" if "data." in r.type else "deployment",
            )
    return out


@pytest.mark.slow
async def test_lineage_reads_past_the_hostile_corpus(system: System):
    """Lineage's entry point is every subject, in stream order: one message it cannot take would
    hold back the whole chain. After the corpus (run by the test above) it must catch up."""
    nc = await connect(system.settings, "test")
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + 30
        while True:
            info = await js.consumer_info("CAIRN", "lineage")
            if info.num_pending == 0 and info.num_ack_pending == 0:
                break
            assert time.monotonic() < deadline, (
                f"lineage stalled at stream seq {info.ack_floor.stream_seq + 1}: {info.num_pending} pending, "
                f"{info.num_redelivered} redelivered (logs/lineage.log)"
            )
            await asyncio.sleep(0.5)
    finally:
        await nc.close()
    health = system.runtime["health"]["lineage"]
    assert (await ready([health]))[health] == 200


@pytest.mark.slow
async def test_inference_endpoint_refuses_oversized_and_invalid_requests(system: System):
    serve = system.runtime["serve_url"]
    url = serve + "/v1/models/valid/predict"
    async with httpx.AsyncClient(timeout=30) as client:
        deadline = time.monotonic() + 120
        while "valid" not in (await client.get(serve + "/v1/models")).json():
            assert time.monotonic() < deadline, "no model to ask (the corpus test deploys 'valid')"
            await asyncio.sleep(0.5)
        limit = system.settings.max_request_bytes
        big = b'{"rows": [' + b'{"a": 1.0, "b": 2.0},' * (limit // 20) + b'{"a": 1.0, "b": 2.0}]}'
        assert (await client.post(url, content=big)).status_code == 413

        async def chunks():  # no Content-Length: the server counts as it reads
            for _ in range(limit // 65536 + 2):
                yield b" " * 65536

        assert (await client.post(url, content=chunks())).status_code == 413
        cases = {
            b"not json": 400,
            b"[" * 100_000 + b"]" * 100_000: 400,
            b'{"a": "seven", "b": 1}': 422,
            b'{"a": 1, "zodiac": "leo"}': 422,
            b'{"a": NaN, "b": 1}': 422,
            b'{"a": Infinity, "b": 1}': 422,
            b'{"a": [1, 2], "b": 1}': 422,
            b"[]": 422,
            b'"just a string"': 422,
            json.dumps({"rows": [{"a": 1.0, "b": 2.0}] * 10_001}).encode(): 422,
        }
        for body, status in cases.items():
            response = await client.post(url, content=body, headers={"content-type": "application/json"})
            assert response.status_code == status, (body[:40], response.status_code, response.text[:200])
            assert "error" in response.json()
        ok = await client.post(url, json={"rows": [{"a": 0.5, "b": -1.0}, {"a": None, "b": 0.0}]})
        assert ok.status_code == 200 and len(ok.json()["predictions"]) == 2
        assert (await client.get(serve + "/readyz")).status_code == 200


def test_allow_listed_network_sources_still_refuse_internal_addresses_and_foreign_roots(tmp_path):
    """When an operator allow-lists http or s3, roots are matched on a '/' boundary and http(s)
    never reaches loopback, link-local (cloud metadata) or private addresses. Nothing is fetched:
    resolve_source decides before any byte is read."""
    from services.ingestion.problems import DataProblem
    from services.ingestion.sources import resolve_source
    from services.platform.settings import CairnSettings

    settings = CairnSettings(
        home=tmp_path,
        allowed_schemes=["file", "http", "https", "s3"],
        allowed_roots=[
            "http://127.0.0.1:9/",
            "http://169.254.169.254/",
            "https://10.0.0.8/",
            "s3://data",
            "https://data.example.com/exports",
        ],
    )
    refused = {
        "http://127.0.0.1:9/table.csv": "not a public address",
        "http://169.254.169.254/latest/meta-data/x.csv": "not a public address",
        "https://10.0.0.8/x.csv": "not a public address",
        "s3://data-evil/table.csv": "outside the allowed roots",
        "https://data.example.com/exports.evil/table.csv": "outside the allowed roots",
        "https://data.example.com/exports/../secrets/table.csv": "outside the allowed roots",
        "https://data.example.com.evil.net/exports/table.csv": "outside the allowed roots",
    }
    for uri, reason in refused.items():
        with pytest.raises(DataProblem) as caught:
            resolve_source(DataArrived(uri=uri, target="y"), settings)
        assert reason in caught.value.reason, (uri, caught.value.reason)
    ok = resolve_source(DataArrived(uri="s3://data/exports/table.csv", target="y"), settings)
    assert ok.scheme == "s3"
