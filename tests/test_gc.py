"""Retention: what `cairn gc` keeps and frees on a real store, and `cairn hold`.

The decisions are pure functions over the lineage (tested directly); the journey runs four real
runs through `cairn up` and collects the store with the `cairn` executable.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import fsspec
import nats
import pytest

from services.platform.artifacts import read_verified
from services.platform.bus.provision import provision_holds_bucket
from services.tools import gc
from tests.conftest import make_settings
from tests.test_cache import of_type, submit
from tests.test_journeys import CAIRN, cairn, user_env, write_table

SHA = "a" * 64


def run(correlation: str, seq: int, model: str, shas: set[str], *, ended=True, deployed=()) -> gc.Run:
    return gc.Run(correlation, seq, model, ended, set(shas), {correlation}, list(deployed))


# Pure decisions ----------------------------------------------------------------------------------
def test_keep_set_champions_recent_runs_holds_and_unfinished_runs() -> None:
    runs = {
        "r1": run("r1", 1, "m", {"d1", "m1"}, deployed=[(9, 1)]),
        "r2": run("r2", 10, "m", {"d2", "m2"}, deployed=[(19, 2)]),
        "r3": run("r3", 20, "m", {"d3"}),
        "r4": run("r4", 30, "m", {"d4"}),
        "r5": run("r5", 40, "m", {"d5"}, ended=False),
        "r6": run("r6", 50, "other", {"d6"}),
    }
    keep = gc.keep_set(runs, [gc.Hold("r3", correlation="r3"), gc.Hold(SHA, sha256=SHA)], gc.Policy(0, 1, 0))
    assert {"m2", "d2"} <= keep.keys() and "champion" in keep["m2"]
    assert {"m1", "d1"}.isdisjoint(keep), "past champions beyond the depth go"
    assert "d3" in keep and "hold" in keep["d3"]
    assert "d4" not in keep, "neither the latest run nor held nor a champion"
    assert "d5" in keep, "the latest run, and unfinished"
    assert "d6" in keep, "the last run is kept per model"
    assert SHA in keep
    deeper = gc.keep_set(runs, [], gc.Policy(1, 0, 0))
    assert "m1" in deeper and "past champion" in deeper["m1"]
    assert "d5" in deeper and "in progress" in deeper["d5"]


def test_plan_keeps_what_is_younger_than_the_grace() -> None:
    files = [gc.StoredFile("/s/a", "a", 10, 1000.0), gc.StoredFile("/s/b", "b", 20, 1990.0)]
    delete, kept = gc.plan(files, {}, now=2000.0, grace_s=60)
    assert [f.sha256 for f in delete] == ["a"]
    assert kept[0][0].sha256 == "b" and "grace" in kept[0][1]


def test_store_paths_name_their_hash() -> None:
    assert gc.sha_of(f"/st/sha256/aa/{SHA}.parquet", "/st") == SHA
    assert gc.sha_of(f"/st/landing/sha256/aa/{SHA}/houses.csv", "/st") == SHA
    assert gc.sha_of("/st/landing/tmp/abc", "/st") is None


def test_holds_resolve_runs_artifacts_and_model_versions() -> None:
    runs = {"3f2a9b1c-0000": run("3f2a9b1c-0000", 1, "houses", {"d"}, deployed=[(5, 2)])}
    runs["3f2a9b1c-0000"].event_ids.add("77aa00bb-1111")
    assert gc.resolve_hold("3f2a9b1c", runs).correlation == "3f2a9b1c-0000"
    assert gc.resolve_hold("77aa00bb", runs).correlation == "3f2a9b1c-0000", "an event holds its run"
    assert gc.resolve_hold("houses@2", runs).correlation == "3f2a9b1c-0000"
    assert gc.resolve_hold(SHA.upper(), runs).sha256 == SHA
    for bad in ("houses@3", "nothing-like-it", "3f2a"):
        with pytest.raises(LookupError):
            gc.resolve_hold(bad, runs)


# The user's path ---------------------------------------------------------------------------------
@pytest.fixture
def system(retention_system: dict) -> dict:
    return retention_system


def artifacts_of(events: list[dict[str, Any]]) -> dict[str, str]:
    """sha256 -> uri of every artifact a run's events name."""
    from services.lineage.store import artifact_refs

    return {ref["sha256"]: ref["uri"] for e in events for _, ref in artifact_refs(e["data"])}


def exists(uri: str) -> bool:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs.exists(path)


