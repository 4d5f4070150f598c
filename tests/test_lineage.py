"""Lineage, audit and replay for auditors, on a real system: every service its own process."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import tempfile
import uuid
from pathlib import Path

import psycopg
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from sklearn.datasets import load_diabetes
from sqlalchemy.engine import make_url

from contracts import DataArrived, SearchStrategy, TuningSpec
from services.lineage import graph, signing
from services.lineage.audit import (
    export_bundle,
    rebuild,
    stream_records,
    verify_against_stream,
    verify_bundle,
    verify_records,
)
from services.lineage.store import LineageStore
from services.platform.bus.connection import connect
from services.platform.bus.embedded import EmbeddedNats
from services.tools import supervisor
from services.tools.replay import replay
from tests.conftest import make_settings, wait_for
from tests.test_pipeline import run_pipeline

pytestmark = pytest.mark.slow
# The OpenLineage spec schemas, copied into the repo (tests/openlineage/README.md): offline, self-contained.
OPENLINEAGE = Path(__file__).resolve().parent / "openlineage"


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """A system with the lineage service and OpenLineage output, after one regression run."""
    home = tmp_path_factory.mktemp("audit")
    server = EmbeddedNats(home / "nats")
    server.start()
    settings = make_settings(server.url, home, ack_wait_s=30.0, openlineage_url=f"file://{home}/ol.jsonl")
    try:  # a start or a run that fails leaves nothing running either
        runtime = supervisor.up(settings)
        assert not supervisor.wait_ready(runtime, 180)
        csv = home / "diabetes.csv"
        load_diabetes(as_frame=True, scaled=False).frame.to_csv(csv, index=False)
        import asyncio

        run = asyncio.run(
            run_pipeline(
                settings,
                DataArrived(
                    uri=csv.as_uri(),
                    target="target",
                    model_name="audited",
                    tuning=TuningSpec(
                        trials=9, strategy=SearchStrategy.asha, families=["xgboost", "linear"], max_budget=60
                    ),
                ),
            )
        )
        assert run[-1].type == "cairn.model.deployed.v1"
        yield settings, run, csv
    finally:
        supervisor.down(settings)
        server.stop()


async def _stream(settings):
    nc = await connect(settings, "test")
    try:
        return await stream_records(nc.jetstream(), settings.stream)
    finally:
        await nc.close()


async def _caught_up(settings) -> LineageStore:
    """Wait until the live lineage service has recorded the whole stream."""
    store = LineageStore(settings.lineage_url)
    last = (await _stream(settings))[-1][0]
    await wait_for(lambda: store.head()[0] >= last, 60, "the lineage service to catch up")
    return store


async def test_lineage_of_deployed_model_reaches_raw_file_and_hash(audited):
    settings, run, csv = audited
    store = await _caught_up(settings)
    record = graph.resolve(store, "audited")
    assert record.type == "cairn.model.deployed.v1"
    chain = graph.upstream(store, record)
    assert chain[-1].type == "cairn.data.arrived.v1" and chain[-1].event_id == run[0].id
    ingested = next(graph.describe(r) for r in chain if r.type == "cairn.dataset.ingested.v1")
    assert ingested["source_sha256"] == hashlib.sha256(csv.read_bytes()).hexdigest()
    assert ingested["source_uri"] == csv.as_uri()
    trained = next(graph.describe(r) for r in chain if r.type == "cairn.model.trained.v1")
    assert trained["mlflow_run_id"] and trained["versions"]["xgboost"]
    text = graph.render(store, record, "text")
    assert csv.as_uri() in text and ingested["source_sha256"] in text
    assert graph.render(store, record, "mermaid").startswith("graph TD")
    assert "->" in graph.render(store, record, "dot")
    as_json = json.loads(graph.render(store, record, "json"))
    assert as_json["upstream"][-1]["type"] == "cairn.data.arrived.v1"
    # by artifact hash: the model's hash leads to the same history, downstream to the deployment
    by_hash = graph.resolve(store, trained["artifacts"]["model"][:12])
    assert by_hash.type == "cairn.model.trained.v1"
    assert any(r.type == "cairn.model.deployed.v1" for r in graph.downstream(store, by_hash))


async def test_rebuilt_store_equals_live_store_sqlite_and_postgres(audited, tmp_path, postgresql_url):
    settings, _, _ = audited
    live = await _caught_up(settings)
    stream = await _stream(settings)
    rebuilt = LineageStore(f"sqlite:///{tmp_path / 'rebuilt.db'}")
    assert rebuild(rebuilt, stream) == len(stream)
    assert rebuilt.dump() == live.dump()
    assert rebuilt.head() == live.head()

    pg = LineageStore(postgresql_url)  # a fresh database on the suite's own PostgreSQL (conftest)
    try:
        assert pg.engine.dialect.name == "postgresql"
        assert rebuild(pg, stream) == len(stream)
        assert pg.dump() == rebuilt.dump()
        assert verify_records(pg.all()).ok
    finally:
        pg.close()


def test_postgresql_url_is_a_fresh_private_database(postgresql_url, postgresql_server):
    """The fixture the PostgreSQL tests rely on: its own server (never the machine's 5432), empty."""
    url = make_url(postgresql_url)
    assert url.drivername == "postgresql+psycopg" and url.port == postgresql_server.port != 5432
    with psycopg.connect(host=url.host, port=url.port, user=url.username, dbname=url.database) as conn:
        tables = conn.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'")
        assert tables.fetchone() == (0,)
        assert conn.execute("SHOW data_directory").fetchone()[0].startswith(tempfile.gettempdir())


async def test_audit_detects_changed_deleted_and_reordered_records(audited, tmp_path):
    settings, _, _ = audited
    live = await _caught_up(settings)
    stream = await _stream(settings)
    assert verify_against_stream(live.all(), stream).ok

    def tampered_copy(sql: str) -> LineageStore:
        path = tmp_path / f"{uuid.uuid4().hex}.db"
        copy = LineageStore(f"sqlite:///{path}")
        rebuild(copy, stream)
        with sqlite3.connect(path) as db:
            db.executescript(sql)
        return copy

    changed = tampered_copy(
        "UPDATE cairn_records SET body = replace(body, '\"seed\":0', '\"seed\":1') WHERE seq = 1"
    )
    verdict = verify_against_stream(changed.all(), stream)
    assert not verdict.ok and verdict.seq == 1 and "modified" in verdict.problem

    deleted = tampered_copy("DELETE FROM cairn_records WHERE seq = 5")
    verdict = verify_against_stream(deleted.all(), stream)
    assert not verdict.ok and verdict.seq == 5 and "missing" in verdict.problem

    swapped = tampered_copy(
        "UPDATE cairn_records SET seq = -1 WHERE seq = 3; UPDATE cairn_records SET seq = 3 WHERE seq = 4;"
        "UPDATE cairn_records SET seq = 4 WHERE seq = -1;"
    )
    verdict = verify_against_stream(swapped.all(), stream)
    assert not verdict.ok and verdict.seq in (3, 4)

    # offline: an exported, signed-off bundle, and edits of it
    private, public = signing.keygen(tmp_path / "keys")
    key = public.read_bytes()
    bundle = tmp_path / "bundle.jsonl"
    export_bundle(live.all(), bundle, settings.stream, private.read_bytes())
    assert verify_bundle(bundle, key).ok
    lines = bundle.read_text().splitlines()
    edits = {
        "changed": lines[:3] + [lines[3].replace("cairn", "CAIRN", 1)] + lines[4:],
        "deleted": lines[:4] + lines[5:],
        "truncated": lines[:-1],
        "reordered": lines[:3] + [lines[4], lines[3]] + lines[5:],
    }
    for name, edited in edits.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(edited) + "\n")
        verdict = verify_bundle(path, key)
        assert not verdict.ok, name
        assert verdict.problem, name
    assert not verify_bundle(bundle, signing.keygen(tmp_path / "other")[1].read_bytes()).ok


