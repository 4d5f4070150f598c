"""Security on real processes: the generated nats-server config (one least-privilege user per
service, mutual TLS), every service running under its own user, artifacts verified by hash and
never unpickled. The inference endpoint's request limits are in test_hostile.py."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from nats.js.api import ConsumerConfig

from contracts import DataArrived, ModelFamily, SearchStrategy, TuningSpec, new_event, subject_for
from contracts.schemas import PRODUCERS
from harness.stream import StreamLog
from services.platform.artifacts import ArtifactStore, IntegrityError
from services.platform.bus.connection import connect
from services.platform.bus.embedded import EmbeddedNats, server_binary
from services.platform.bus.provision import provision_all
from services.platform.ml.bundle import save_bundle
from services.platform.model_loading import load_from_store
from services.platform.settings import CairnSettings
from services.tools import supervisor
from services.tools.catalog import SERVICES
from services.tools.nats_auth import credentials_env, derive_permissions, write_nats_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    """nats-server with the generated users and mutual TLS; the stream provisioned by admin."""
    home = tmp_path_factory.mktemp("secure")
    auth = home / "auth"
    write_nats_config(auth, tls=True)
    server = EmbeddedNats(home / "nats", include=auth / "auth.conf")
    server.start()

    def settings_for(user: str | None, **overrides: Any) -> CairnSettings:
        env = credentials_env(auth, user) if user else {}
        fields = {
            "home": home / "state",  # the data the tests write sits beside cairn's home, never in it
            "nats_url": server.url,
            "allowed_roots": [str(home)],
            "serve_port": 0,
            "nats_user": env.get("CAIRN_NATS_USER"),
            "nats_password": env.get("CAIRN_NATS_PASSWORD"),
            "nats_tls_ca": auth / "tls" / "ca.pem",
            "nats_tls_cert": auth / "tls" / "client-cert.pem",
            "nats_tls_key": auth / "tls" / "client-key.pem",
        }
        return CairnSettings(**{**fields, **overrides})

    async def provision() -> None:
        nc = await connect(settings_for("admin"), "admin")
        try:
            await provision_all(nc.jetstream(), settings_for("admin"))
        finally:
            await nc.close()

    asyncio.run(provision())
    yield home, auth, server, settings_for
    server.stop()


class Errors:
    """What the server told this client (-ERR lines such as permission violations)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def __call__(self, err: Exception) -> None:
        self.seen.append(str(err))

    async def wait_for(self, text: str, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.seen:
                if text.lower() in e.lower():
                    return e
            await asyncio.sleep(0.02)
        raise AssertionError(f"no error containing {text!r}; got {self.seen}")


async def as_user(settings: CairnSettings) -> tuple[nats.NATS, Errors]:
    errors = Errors()

    async def on_error(err: Exception) -> None:
        await errors(err)

    nc = await connect(settings, "test", error_cb=on_error)
    return nc, errors


# The generated config --------------------------------------------------------------------------
def test_cli_writes_a_config_nats_server_accepts(tmp_path):
    out = tmp_path / "auth"
    done = subprocess.run(
        [sys.executable, "-m", "services.tools.cli", "nats-config", "--out", str(out), "--tls"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    written = {Path(line).name for line in done.stdout.split()}
    assert {
        "secrets.json",
        "auth.conf",
        "nats-server.conf",
        "ca.pem",
        "server-cert.pem",
        "client-cert.pem",
        "client-key.pem",
        "server-key.pem",
        "ca-key.pem",
    } <= written
    for secret in (
        "secrets.json",
        "auth.conf",
        "nats-server.conf",
        "tls/ca-key.pem",
        "tls/server-key.pem",
        "tls/client-key.pem",
    ):
        assert stat.S_IMODE((out / secret).stat().st_mode) == 0o600, secret
    passwords = json.loads((out / "secrets.json").read_text())
    assert set(passwords) == {*SERVICES, "serve", "upstream", "reader", "admin"}
    assert len(set(passwords.values())) == len(passwords) and min(map(len, passwords.values())) >= 24
    check = subprocess.run(
        [server_binary(), "-t", "-c", str(out / "nats-server.conf")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    # Generating again keeps the issued passwords (no silent rotation) and the CA.
    ca = (out / "tls" / "ca.pem").read_bytes()
    write_nats_config(out, tls=True)
    assert json.loads((out / "secrets.json").read_text()) == passwords
    assert (out / "tls" / "ca.pem").read_bytes() == ca


def test_permissions_are_derived_from_the_contracts():
    users = derive_permissions()
    for event_type, producer in PRODUCERS.items():
        subject = subject_for(event_type)
        allowed = {u for u, g in users.items() if subject in g.publish}  # admin holds ">" only
        expected = set(SERVICES) - {"lineage"} if producer == "any service" else {producer}
        assert allowed == expected, (event_type, allowed)
    for name, grants in users.items():
        if name == "admin":
            continue
        assert ">" not in grants.publish and "cairn.>" not in grants.publish, name
        assert not [
            s
            for s in grants.publish
            if s.startswith(
                (
                    "$JS.API.STREAM.CREATE",
                    "$JS.API.STREAM.UPDATE",
                    "$JS.API.STREAM.DELETE",
                    "$JS.API.DIRECT.GET.CAIRN",
                )
            )
        ]
        assert not [s for s in grants.subscribe if s.startswith("cairn.")], name
    assert users["upstream"].publish == ["cairn.data.arrived.v1"]
    assert (
        "$JS.API.CONSUMER.CREATE.CAIRN.ingestion-data-arrived-v1.cairn.data.arrived.v1"
        in users["ingestion"].publish
    )


# The running server ----------------------------------------------------------------------------
async def test_a_service_cannot_publish_another_services_events(secure):
    _, _, _, settings_for = secure
    nc, errors = await as_user(settings_for("ingestion"))
    try:
        js = nc.jetstream()
        with pytest.raises(nats.errors.TimeoutError):
            await js.publish("cairn.model.deployed.v1", b"{}", timeout=1)
        await errors.wait_for('Permissions Violation for Publish to "cairn.model.deployed.v1"')
        ack = await js.publish("cairn.dlq.ingestion", b"its own dead-letter subject", timeout=5)
        assert ack.stream == "CAIRN"
    finally:
        await nc.close()
    up, errors = await as_user(settings_for("upstream"))
    try:
        with pytest.raises(nats.errors.TimeoutError):
            await up.jetstream().publish("cairn.dataset.ingested.v1", b"{}", timeout=1)
        await errors.wait_for('Permissions Violation for Publish to "cairn.dataset.ingested.v1"')
    finally:
        await up.close()
    admin, _ = await as_user(settings_for("admin"))
    try:
        info = await admin.jetstream().stream_info("CAIRN", subjects_filter="cairn.>")
        assert "cairn.model.deployed.v1" not in (info.state.subjects or {})
        assert "cairn.dataset.ingested.v1" not in (info.state.subjects or {})
    finally:
        await admin.close()


async def test_a_service_cannot_read_what_it_should_not(secure):
    _, _, _, settings_for = secure
    nc, errors = await as_user(settings_for("ingestion"))
    try:
        for subject in ("cairn.model.deployed.v1", "cairn.>", "_INBOX_training.>", "_INBOX.>"):
            await nc.subscribe(subject)
            await errors.wait_for(f'Permissions Violation for Subscription to "{subject}"')
        js = nc.jetstream()
        attempts = {
            # A consumer of its own on someone else's events, or its own durable re-pointed at them.
            "$JS.API.CONSUMER.CREATE.CAIRN.spy.cairn.model.deployed.v1": ConsumerConfig(
                name="spy", filter_subject="cairn.model.deployed.v1"
            ),
            "$JS.API.CONSUMER.CREATE.CAIRN.ingestion-data-arrived-v1.cairn.model.deployed.v1": ConsumerConfig(
                name="ingestion-data-arrived-v1",
                durable_name="ingestion-data-arrived-v1",
                filter_subject="cairn.model.deployed.v1",
            ),
            "$JS.API.CONSUMER.DURABLE.CREATE.CAIRN.ingestion-data-arrived-v1": ConsumerConfig(
                durable_name="ingestion-data-arrived-v1", filter_subject="cairn.model.deployed.v1"
            ),
        }
        api, config = next(iter(attempts.items()))
        with pytest.raises(nats.errors.TimeoutError):  # what the client sees: no answer
            await js.add_consumer("CAIRN", config, timeout=0.5)
        await errors.wait_for(f'Permissions Violation for Publish to "{api}"')
        requests = {
            api: json.dumps({"stream_name": "CAIRN", "config": c.as_dict()}).encode()
            for api, c in attempts.items()
        }
        for api in (
            "$JS.API.CONSUMER.MSG.NEXT.CAIRN.training-trial-requested-v1",  # another service's work
            "$JS.API.DIRECT.GET.CAIRN",
            "$JS.API.STREAM.MSG.GET.CAIRN",
            "$KV.cairn_studies.x",
        ):
            requests[api] = b'{"seq": 1}'
        for api, body in requests.items():  # the server's verdict, without waiting on timeouts
            await nc.publish(api, body, reply=nc.new_inbox())
            await errors.wait_for(f'Permissions Violation for Publish to "{api}"')
    finally:
        await nc.close()


async def test_provisioning_needs_admin(secure):
    _, _, _, settings_for = secure
    for user in ("training", "upstream", "serve"):
        nc, errors = await as_user(settings_for(user))
        try:
            with pytest.raises(nats.errors.TimeoutError):
                await provision_all(nc.jetstream(timeout=0.5), settings_for(user))
            await errors.wait_for('Permissions Violation for Publish to "$JS.API.STREAM.')
            for api in (
                "$JS.API.STREAM.CREATE.CAIRN",
                "$JS.API.STREAM.UPDATE.CAIRN",
                "$JS.API.STREAM.DELETE.CAIRN",
                "$JS.API.STREAM.PURGE.CAIRN",
                "$JS.API.CONSUMER.DELETE.CAIRN.training-trial-requested-v1",
            ):
                await nc.publish(api, b"{}", reply=nc.new_inbox())
                await errors.wait_for(f'Permissions Violation for Publish to "{api}"')
        finally:
            await nc.close()
    nc, _ = await as_user(settings_for("admin"))
    try:
        assert await provision_all(nc.jetstream(), settings_for("admin")) == "updated"
    finally:
        await nc.close()


async def test_tls_needs_our_ca_and_a_client_certificate(secure):
    _, auth, server, settings_for = secure
    nc = await connect(settings_for("ingestion"), "tls")  # CAIRN_NATS_TLS_CA, _CERT and _KEY set
    info = nc._server_info  # noqa: SLF001
    assert nc.is_connected and info.get("tls_required") and info.get("tls_verify"), info
    await nc.close()
    password = credentials_env(auth, "ingestion")["CAIRN_NATS_PASSWORD"]
    ours = ssl.create_default_context(cafile=str(auth / "tls" / "ca.pem"))  # trusts our CA, no client cert
    system_trust = ssl.create_default_context()  # a client without our CA
    system_trust.load_cert_chain(str(auth / "tls" / "client-cert.pem"), str(auth / "tls" / "client-key.pem"))
    refused = {
        "without our CA": {"tls": system_trust},
        "without a client certificate": {"tls": ours},
        "without TLS": {},
    }
    for why, options in refused.items():
        with pytest.raises(Exception) as caught:  # noqa: PT011 - ssl, connection or timeout errors
            await nats.connect(
                server.url,
                user="ingestion",
                password=password,
                connect_timeout=1,
                max_reconnect_attempts=0,
                allow_reconnect=False,
                **options,
            )
        assert caught.value is not None, why
    with pytest.raises(Exception):  # noqa: PT011,B017 - wrong password over good TLS
        await connect(settings_for("ingestion", nats_password="wrong-password-123"), "tls")


# Every service under its own user --------------------------------------------------------------
def spawn_all(home: Path, auth: Path, settings: CairnSettings) -> dict[str, Any]:
    state = settings.home_dir
    (state / "logs").mkdir(parents=True, exist_ok=True)
    base = {
        **os.environ,
        "CAIRN_HOME": str(state),
        "CAIRN_NATS_URL": settings.nats_url,
        "CAIRN_ALLOWED_ROOTS": json.dumps([str(home)]),
        "CAIRN_DASK_WORKERS": "1",
    }
    runtime: dict[str, Any] = {"pids": {}, "health": {}}
    for name in SERVICES:
        port = supervisor.free_port()
        env = {**base, **credentials_env(auth, name), "CAIRN_HTTP_PORT": str(port)}
        supervisor.record(runtime, name, supervisor.spawn(["run", name], env, state / "logs" / f"{name}.log"))
        runtime["health"][name] = f"http://127.0.0.1:{port}"
    port = supervisor.free_port()
    env = {**base, **credentials_env(auth, "serve")}
    supervisor.record(
        runtime,
        "serve",
        supervisor.spawn(["serve", "--port", str(port)], env, state / "logs" / "serve.log"),
    )
    runtime["serve_url"] = f"http://127.0.0.1:{port}"
    (state / "runtime.json").write_text(json.dumps(runtime))
    return runtime


@pytest.fixture(scope="module")
def least_privilege(secure):
    home, auth, server, settings_for = secure
    admin = settings_for("admin")
    from services.platform.tracking import Tracker

    Tracker(admin.tracking_uri)  # the MLflow schema, as `cairn up` prepares it
    runtime = spawn_all(home, auth, admin)
    try:
        assert not supervisor.wait_ready(runtime, 180), "a service did not start under its own user"
        yield runtime
    finally:
        supervisor.down(admin)


@pytest.mark.slow
async def test_every_service_works_under_its_own_user_over_mutual_tls(secure, least_privilege):
    home, auth, server, settings_for = secure
    runtime = least_privilege
    csv = home / "data.csv"
    csv.write_text(
        "a,b,y\n"
        + "".join(f"{i % 13},{i % 7},{(i % 13) * 1.5 - (i % 7) + (i % 3) * 0.1}\n" for i in range(120))
    )
    event = new_event(
        DataArrived(
            uri=csv.as_uri(),
            target="y",
            model_name="secure",
            tuning=TuningSpec(trials=2, families=[ModelFamily.linear], strategy=SearchStrategy.random),
        ),
        source="/upstream",
    )
    up = await connect(settings_for("upstream"), "upstream")  # what an outside system holds
    try:
        await up.jetstream().publish(event.type, event.encode(), headers={"Nats-Msg-Id": event.id})
    finally:
        await up.close()
    log = StreamLog(settings_for("admin"))
    done = await log.wait(lambda lg: lg.terminal(event.id), 120, "the pipeline under least privilege")
    assert done.type == "cairn.model.deployed.v1", done.data
    assert [r.type for r in log.run(event.id)][:3] == [
        "cairn.data.arrived.v1",
        "cairn.dataset.ingested.v1",
        "cairn.features.built.v1",
    ]
    async with httpx.AsyncClient(timeout=5) as client:
        deadline = time.monotonic() + 30
        while "secure" not in (await client.get(runtime["serve_url"] + "/v1/models")).json():
            assert time.monotonic() < deadline, "serve (user 'serve') never saw the deployment"
            await asyncio.sleep(0.2)
    server_log = (server.workdir / "nats-server.log").read_text().splitlines()
    refused = [line for line in server_log if "Violation" in line and ':cairn-test"' not in line]
    assert not refused, refused[:5]  # the services needed nothing they were not granted
    # Nothing in the artifact store is a pickle (protocol 2+ starts with 0x80, then the version).
    stored = [p for p in (settings_for("admin").home_dir / "artifacts").rglob("*") if p.is_file()]
    assert stored and not [
        p for p in stored if p.read_bytes()[:2] in {b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"}
    ]


@pytest.mark.slow
async def test_a_tampered_model_is_refused_by_evaluation_and_the_inference_server(secure, least_privilege):
    home, auth, server, settings_for = secure
    runtime = least_privilege
    log = StreamLog(settings_for("admin"))
    await log.poll()
    deployed = log.of_type("cairn.model.deployed.v1")[-1]
    trained = next(r for r in log.of_type("cairn.model.trained.v1") if r.correlation == deployed.correlation)
    bundle = Path(deployed.data["model"]["uri"].removeprefix("file://"))
    original = bundle.read_bytes()
    manifest = json.loads(original)
    manifest["params"] = {**manifest["params"], "alpha": 1e9}  # a quiet, plausible edit
    bundle.write_bytes(json.dumps(manifest, sort_keys=True).encode())
    try:
        admin = await connect(settings_for("admin"), "admin")
        js = admin.jetstream()
        # Evaluation is handed the tampered model again: dead-lettered at once, naming the hash.
        doc = dict(trained.doc, id="tampered-trained-1", correlationid="tampered-trained-1")
        doc.pop("causationid", None)
        ack = await js.publish(
            "cairn.model.trained.v1", json.dumps(doc).encode(), headers={"Nats-Msg-Id": doc["id"]}
        )

        def refused(lg: StreamLog):
            return [
                r for r in lg.of_type("cairn.event.rejected.v1") if r.data.get("stream_sequence") == ack.seq
            ]

        rejection = (await log.wait(refused, 60, "evaluation to refuse the tampered model"))[0]
        assert rejection.data["service"] == "evaluation"
        assert "IntegrityError" in rejection.data["reason"] and "does not match" in rejection.data["reason"]
        assert rejection.data["deliveries"] == 1, "refused at once, not retried"

        # The running endpoint is told to swap to it: it refuses and keeps the verified model.
        doc = dict(deployed.doc, id="tampered-deployed-1", correlationid="tampered-deployed-1")
        doc["data"] = dict(deployed.data, version=deployed.data["version"] + 1)
        await js.publish(
            "cairn.model.deployed.v1", json.dumps(doc).encode(), headers={"Nats-Msg-Id": doc["id"]}
        )
        await admin.close()
        url = runtime["serve_url"]
        async with httpx.AsyncClient(timeout=5) as client:
            deadline = time.monotonic() + 30
            while (
                'cairn_models_refused_total{model="secure"}' not in (await client.get(url + "/metrics")).text
            ):
                assert time.monotonic() < deadline, "the endpoint did not refuse the tampered bundle"
                await asyncio.sleep(0.2)
            assert (await client.get(url + "/v1/models")).json()["secure"]["version"] == deployed.data[
                "version"
            ]

        # A fresh endpoint process (a restart, a new replica) will not load the tampered champion.
        os.killpg(runtime["pids"]["serve"], 15)
        port = supervisor.free_port()
        state = settings_for("admin").home_dir
        env = {
            **os.environ,
            "CAIRN_HOME": str(state),
            "CAIRN_NATS_URL": server.url,
            **credentials_env(auth, "serve"),
        }
        supervisor.record(
            runtime,
            "serve",
            supervisor.spawn(["serve", "--port", str(port)], env, state / "logs" / "serve2.log"),
        )
        (state / "runtime.json").write_text(json.dumps(runtime))
        fresh = f"http://127.0.0.1:{port}"
        assert not supervisor.wait_ready(
            {"pids": {"serve": runtime["pids"]["serve"]}, "serve_url": fresh}, 60
        )
        async with httpx.AsyncClient(timeout=5) as client:
            assert "secure" not in (await client.get(fresh + "/v1/models")).json()
            assert (
                await client.post(fresh + "/v1/models/secure/predict", json={"a": 1, "b": 2})
            ).status_code == 404
    finally:
        bundle.write_bytes(original)


def test_no_pickle_is_ever_loaded_from_the_store(tmp_path):
    """A bundle naming a pickled estimator, with every hash right, is refused without unpickling by
    the loader the services use (services.platform.model_loading)."""
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    settings = CairnSettings(home=tmp_path / "home", artifacts_url=(tmp_path / "artifacts").as_uri())
    store = ArtifactStore(settings.artifacts)
    blob = pickle.dumps(Payload())
    spec = {"task": "regression", "classes": [], "target": "y", "columns": []}
    for fmt in ("pickle", "sklearn-pickle", "joblib", "xgboost-ubj"):
        ref = save_bundle(
            store,
            estimator=blob,
            estimator_format=fmt,
            spec=spec,
            family=ModelFamily.linear,
            params={},
            budget=1,
        )
        with pytest.raises(Exception) as refused:  # noqa: PT011
            load_from_store(ref, settings)
        assert "unknown estimator format" in str(refused.value) or fmt == "xgboost-ubj", refused.value
    assert not marker.exists(), "something unpickled a stored artifact"
    # And bytes that do not match their hash are never parsed at all.
    ok = save_bundle(
        store,
        estimator=b'{"mean": [], "std": [], "coef": [[]], "intercept": [0], "classes": [],'
        b' "task": "regression"}',
        estimator_format="linear-json",
        spec=spec,
        family=ModelFamily.linear,
        params={},
        budget=1,
    )
    Path(ok.uri.removeprefix("file://")).write_bytes(b"\x80\x04tampered")
    with pytest.raises(IntegrityError):
        load_from_store(ok, settings)