@pytest.mark.slow
def test_gc_frees_what_nothing_keeps_and_an_audit_of_the_champion_stays_complete(
    system: dict, tmp_path: Path
) -> None:
    env, root = system["env"], system["root"]
    runs = []
    for seed in range(4):
        code, events = submit(
            system, write_table(tmp_path / f"d{seed}", rows=120, seed=seed), "--model-name", "gcm"
        )
        assert code == (0 if seed == 0 else 3), events
        runs.append(events)
    champion, doomed, held, latest = runs
    assert of_type(champion, "cairn.model.deployed.v1")

    # Everything is younger than the default grace period: nothing would go.
    young = cairn("gc", "--dry-run", "--keep-runs", "0", "--keep-champions", "0", env=env, cwd=root)
    assert young.returncode == 0, young.stderr
    assert "would free 0 bytes" in young.stdout

    hold_id = held[0]["correlationid"][:8]
    assert cairn("hold", hold_id, env=env, cwd=root).returncode == 0
    listed = cairn("hold", "--list", env=env, cwd=root)
    assert hold_id in listed.stdout and held[0]["correlationid"] in listed.stdout

    policy = ["--keep-runs", "1", "--keep-champions", "0", "--grace", "0s"]
    dry = cairn("gc", "--dry-run", *policy, env=env, cwd=root)
    assert dry.returncode == 0, dry.stderr
    gone = artifacts_of(doomed)
    keep = {**artifacts_of(champion), **artifacts_of(held), **artifacts_of(latest)}
    doomed_only = {sha: uri for sha, uri in gone.items() if sha not in keep}
    assert doomed_only, "the second run has artifacts of its own"
    for sha in doomed_only:
        assert sha[:12] in dry.stdout, f"dry run does not list {sha}"
    for sha in keep:
        assert sha[:12] not in dry.stdout
    assert all(exists(uri) for uri in doomed_only.values()), "a dry run deletes nothing"

    real = cairn("gc", *policy, env=env, cwd=root)
    assert real.returncode == 0, real.stderr
    freed = int(re.search(r"freed (\d+) bytes", real.stdout).group(1))
    assert freed > 0 and not any(exists(uri) for uri in doomed_only.values())
    assert int(re.search(r"(\d+) MLflow runs marked", real.stdout).group(1)) >= 1

    # The champion's audit is complete: every artifact of its run reads back with its hash, the
    # model bundle's estimator too, and the chain verifies.
    for sha, uri in keep.items():
        read_verified(uri, sha)
    [deployed] = of_type(champion, "cairn.model.deployed.v1")
    bundle = deployed["data"]["model"]
    estimator = json.loads(read_verified(bundle["uri"], bundle["sha256"]))["estimator"]
    read_verified(estimator["uri"], estimator["sha256"])
    lineage = cairn("lineage", deployed["id"], env=env, cwd=root)
    assert lineage.returncode == 0, lineage.stderr
    assert cairn("audit", "verify", env=env, cwd=root).returncode == 0

    # The MLflow run of the removed model says so.
    from mlflow import MlflowClient

    [trained] = of_type(doomed, "cairn.model.trained.v1")
    client = MlflowClient(tracking_uri=f"sqlite:///{system['home'] / 'mlflow.db'}")
    assert client.get_run(trained["data"]["mlflow_run_id"]).data.tags["cairn.gc"].startswith("removed ")

    # Released, the held run goes on the next collection.
    assert cairn("hold", "--release", hold_id, env=env, cwd=root).returncode == 0
    again = cairn("gc", *policy, env=env, cwd=root)
    assert again.returncode == 0, again.stderr
    [ingested] = of_type(held, "cairn.dataset.ingested.v1")
    assert not exists(ingested["data"]["dataset"]["uri"])
    assert exists(deployed["data"]["model"]["uri"]), "the champion stays"


def test_grace_durations() -> None:
    from services.tools.cli.common import CliError
    from services.tools.cli.store import parse_duration

    assert [parse_duration(t) for t in ("90", "90s", "30m", "1h", "7d", "0s")] == [
        90,
        90,
        1800,
        3600,
        604800,
        0,
    ]
    with pytest.raises(CliError):
        parse_duration("soon")


# Holds every operator sees: the deployment's NATS, not a home --------------------------------------
def test_a_stored_hold_is_read_back_and_a_forged_one_stops_gc() -> None:
    hold = gc.Hold("houses@4", correlation="3f2a9b1c-0000", at=1.0, by="ops@host")
    key = gc.hold_key(hold.id)
    assert gc.decode_hold(key, gc.encode_hold(hold)) == hold
    assert gc.hold_key(" houses@4") == key, "one id, one key"
    forged = [
        (key, b"not json"),
        (gc.hold_key("other"), gc.encode_hold(hold)),  # under another id's key
        (key, json.dumps({"id": "houses@4"}).encode()),  # holds nothing
        (key, json.dumps({**hold.__dict__, "extra": 1}).encode()),
    ]
    for k, value in forged:
        with pytest.raises(ValueError):
            gc.decode_hold(k, value)


