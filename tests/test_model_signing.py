"""Champions signed with OpenSSF Model Signing, against someone trying: a real `cairn up` (its own
nats-server, MLflow on SQLite, every service, the endpoint) on a fresh home, one real run.

The attacker here can write the artifact store and publish a deployment (the test holds the admin
credentials): the hashes in an event then prove nothing, since the attacker names the hashes. Only
the signature, made with the key deployment holds, tells the endpoint which bytes were chosen.
The signature also binds which model and version the files are (`cairn-identity.json`), so a
genuinely signed bundle cannot be redeployed as a later version of itself (rollback) or under another
model's name (substitution). Also here: the v2 route `/v2/models/NAME/versions/V/...` answers
version V or 404.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from contracts import ArtifactRef, ModelDeployed, ModelRefused, new_event, subject_for
from harness.stream import StreamLog
from services.platform import model_signatures
from services.platform.artifacts import ArtifactStore, sha256_bytes
from services.platform.bus.connection import connect
from services.platform.settings import CairnSettings
from services.platform.tracking import Tracker
from services.serving.champion import Champions
from services.serving.logic import version_problem
from services.serving.metrics import EndpointMetrics
from tests.test_journeys import cairn, user_env, wait_until, write_table

MODEL = "signed"
OTHER = "other-signed"  # a second model line, for the substitution attack
ROW = {"x1": 0.5, "x2": 3.0, "colour": "red"}
SMALL = ["--families", "linear", "--trials", "1", "--strategy", "random", "--max-budget", "3"]
MODEL_SIGNING_CLI = str(Path(sys.executable).with_name("model_signing"))
REFUSED = ModelRefused.EVENT_TYPE
Refused = model_signatures.SignatureRefused


def admin_settings(home: Path) -> CairnSettings:
    """The home's settings as an operator holding the admin credentials (when `cairn up` runs auth)."""
    return CairnSettings(home=home).with_home_credentials("admin")


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory):
    """`cairn up --detach` on a fresh home (it makes the model-signing key pair), one run deployed."""
    root = tmp_path_factory.mktemp("signing")
    home = root / "home"
    env = user_env(home, CAIRN_SERVE_PORT="0")
    data = write_table(root / "data")
    started = cairn("up", "--detach", "--timeout", "240", env=env, cwd=root, timeout=300)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        run = cairn(
            "submit", str(data), "--target", "price", "--model-name", MODEL, *SMALL,
            "--wait", "--timeout", "300", env=env, cwd=root, timeout=330,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr
        settings = admin_settings(home)
        log = StreamLog(settings)
        asyncio.run(log.poll())
        deployed = log.of_type(ModelDeployed.EVENT_TYPE)[-1]
        runtime = json.loads((home / "runtime.json").read_text())
        yield {"root": root, "home": home, "env": env, "settings": settings, "deployed": deployed,
               "serve_url": runtime["serve_url"]}  # fmt: skip
    finally:
        cairn("down", env=env, cwd=root, timeout=60)


def _path(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def _champion_files(deployed: dict[str, Any]) -> dict[str, bytes]:
    """The champion's two files as the store holds them (bundle.json, estimator)."""
    manifest = _path(deployed["model"]["uri"]).read_bytes()
    estimator = _path(json.loads(manifest)["estimator"]["uri"]).read_bytes()
    return {"bundle.json": manifest, "estimator": estimator}


def _one_digit_changed(data: bytes) -> bytes:
    """One byte changed where the file stays parseable: a digit of a number, another digit."""
    at = next(i for i, b in enumerate(data) if chr(b) in "123456789")
    return data[:at] + (b"2" if data[at : at + 1] != b"2" else b"3") + data[at + 1 :]


def _forge(settings: CairnSettings, files: dict[str, bytes]) -> ArtifactRef:
    """What an attacker with write access puts in the store: the estimator with one byte changed,
    a manifest naming it by its new hash; both content-addressed, so every hash is right."""
    store = ArtifactStore(settings.artifacts)
    estimator = store.put_bytes(_one_digit_changed(files["estimator"]), "application/json", ".json")
    manifest = json.loads(files["bundle.json"])
    manifest["estimator"] = {**manifest["estimator"], "uri": estimator.uri, "sha256": estimator.sha256}
    return store.put_bytes(json.dumps(manifest).encode(), "application/vnd.cairn.model+json", ".json")


async def _deploy(settings: CairnSettings, deployed: dict[str, Any], version: int, model: ArtifactRef,
                  signature: ArtifactRef | None) -> str:  # fmt: skip
    """A deployment event as the attacker publishes it (the genuine one's fields, other bytes)."""
    payload = ModelDeployed.model_validate(
        {**deployed, "version": version, "previous_version": deployed["version"],
         "model": model.model_dump(mode="json"),
         "signature": signature.model_dump(mode="json") if signature else None}
    )  # fmt: skip
    event = new_event(payload, source="/attacker", subject=MODEL)
    nc = await connect(settings, "attacker")
    try:
        await nc.jetstream().publish(
            subject_for(ModelDeployed), event.encode(), headers={"Nats-Msg-Id": event.id}
        )
    finally:
        await nc.close()
    return event.id


async def _refusal(settings: CairnSettings, deployment_id: str) -> dict[str, Any]:
    log = StreamLog(settings)

    def found(lg: StreamLog):
        return [r.data for r in lg.of_type(REFUSED) if r.data.get("deployed_event_id") == deployment_id]

    return (await log.wait(found, 60, f"the endpoint's refusal of deployment {deployment_id}"))[0]


def _served(url: str) -> dict[str, Any]:
    models = httpx.get(url + "/v1/models", timeout=10).json()
    answer = httpx.post(f"{url}/v1/models/{MODEL}/predict", json=ROW, timeout=10).json()
    return {**models[MODEL], "answered_by": (answer["version"], answer["sha256"])}


def _history(s: dict[str, Any], *needles: str) -> str:
    """`cairn audit history` once the lineage store has caught up with the needles (bounded wait)."""

    def shown() -> str | None:
        result = cairn("audit", "history", MODEL, env=s["env"], cwd=s["root"])
        ok = result.returncode == 0 and all(n in result.stdout for n in needles)
        return result.stdout if ok else None

    return wait_until(shown, 60, f"`cairn audit history` to show {needles}")


# (a) the package's own command line --------------------------------------------------------------
@pytest.mark.slow
def test_the_model_signing_cli_verifies_a_champion_fetched_from_the_store(system, tmp_path: Path) -> None:
    s = system
    deployed = s["deployed"].data
    signature = deployed.get("signature")
    assert signature, "deployment signs every champion under `cairn up` (keys made in the home)"
    assert signature["media_type"] == model_signatures.SIGNATURE_MEDIA_TYPE
    private, public = model_signatures.home_keys(CairnSettings(home=s["home"]))
    assert stat.S_IMODE(private.stat().st_mode) == 0o600, "the signing key is the owner's alone"

    champion = tmp_path / "champion"
    champion.mkdir()
    for name, data in _champion_files(deployed).items():
        (champion / name).write_bytes(data)
    identity = deployed.get("identity")
    assert identity, "the identity file the signature covers is stored and named in the event"
    stored_identity = _path(identity["uri"]).read_bytes()
    assert sha256_bytes(stored_identity) == identity["sha256"]
    # The documented recipe (docs/SERVING.md), without cairn: the same bytes as the stored copy.
    recipe = {"bundle_sha256": deployed["model"]["sha256"], "format": "cairn.identity.v1",
              "model_name": MODEL, "version": deployed["version"]}  # fmt: skip
    assert stored_identity == (json.dumps(recipe, sort_keys=True, separators=(",", ":")) + "\n").encode()
    (champion / "cairn-identity.json").write_bytes(stored_identity)
    assert sorted(p.name for p in champion.iterdir()) == ["bundle.json", "cairn-identity.json", "estimator"]
    sig = tmp_path / "champion.sig"
    sig.write_bytes(_path(signature["uri"]).read_bytes())
    assert sha256_bytes(sig.read_bytes()) == signature["sha256"]

    def verify(folder: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [MODEL_SIGNING_CLI, "verify", "key", str(folder), "--signature", str(sig),
             "--public_key", str(public)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip

    ok = verify(champion)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "succeeded" in (ok.stdout + ok.stderr).lower()
    later = {**recipe, "version": deployed["version"] + 1}  # the same files, claimed as another version
    (champion / "cairn-identity.json").write_bytes(
        (json.dumps(later, sort_keys=True, separators=(",", ":")) + "\n").encode()
    )
    relabelled = verify(champion)
    assert relabelled.returncode != 0 and "cairn-identity.json" in relabelled.stdout + relabelled.stderr
    (champion / "cairn-identity.json").write_bytes(stored_identity)
    (champion / "estimator").write_bytes(_one_digit_changed((champion / "estimator").read_bytes()))
    bad = verify(champion)
    assert bad.returncode != 0 and "estimator" in bad.stdout + bad.stderr, "one byte changed: it fails"


# (b) altered champions, (c) an unsigned one --------------------------------------------------------
@pytest.mark.slow
def test_an_altered_champion_is_refused_and_the_refusal_is_in_the_log_and_the_history(system, tmp_path):
    s = system
    settings, deployed, url = s["settings"], s["deployed"].data, s["serve_url"]
    before = _served(url)
    assert before["version"] == deployed["version"]
    files = _champion_files(deployed)
    genuine_sig = ArtifactRef.model_validate(deployed["signature"])

    # 1. One byte changed, re-hashed into the store, deployed with the genuine signature.
    forged = _forge(settings, files)
    forged_id = asyncio.run(_deploy(settings, deployed, deployed["version"] + 1, forged, genuine_sig))
    refused = asyncio.run(_refusal(settings, forged_id))
    assert refused["model"]["sha256"] == forged.sha256 and refused["version"] == deployed["version"] + 1
    assert "signature does not verify" in refused["reason"] and "estimator" in refused["reason"], refused
    assert refused["served_version"] == deployed["version"]

    # 2. The same forgery signed with the attacker's own key (a valid signature, the wrong signer).
    attacker_private, _ = model_signatures.keygen(tmp_path / "attacker")
    forged_files = {
        "bundle.json": _path(forged.uri).read_bytes(),
        "estimator": _path(json.loads(_path(forged.uri).read_bytes())["estimator"]["uri"]).read_bytes(),
    }
    attacker_sig = ArtifactStore(settings.artifacts).put_bytes(
        model_signatures.sign(forged_files, attacker_private), model_signatures.SIGNATURE_MEDIA_TYPE, ".sig"
    )
    self_signed_id = asyncio.run(_deploy(settings, deployed, deployed["version"] + 2, forged, attacker_sig))
    refused = asyncio.run(_refusal(settings, self_signed_id))
    assert "signature does not verify" in refused["reason"] and "key" in refused["reason"].lower(), refused

    # 3. One byte of the stored champion itself changed in place, then deployed again as it is named.
    estimator = _path(json.loads(files["bundle.json"])["estimator"]["uri"])
    original = estimator.read_bytes()
    estimator.write_bytes(_one_digit_changed(original))
    try:
        model = ArtifactRef.model_validate(deployed["model"])
        in_place_id = asyncio.run(_deploy(settings, deployed, deployed["version"] + 3, model, genuine_sig))
        refused = asyncio.run(_refusal(settings, in_place_id))
        assert "IntegrityError" in refused["reason"] and "does not match" in refused["reason"], refused
    finally:
        estimator.write_bytes(original)

    after = _served(url)
    assert after == before, "the endpoint kept serving the champion it had"
    history = _history(s, forged_id[:8], self_signed_id[:8], in_place_id[:8])
    assert history.count("REFUSED") >= 3, history
    assert f"v{deployed['version'] + 1} not served, the endpoint keeps v{deployed['version']}" in history
    assert "signature does not verify" in history and "IntegrityError" in history


@pytest.mark.slow
def test_an_unsigned_champion_is_refused(system) -> None:
    s = system
    settings, deployed, url = s["settings"], s["deployed"].data, s["serve_url"]
    before = _served(url)
    genuine = ArtifactRef.model_validate(deployed["model"])  # the right bytes, but no signature
    unsigned_id = asyncio.run(_deploy(settings, deployed, deployed["version"] + 10, genuine, None))
    refused = asyncio.run(_refusal(settings, unsigned_id))
    assert refused["reason"].startswith("unsigned"), refused
    assert refused.get("signature") is None and refused["model"]["sha256"] == genuine.sha256
    assert _served(url) == before
    history = _history(s, unsigned_id[:8])
    assert f"v{deployed['version'] + 10} not served" in history and "reason: unsigned" in history


# Identity: a genuine signature names the model and version it was made for ------------------------
@pytest.mark.slow
def test_a_signed_older_version_redeployed_as_a_later_one_is_refused(system) -> None:
    """Rollback: v1's own bundle and signature, every byte genuine, announced as a later version."""
    s = system
    settings, deployed, url = s["settings"], s["deployed"].data, s["serve_url"]
    before = _served(url)
    old_bundle = ArtifactRef.model_validate(deployed["model"])
    old_signature = ArtifactRef.model_validate(deployed["signature"])
    later = deployed["version"] + 20
    rollback_id = asyncio.run(_deploy(settings, deployed, later, old_bundle, old_signature))
    refused = asyncio.run(_refusal(settings, rollback_id))
    assert refused["version"] == later and refused["served_version"] == deployed["version"], refused
    assert "signature does not verify: identity mismatch" in refused["reason"], refused
    assert f"not signed as {MODEL} v{later}" in refused["reason"], refused
    assert "cairn-identity.json" in refused["reason"], refused
    assert _served(url) == before, "the endpoint kept serving the champion it had"
    history = _history(s, rollback_id[:8])
    assert f"v{later} not served, the endpoint keeps v{deployed['version']}" in history
    assert "identity mismatch" in history

    # At start the champion comes from the registry: tags rewritten so that a later version names
    # v1's bundle and signature are refused the same way, by the endpoint's own start path.
    tracker = Tracker.from_settings(settings)
    champion = tracker.champion(MODEL)
    assert champion is not None and champion.version == deployed["version"] and champion.signature_uri
    champions = Champions(settings, EndpointMetrics())
    champions.verify_key = model_signatures.home_keys(CairnSettings(home=s["home"]))[1]
    assert champions.load_champion(MODEL, champion, tracker).ref.sha256 == old_bundle.sha256
    with pytest.raises(Refused, match=f"identity mismatch: not signed as {MODEL} v{later}"):
        champions.load_champion(MODEL, dataclasses.replace(champion, version=later), tracker)
    with pytest.raises(Refused, match=f"identity mismatch: not signed as {OTHER} v"):
        champions.load_champion(OTHER, champion, tracker)


@pytest.mark.slow
def test_another_models_signed_champion_under_this_name_is_refused(system) -> None:
    """Substitution: a second model line's champion, genuinely signed, deployed as this model."""
    s = system
    settings, deployed, url = s["settings"], s["deployed"].data, s["serve_url"]
    data = write_table(s["root"] / "other-data")
    run = cairn(
        "submit", str(data), "--target", "price", "--model-name", OTHER, *SMALL,
        "--wait", "--timeout", "300", env=s["env"], cwd=s["root"], timeout=330,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    log = StreamLog(settings)
    asyncio.run(log.poll())
    other = [r.data for r in log.of_type(ModelDeployed.EVENT_TYPE) if r.data["model_name"] == OTHER][-1]
    assert other["signature"], "deployment signed the other model's champion too"
    # Its own endpoint line serves it: the identity it was signed with is the one it is served as.
    wait_until(lambda: OTHER in httpx.get(url + "/v1/models", timeout=10).json(), 60, f"{OTHER} served")
    before = _served(url)

    later = deployed["version"] + 30
    other_bundle = ArtifactRef.model_validate(other["model"])
    other_signature = ArtifactRef.model_validate(other["signature"])
    swapped_id = asyncio.run(_deploy(settings, deployed, later, other_bundle, other_signature))
    refused = asyncio.run(_refusal(settings, swapped_id))
    assert refused["model_name"] == MODEL and refused["model"]["sha256"] == other_bundle.sha256, refused
    assert "signature does not verify: identity mismatch" in refused["reason"], refused
    assert f"not signed as {MODEL} v{later}" in refused["reason"], refused
    assert refused["served_version"] == deployed["version"]
    assert _served(url) == before, "the endpoint kept serving this model's own champion"


# The serve user may publish its refusals, and only those of the log ------------------------------
def test_the_serve_user_may_publish_refusals_on_a_server_with_the_generated_users(tmp_path: Path) -> None:
    from contracts import ENDPOINT
    from services.platform.bus.embedded import EmbeddedNats
    from services.platform.bus.provision import provision_all
    from services.tools.nats_auth import SERVE, credentials_env, derive_permissions, write_nats_config

    assert SERVE == ENDPOINT, "the endpoint's NATS user is the producer its contracts name"
    assert subject_for(ModelRefused) in derive_permissions()[SERVE].publish
    auth = tmp_path / "auth"
    write_nats_config(auth)
    server = EmbeddedNats(tmp_path / "nats", include=auth / "auth.conf")
    server.start()
    try:

        def as_user(user: str) -> CairnSettings:
            env = credentials_env(auth, user)
            return CairnSettings(home=tmp_path / "home", nats_url=server.url, nats_user=user,
                                 nats_password=env["CAIRN_NATS_PASSWORD"])  # fmt: skip

        async def go() -> int:
            admin = await connect(as_user("admin"), "admin")
            await provision_all(admin.jetstream(), as_user("admin"))
            await admin.close()
            serve = await connect(as_user(SERVE), "serve")
            try:
                payload = ModelRefused(model_name="m", version=2, reason="unsigned", served_version=1)
                event = new_event(payload, source="/cairn/serve")
                ack = await serve.jetstream().publish(
                    subject_for(ModelRefused), event.encode(), headers={"Nats-Msg-Id": event.id}, timeout=5
                )
                return ack.seq
            finally:
                await serve.close()

        assert asyncio.run(go()) >= 1
    finally:
        server.stop()


# Item 9: the v2 version route means the version ---------------------------------------------------
def test_a_v2_path_version_must_be_the_served_one() -> None:
    assert version_problem("m", None, 3) is None and version_problem("m", "3", 3) is None
    assert "version '2' is not served" in version_problem("m", "2", 3)


@pytest.mark.slow
def test_the_v2_version_route_serves_that_version_or_404(system) -> None:
    url, served = system["serve_url"], system["deployed"].data["version"]
    other = served + 41
    body = {"inputs": [{"name": c, "shape": [1], "datatype": "BYTES" if c == "colour" else "FP64",
                        "data": [v]} for c, v in ROW.items()]}  # fmt: skip
    with httpx.Client(base_url=url, timeout=10) as client:
        ok = client.post(f"/v2/models/{MODEL}/versions/{served}/infer", json=body)
        assert ok.status_code == 200 and ok.json()["model_version"] == str(served), ok.text
        assert client.get(f"/v2/models/{MODEL}/versions/{served}").json()["versions"] == [str(served)]
        assert client.get(f"/v2/models/{MODEL}/versions/{served}/ready").status_code == 200
        for path, send in [
            (f"/v2/models/{MODEL}/versions/{other}/infer", lambda p: client.post(p, json=body)),
            (f"/v2/models/{MODEL}/versions/{other}", client.get),
            (f"/v2/models/{MODEL}/versions/latest/infer", lambda p: client.post(p, json=body)),
        ]:
            answer = send(path)
            asked = path.split("/versions/")[1].split("/")[0]
            assert answer.status_code == 404, (path, answer.text)
            assert answer.headers["content-type"].startswith("application/json")
            assert f"version '{asked}' is not served" in answer.json()["error"], answer.text
            assert answer.json()["served_version"] == str(served)
        assert client.get(f"/v2/models/{MODEL}/versions/{other}/ready").status_code == 404


def test_the_signature_check_refuses_what_an_attacker_would_try(tmp_path: Path) -> None:
    """The endpoint's rule on real files and the real library: each way round it is refused."""
    settings = CairnSettings(home=tmp_path / "home", artifacts_url=(tmp_path / "store").as_uri())
    store = ArtifactStore(settings.artifacts)
    private, public = model_signatures.keygen(tmp_path / "keys")
    files = {"bundle.json": b'{"format": "cairn.model.v1"}', "estimator": b'{"coef": [1.25, 3.5]}'}
    media = model_signatures.SIGNATURE_MEDIA_TYPE
    sig = store.put_bytes(model_signatures.sign(files, private), media, ".sig")
    model_signatures.check(files, sig, public, settings)  # the genuine pair passes
    model_signatures.check(files, None, None, settings)  # no verify key: nothing is checked

    outside = tmp_path / "elsewhere.sig"
    outside.write_bytes(_path(sig.uri).read_bytes())
    attempts = {
        "unsigned": (files, None),
        "one byte": ({**files, "estimator": _one_digit_changed(files["estimator"])}, sig),
        "outside the store": (files, sig.model_copy(update={"uri": outside.as_uri()})),
        "wrong hash": (files, sig.model_copy(update={"sha256": "0" * 64})),
        "not a signature": (files, store.put_bytes(b"{}", media, ".sig")),
    }
    for what, (candidate, signature) in attempts.items():
        try:
            model_signatures.check(candidate, signature, public, settings)
        except model_signatures.SignatureRefused:
            continue
        pytest.fail(f"{what}: not refused")
    with pytest.raises(model_signatures.KeyProblem, match="elliptic-curve"):  # the Ed25519 audit key
        from services.lineage.signing import keygen as audit_keygen

        audit_private, _ = audit_keygen(tmp_path / "audit")
        model_signatures.signing_key(settings.model_copy(update={"model_signing_key": audit_private}))


def test_a_signature_binds_the_model_name_and_version(tmp_path: Path) -> None:
    """The endpoint's rule on real files and the real library: files signed as `m` v1 verify only as
    `m` v1; a signature over the files alone (from before identities) verifies as nothing."""
    settings = CairnSettings(home=tmp_path / "home", artifacts_url=(tmp_path / "store").as_uri())
    private, public = model_signatures.keygen(tmp_path / "keys")
    files = {"bundle.json": b'{"format": "cairn.model.v1"}', "estimator": b'{"coef": [1.25, 3.5]}'}
    signer = settings.model_copy(update={"model_signing_key": private})
    signed = model_signatures.sign_bundle(files, "m", 1, signer)
    assert signed is not None
    identity = json.loads(_path(signed.identity.uri).read_bytes())
    assert identity == {"format": "cairn.identity.v1", "model_name": "m", "version": 1,
                        "bundle_sha256": sha256_bytes(files["bundle.json"])}  # fmt: skip
    model_signatures.check_champion(files, "m", 1, signed.signature, public, settings)

    for name, version in [("m", 2), ("other", 1)]:
        with pytest.raises(Refused, match=f"identity mismatch: not signed as {name} v{version}"):
            model_signatures.check_champion(files, name, version, signed.signature, public, settings)
    store = ArtifactStore(settings.artifacts)
    media = model_signatures.SIGNATURE_MEDIA_TYPE
    legacy = store.put_bytes(model_signatures.sign(files, private), media, ".sig")
    with pytest.raises(Refused, match="identity mismatch"):  # signed before identities: files only
        model_signatures.check_champion(files, "m", 1, legacy, public, settings)
