"""Contracts that evolve without an outage: tolerant readers, upcasters, versioned durables, and a
compatibility check against the released schemas (docs/CONTRACTS.md).

The slow tests at the end run real services: a rolling upgrade where one service's contract gained
an optional field, and a log written with v1 events read through a build whose model is v2.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import Field

from contracts import (
    TYPES,
    ContractError,
    DataArrived,
    DataRejected,
    TrialCompleted,
    decode,
    decode_document,
    envelope_model,
    new_event,
)
from contracts.compat import compare
from contracts.schemas import check, event_schema, latest_release
from contracts.subjects import ROOT, replay_namespace
from contracts.types import Contract
from contracts.upcasters import chain_of, earlier, older_types, upcast
from services.platform.bus.consumer import durable_name
from tests.rolling.builds import NEW_FIELD, NEW_VALUE, next_build

CAIRN = str(Path(sys.executable).with_name("cairn"))
TRIAL = "cairn.trial.completed.v1"


def released(event_type: str) -> dict[str, Any]:
    """The schema of the last release, which compatibility is judged against (not the working tree)."""
    release = latest_release()
    assert release is not None
    return json.loads((release / "schemas" / f"{event_type}.json").read_text())


def schema_of(payload_cls: type[Contract]) -> dict[str, Any]:
    return envelope_model(payload_cls).model_json_schema(mode="validation")


# Tolerant readers inside, a strict door outside ------------------------------------------------
def test_internal_events_accept_and_keep_unknown_fields() -> None:
    event = new_event(DataRejected(uri="file:///d.csv", reason="empty"), source="/t")
    doc = json.loads(event.encode())
    doc["data"]["hint"] = {"added_in": "2.0"}  # a newer producer's optional field
    read = decode(json.dumps(doc).encode())
    assert read.data.model_extra == {"hint": {"added_in": "2.0"}}
    assert json.loads(read.encode())["data"]["hint"] == {"added_in": "2.0"}, "kept for lineage"


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"exec": "rm -rf /"}, "data.exec: Extra inputs are not permitted"),
        ({"tuning": {"trails": 8}}, "data.tuning: Value error, unknown field 'trails'"),
    ],
)
def test_data_arrived_is_the_strict_door(data: dict[str, Any], needle: str) -> None:
    doc = json.loads(new_event(DataArrived(uri="s3://b/d.csv", target="y"), source="/t").encode())
    doc["data"].update(data)
    with pytest.raises(ContractError) as err:
        decode(json.dumps(doc).encode())
    assert needle in " ".join(err.value.problems)
    schema = event_schema(DataArrived.EVENT_TYPE)
    assert schema["$defs"]["TuningSpec"]["additionalProperties"] is False
    assert event_schema(TRIAL)["$defs"]["TrialCompleted"]["additionalProperties"] is True


def test_the_envelope_keeps_its_cloudevents_checks() -> None:
    doc = json.loads(new_event(DataRejected(uri="u", reason="r"), source="/t").encode())
    for bad, needle in [({"Bad-Ext": 1}, "extension attribute"), ({"specversion": "0.3"}, "specversion")]:
        with pytest.raises(ContractError) as err:
            decode(json.dumps({**doc, **bad}).encode())
        assert needle in err.value.reason + " ".join(err.value.problems)


# Versioned durable names -------------------------------------------------------------------------
class _ArrivedV2(Contract):
    EVENT_TYPE: ClassVar[str] = "cairn.data.arrived.v2"


def test_durable_names_carry_the_version() -> None:
    assert durable_name("ingestion", DataArrived, ROOT) == "ingestion-data-arrived-v1"
    assert durable_name("ingestion", _ArrivedV2, ROOT) == "ingestion-data-arrived-v2"
    assert durable_name("ingestion", DataArrived, replay_namespace("ab")).startswith(
        "ingestion-data-arrived-v1-"
    )


# Upcasters -----------------------------------------------------------------------------------------
def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    data["reasons"] = [data.pop("reason")]
    return data


def _v2_to_v3(data: dict[str, Any]) -> dict[str, Any]:
    return {**data, "severity": "error"}


class _RejectedV3(Contract):
    EVENT_TYPE: ClassVar[str] = "cairn.data.rejected.v3"
    PRODUCER: ClassVar[str] = "ingestion"
    UPCASTERS: ClassVar[dict[int, Any]] = {1: _v1_to_v2, 2: _v2_to_v3}

    uri: str
    reasons: list[str] = Field(min_length=1)
    severity: str


def test_an_old_event_is_read_as_the_current_model_through_the_chain() -> None:
    older = older_types([_RejectedV3])
    assert set(older) == {"cairn.data.rejected.v1", "cairn.data.rejected.v2"}
    old = json.loads(new_event(DataRejected(uri="u", reason="empty"), source="/t").encode())
    kept = json.dumps(old)
    read = decode_document(
        old, {_RejectedV3.EVENT_TYPE}, types={_RejectedV3.EVENT_TYPE: _RejectedV3}, older=older
    )
    assert read.type == "cairn.data.rejected.v3"
    assert read.data.reasons == ["empty"] and read.data.severity == "error"
    assert read.data.model_extra == {"problems": []}, "a field the new model dropped is still kept"
    assert json.dumps(old) == kept, "upcasting never changes what was read"


def test_an_upcaster_that_fails_is_a_contract_error_naming_the_versions() -> None:
    older = older_types([_RejectedV3])
    doc = {"type": "cairn.data.rejected.v1", "data": {"uri": "u"}}
    with pytest.raises(ContractError, match="cannot upcast cairn.data.rejected.v1 to cairn.data.rejected.v3"):
        decode_document(doc, types={_RejectedV3.EVENT_TYPE: _RejectedV3}, older=older)


def test_a_route_may_still_consume_the_old_version_during_a_migration() -> None:
    v1_route = earlier(_RejectedV3, 1)
    assert durable_name("ingestion", v1_route, ROOT) == "ingestion-data-rejected-v1"
    old = json.loads(new_event(DataRejected(uri="u", reason="empty"), source="/t").encode())
    types, older = {_RejectedV3.EVENT_TYPE: _RejectedV3}, older_types([_RejectedV3])
    read = decode_document(old, {v1_route.EVENT_TYPE}, types=types, older=older)
    assert isinstance(read.data, _RejectedV3) and read.data.reasons == ["empty"]
    with pytest.raises(ValueError, match="no upcaster from cairn.data.arrived.v0"):
        earlier(_ArrivedV2, 0)


def test_a_chain_with_a_gap_is_refused() -> None:
    class Gap(Contract):
        EVENT_TYPE: ClassVar[str] = "cairn.data.rejected.v3"
        UPCASTERS: ClassVar[dict[int, Any]] = {1: _v1_to_v2}

    with pytest.raises(ValueError, match="every older version needs a step"):
        chain_of(Gap)
    assert upcast({"reason": "r"}, [_v1_to_v2]) == {"reasons": ["r"]}


# Compatibility with the released schemas -------------------------------------------------------------
def test_every_model_is_compatible_with_its_released_schema() -> None:
    breaking = [line for r in check() for line in r.lines()[: len(r.breaking)]]
    assert breaking == [], "backward-incompatible (docs/CONTRACTS.md):\n" + "\n".join(breaking)


class _Additive(TrialCompleted):
    worker: str | None = None


class _Incompatible(TrialCompleted):
    """Deliberately incompatible with the released trial-completed: each kind of break once."""

    model_config = {"extra": "forbid"}
    attempt: int  # required field added
    duration_s: int = Field(ge=0)  # number -> integer
    trial_id: int = Field(ge=1)  # minimum 0 -> 1
    metric: str = Field(pattern=r"^[a-z]+$")  # enum -> free string with a pattern: narrowed
    error: None = None  # str | None -> None


def test_an_optional_field_is_additive() -> None:
    report = compare(TRIAL, released(TRIAL), schema_of(_Additive))
    assert report.ok and ("data.worker", "optional field added") in report.additive


def test_the_check_fails_on_a_deliberately_incompatible_change_naming_the_fields() -> None:
    report = compare(TRIAL, released(TRIAL), schema_of(_Incompatible))
    assert not report.ok
    found = {path: what for path, what in report.breaking}
    assert found["data.attempt"] == "required field added"
    assert found["data.duration_s"] == "type narrowed: number -> integer"
    assert found["data.trial_id"] == "type narrowed: minimum 0 -> 1"
    assert found["data.error"] == "type narrowed: string no longer accepted"
    assert "data.metric" in found
    assert found["data"] == "type narrowed: unknown fields no longer accepted"
    assert any(line.startswith(f"{TRIAL}: data.attempt: required field added") for line in report.lines())


def test_a_removed_field_and_a_removed_type_are_breaking(tmp_path: Path) -> None:
    schema = schema_of(TrialCompleted)
    del schema["$defs"]["TrialCompleted"]["properties"]["error"]
    assert ("data.error", "field removed (a new vN with an upcaster is due)") in compare(
        TRIAL, released(TRIAL), schema
    ).breaking
    (tmp_path / f"{TRIAL}.json").write_text(json.dumps(released(TRIAL)))
    (tmp_path / "cairn.data.rejected.v1.json").write_text("{}")
    reports = {
        r.event_type: r for r in check(tmp_path, {"cairn.data.rejected.v2": {}, TRIAL: released(TRIAL)})
    }
    assert reports[TRIAL].ok and not reports[TRIAL].additive
    assert reports["cairn.data.rejected.v1"].breaking == [
        (
            "<type>",
            "superseded by cairn.data.rejected.v2 without an upcaster: "
            "events of it in the log become unreadable",
        )
    ]
    assert reports["cairn.data.rejected.v2"].additive == [("<type>", "new event type")]


def _schemas(build: Path | None, cwd: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    if build is not None:
        env["PYTHONPATH"] = str(build)
    return subprocess.run(
        [CAIRN, "schemas", *flags], env=env, cwd=cwd, capture_output=True, text=True, check=False
    )


def test_cairn_schemas_check_for_a_person(tmp_path: Path) -> None:
    today = _schemas(None, tmp_path, "--check")
    assert today.returncode == 0, today.stderr
    assert today.stdout.strip().endswith("compatible with release 0.1.0; the generated files are current")
    added = next_build("optional-field", tmp_path)
    stale = _schemas(added, tmp_path, "--check")
    assert stale.returncode == 1, "the model changed, its schema file was not regenerated"
    assert "1 generated file(s) out of date: run `cairn schemas`" in stale.stderr
    assert _schemas(added, tmp_path).returncode == 0
    added_check = _schemas(added, tmp_path, "--check")
    assert added_check.returncode == 0, added_check.stderr
    line = f"cairn.dataset.ingested.v1: data.{NEW_FIELD}: optional field added (compatible)"
    assert line in added_check.stdout
    v2 = next_build("v2-rename", tmp_path)
    written = _schemas(v2, tmp_path)  # a new vN is not a break: v1 stays readable through its upcaster
    assert written.returncode == 0, written.stderr
    v2_schemas = v2 / "contracts" / "schemas"
    assert (v2_schemas / "cairn.dataset.ingested.v2.json").is_file()
    assert (v2_schemas / "cairn.dataset.ingested.v1.json").is_file(), "kept: v1 is still in the log"
    v2_check = _schemas(v2, tmp_path, "--check")
    assert v2_check.returncode == 0, v2_check.stderr
    assert "cairn.dataset.ingested.v2: <type>: new event type (compatible)" in v2_check.stdout
    broken = _schemas(next_build("required-field", tmp_path), tmp_path)
    assert broken.returncode == 1
    assert "cairn.dataset.ingested.v1: data.profiler: required field added" in broken.stderr
    last = broken.stderr.strip().splitlines()[-1]
    assert last.startswith("cairn: 1 backward-incompatible change(s) against release 0.1.0")


def test_types_are_all_v_numbered() -> None:
    assert all(t.rsplit(".", 1)[1].startswith("v") for t in TYPES)


# A real rolling upgrade ------------------------------------------------------------------------------
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "contracts_v1"
SMALL_RUN = ["--trials", "2", "--max-budget", "5", "--strategy", "random", "--families", "linear"]


def _cairn(
    *args: str, env: dict[str, str], cwd: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CAIRN, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def _swap(system: Any, name: str, build: Path | None) -> None:
    """Roll one service to another build (a Deployment's pod replaced), the others untouched."""
    system.kill(name)
    if build is None:
        system.service_env.pop(name, None)
    else:
        system.service_env[name] = {"PYTHONPATH": str(build)}
    system.respawn(name)
    assert system.not_ready(120) == {}, f"{name} did not come back"


def _log(system: Any) -> list[Any]:
    import asyncio

    from harness.stream import StreamLog

    log = StreamLog(system.settings)
    asyncio.run(log.poll())
    return log.records


def _one_run(system: Any, table: Path, model: str) -> list[Any]:
    """Submit, follow it to its end; the run's records, after checking nothing was refused."""
    from contracts.subjects import is_dead_letter

    run = _cairn(
        "submit", str(table), "--target", "price", "--model-name", model, *SMALL_RUN,
        "--wait", "--timeout", "240", env=system.env, cwd=table.parent, timeout=270,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "cairn.model.deployed.v1" in run.stdout
    records = _log(system)
    refused = [(r.subject, r.data.get("reason")) for r in records if is_dead_letter(r.subject)]
    refused += [(r.subject, r.data.get("reason")) for r in records if r.type == "cairn.event.rejected.v1"]
    assert refused == [], "nothing is dead-lettered during the upgrade"
    correlation = next(r.correlation for r in reversed(records) if r.type == "cairn.model.deployed.v1")
    return [r for r in records if r.correlation == correlation]


def _lineage_keeps(system: Any, event_id: str) -> dict[str, Any]:
    from services.lineage.store import LineageStore

    store = LineageStore(system.settings.lineage_url)

    def kept() -> dict[str, Any] | None:
        found = [r.event() for r in store.all() if r.event_id == event_id]
        return found[0] if found else None

    deadline = time.monotonic() + 60
    while (doc := kept()) is None:
        assert time.monotonic() < deadline, f"lineage never stored {event_id}"
        time.sleep(0.2)
    return doc


@pytest.mark.slow
def test_rolling_upgrade_one_service_at_a_time_in_both_orders(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from harness.system import start_system
    from tests.test_journeys import write_table

    root = tmp_path_factory.mktemp("rolling")
    build = next_build("optional-field", root / "builds")
    table = write_table(root / "data", rows=120)
    # Services start as `python -m services.tools.cli`: the working directory comes first on sys.path,
    # and in the checkout it would shadow the build's contracts.
    monkeypatch.chdir(root)
    system = start_system(root, serve=False)
    try:
        # 1. The producer first: ingestion now writes the new optional field; features, tuning,
        #    lineage, ... are still the old build and must read it (and lineage keep it).
        _swap(system, "ingestion", build)
        run = _one_run(system, table, "rolling-producer-first")
        ingested = next(r for r in run if r.type == "cairn.dataset.ingested.v1")
        assert ingested.data[NEW_FIELD] == NEW_VALUE, "the new build's field is on the wire"
        assert any(r.type == "cairn.features.built.v1" for r in run), "the old consumer handled it"
        assert _lineage_keeps(system, ingested.doc["id"])["data"][NEW_FIELD] == NEW_VALUE

        # 2. The reverse: the producer rolled back to the old build, its consumer on the new one.
        _swap(system, "ingestion", None)
        _swap(system, "features", build)
        run = _one_run(system, table, "rolling-consumer-first")
        ingested = next(r for r in run if r.type == "cairn.dataset.ingested.v1")
        assert NEW_FIELD not in ingested.data, "the old producer does not know the field"
        assert any(r.type == "cairn.features.built.v1" for r in run), "the new consumer handled it"
    finally:
        system.stop()


# A log written with v1 events, read through today's code -----------------------------------------
def _bundle() -> list[dict[str, Any]]:
    lines = (FIXTURE / "bundle.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[1:]]


async def _load(url: str, records: list[dict[str, Any]]) -> None:
    """The fixture's events into a fresh stream, at the same sequences (the hash chain covers them)."""
    import nats

    from services.lineage.store import decode_body

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for record in records:
            raw = decode_body(record["body"])
            ack = await js.publish(record["subject"], raw, headers={"Nats-Msg-Id": json.loads(raw)["id"]})
            assert ack.seq == record["seq"]
    finally:
        await nc.close()


async def _subjects(url: str) -> set[str]:
    import nats

    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info("CAIRN", subjects_filter=">")
        return set(info.state.subjects or {})
    finally:
        await nc.close()


@pytest.mark.slow
def test_a_v1_log_is_read_replayed_and_verified_by_a_v2_build(tmp_path: Path) -> None:
    """The fixture was written before DatasetIngested v2 and its upcaster existed (how: make.py).

    Today's build and a build whose DatasetIngested is v2 (``rows`` written ``row_count``, with the
    v1 -> v2 upcaster) both rebuild lineage from it, verify it against the stream and offline, and
    `cairn replay` through the v2 build reaches the verdict the v1 run had: bit-identical."""
    import asyncio

    from services.platform.bus.embedded import EmbeddedNats
    from tests.fixtures.contracts_v1.make import ARTIFACTS

    records = _bundle()
    deployed = next(r for r in records if r["subject"] == "cairn.model.deployed.v1")
    correlation = json.loads(deployed["body"][2:])["correlationid"]
    data = tmp_path / "data"
    data.mkdir()
    (data / "houses.csv").write_bytes((FIXTURE / "houses.csv").read_bytes())
    server = EmbeddedNats(tmp_path / "nats")
    server.start()
    try:
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(tmp_path),
            "CAIRN_HOME": str(tmp_path / "home"),
            "CAIRN_NATS_URL": server.url or "",
            "CAIRN_ALLOWED_ROOTS": json.dumps([str(data)]),
            # Where the v1 run kept its artifacts: bundle manifests name them by URI (make.py).
            "CAIRN_ARTIFACTS_URL": ARTIFACTS,
        }
        assert _cairn("provision", env=env, cwd=data).returncode == 0
        asyncio.run(_load(server.url or "", records))
        v2 = {**env, "PYTHONPATH": str(next_build("v2-rename", tmp_path / "builds"))}
        for build in (env, v2):  # the log as it is, and through the v1 -> v2 upcaster
            rebuilt = _cairn("lineage", "rebuild", env=build, cwd=data)
            assert rebuilt.returncode == 0, rebuilt.stderr
            assert f"rebuilt {len(records)} records" in rebuilt.stdout
            verified = _cairn("audit", "verify", env=build, cwd=data)
            assert verified.returncode == 0, verified.stdout + verified.stderr
        offline = _cairn(  # the v1 fixture is unsigned: its self-consistency, accepted as such
            "audit", "verify", "--bundle", str(FIXTURE / "bundle.jsonl"), "--unsigned-ok", env=v2, cwd=data
        )
        assert offline.returncode == 0, offline.stdout + offline.stderr
        lineage = _cairn("lineage", json.loads(deployed["body"][2:])["id"], env=v2, cwd=data)
        assert lineage.returncode == 0, lineage.stderr
        assert "houses.csv" in lineage.stdout and "cairn.dataset.ingested" in lineage.stdout
        replayed = _cairn(
            "replay", "--correlation", correlation, "--timeout", "240", env=v2, cwd=data, timeout=420
        )
        assert replayed.returncode == 0, replayed.stdout + replayed.stderr
        assert "bit-identical" in replayed.stdout
        subjects = asyncio.run(_subjects(server.url or ""))
        assert any(s.endswith(".dataset.ingested.v2") for s in subjects), "the replay ran the v2 build"
        assert "cairn.dataset.ingested.v1" in subjects
    finally:
        server.stop()