def test_every_read_of_the_holds_sees_every_hold(nats_server, tmp_path: Path) -> None:
    """A thousand reads of a bucket with two holds (one released), five at a time: each sees the
    one hold. Listing with nats-py's `kv.keys()` failed both ways: twenty at a time, about two
    listings in a thousand came back empty (gc deletes what a read does not see), and each listing
    leaves a consumer on the server for five minutes, so the thousandth is refused."""
    held = gc.Hold("houses@4", correlation="3f2a9b1c-0000", at=1.0, by="ops@host")

    async def reads() -> list[list[gc.Hold]]:
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            await provision_holds_bucket(js, make_settings(nats_server.url, tmp_path))
            assert await gc.read_holds(js) == []
            assert await gc.add_hold(js, held) is None
            assert await gc.add_hold(js, gc.Hold("gone", sha256=SHA, at=2.0)) is None
            assert await gc.release_hold(js, "gone")
            got: list[list[gc.Hold]] = []
            for _ in range(200):
                got += await asyncio.gather(*(gc.read_holds(js) for _ in range(5)))
            return got
        finally:
            await nc.close()

    got = asyncio.run(reads())
    assert len(got) == 1000
    assert [g for g in got if g != [held]] == []


def stored(store: Path, sha: str) -> Path:
    """A content-addressed file in the shared store, as a step writes it."""
    path = store / "sha256" / sha[:2] / f"{sha}.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(sha.encode())
    return path


@pytest.mark.slow
def test_holds_made_in_one_home_are_seen_and_honoured_from_another(nats_server, tmp_path: Path) -> None:
    """Two operators (two CAIRN_HOMEs) against one deployment: one NATS, one artifact store."""
    store = tmp_path / "store"
    alice, bob = (
        user_env(tmp_path / who, CAIRN_NATS_URL=nats_server.url, CAIRN_ARTIFACTS_URL=store.as_uri())
        for who in ("alice", "bob")
    )
    provisioned = cairn("provision", env=alice, cwd=tmp_path)
    assert provisioned.returncode == 0, provisioned.stdout + provisioned.stderr

    # An older version's holds.json in alice's home is imported once, and says so.
    old = gc.Hold("d" * 64, sha256="d" * 64, at=1.0)
    (tmp_path / "alice" / gc.HOLDS_FILE).write_text(json.dumps([old.__dict__]))
    first = cairn("hold", "--list", env=alice, cwd=tmp_path)
    assert first.returncode == 0 and "imported 1 holds" in first.stderr, first.stdout + first.stderr
    assert not (tmp_path / "alice" / gc.HOLDS_FILE).exists()
    again = cairn("hold", "--list", env=alice, cwd=tmp_path)
    assert "imported" not in again.stderr and old.id in again.stdout

    # Three holds at once, from both homes: none overwrites another.
    shas = ["a" * 64, "b" * 64, "c" * 64]
    procs = [
        subprocess.Popen(
            [CAIRN, "hold", sha], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for sha, env in zip(shas, (alice, bob, alice), strict=True)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, out + err
    for env in (alice, bob):
        listed = cairn("hold", "--list", env=env, cwd=tmp_path)
        assert listed.returncode == 0, listed.stderr
        assert all(sha in listed.stdout for sha in [*shas, old.id]), listed.stdout

    # Holding it again is one hold; a release from the other home releases it for everyone.
    twice = cairn("hold", shas[0], env=bob, cwd=tmp_path)
    assert twice.returncode == 0 and "already held" in twice.stdout, twice.stdout + twice.stderr
    assert cairn("hold", "--release", shas[2], env=bob, cwd=tmp_path).returncode == 0
    assert shas[2] not in cairn("hold", "--list", env=alice, cwd=tmp_path).stdout

    # gc from bob keeps what alice held, and frees the rest.
    held, released, loose = stored(store, shas[0]), stored(store, shas[2]), stored(store, "e" * 64)
    collected = cairn("gc", "--grace", "0s", env=bob, cwd=tmp_path)
    assert collected.returncode == 0, collected.stdout + collected.stderr
    assert held.exists(), "held from another home"
    assert not released.exists() and not loose.exists()