async def test_openlineage_events_are_valid(audited):
    settings, _, _ = audited
    await _caught_up(settings)
    resources = []
    for path in OPENLINEAGE.glob("*.json"):
        doc = json.loads(path.read_text())
        resources.append((doc["$id"], Resource.from_contents(doc)))
    registry = Registry().with_resources(resources)
    core = json.loads((OPENLINEAGE / "OpenLineage.json").read_text())
    validator = Draft202012Validator(core, registry=registry)
    facet_schemas = {
        "version": "DatasetVersionDatasetFacet.json",
        "jobType": "JobTypeJobFacet.json",
        "errorMessage": "ErrorMessageRunFacet.json",
        "tags": "TagsRunFacet.json",  # the openlineage client's own: its version, as a run tag
    }
    events = [
        json.loads(line)
        for line in Path(settings.openlineage_url.removeprefix("file://")).read_text().splitlines()
    ]
    jobs = {(e["job"]["name"], e["eventType"]) for e in events}
    for job in ("ingestion", "features", "tuning", "training", "evaluation", "deployment"):
        assert (job, "START") in jobs and (job, "COMPLETE") in jobs, job
    for event in events:
        validator.validate(event)
        facets = [event["job"].get("facets", {}), event["run"].get("facets", {})]
        facets += [d.get("facets", {}) for d in event["inputs"] + event["outputs"]]
        for group in facets:
            for name, facet in group.items():
                schema = json.loads((OPENLINEAGE / facet_schemas[name]).read_text())
                Draft202012Validator(schema, registry=registry).validate({name: facet})
    # written by the official client (its file transport), not by hand
    tags = [{t["key"] for t in e["run"]["facets"]["tags"]["tags"]} for e in events]
    assert all("openlineage_client_version" in t for t in tags)
    trained = [e for e in events if e["job"]["name"] == "training" and e["eventType"] == "COMPLETE"]
    assert trained[0]["outputs"] and all(
        o["facets"]["version"]["datasetVersion"] for o in trained[0]["outputs"]
    )


async def test_replay_reproduces_every_artifact_bit_identically(audited):
    settings, run, _ = audited
    reports = await replay(settings, correlation=run[0].correlationid, timeout=300)
    assert len(reports) == 1
    report = reports[0]
    compared = {(c.step, c.what) for c in report.comparisons}
    assert ("training", "model sha256") in compared and ("features", "featureset sha256") in compared
    assert report.identical, [(c.step, c.what) for c in report.comparisons if not c.same]
    # the production champion and endpoint were not touched
    import httpx

    served = httpx.get(settings.runtime()["serve_url"] + "/v1/models").json()
    assert served["audited"]["version"] == 1
    # and the champion's lineage still names the live deployment, not the replay's
    store = await _caught_up(settings)
    assert graph.resolve(store, "audited").subject == "cairn.model.deployed.v1"


async def test_an_ed25519_signed_bundle_is_checked_offline_with_the_public_key_alone(audited, tmp_path):
    """`cairn audit keygen`, a bundle signed with the private key, then `cairn audit verify --bundle
    --key PUBLIC` in a process with no NATS, no home and no secret: an edit or another key fails."""
    import subprocess
    import sys

    settings, _, _ = audited
    await _caught_up(settings)
    cairn = str(Path(sys.executable).with_name("cairn"))
    env = {"PATH": "/usr/bin:/bin", "CAIRN_HOME": str(tmp_path / "auditor-home")}  # nothing of the system

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([cairn, *args], env=env, capture_output=True, text=True, timeout=60)

    assert run("audit", "keygen", "--out", str(tmp_path / "keys")).returncode == 0
    private, public = tmp_path / "keys" / "audit-private.pem", tmp_path / "keys" / "audit-public.pem"
    assert private.stat().st_mode & 0o777 == 0o600
    bundle = tmp_path / "signed.jsonl"
    export_bundle(LineageStore(settings.lineage_url).all(), bundle, settings.stream, private.read_bytes())
    assert json.loads(bundle.read_text().splitlines()[0])["signature"]["alg"] == "ed25519"

    ok = run("audit", "verify", "--bundle", str(bundle), "--key", str(public))
    assert ok.returncode == 0, ok.stdout + ok.stderr

    lines = bundle.read_text().splitlines()
    header = json.loads(lines[0])
    forged = tmp_path / "forged.jsonl"  # a verifier cannot re-sign: changing the header breaks it
    changed = json.dumps({**header, "stream": "ELSEWHERE"}, sort_keys=True)
    forged.write_text("\n".join([changed, *lines[1:]]) + "\n")
    refused = run("audit", "verify", "--bundle", str(forged), "--key", str(public))
    assert refused.returncode == 1 and "signature" in refused.stdout, refused.stdout + refused.stderr

    assert run("audit", "keygen", "--out", str(tmp_path / "other")).returncode == 0
    other = tmp_path / "other" / "audit-public.pem"
    wrong = run("audit", "verify", "--bundle", str(bundle), "--key", str(other))
    assert wrong.returncode == 1, wrong.stdout
