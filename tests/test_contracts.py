"""Contracts: the committed schemas match the models, and the wire format stands alone."""

from __future__ import annotations

import json

import pytest
from jsonschema import Draft202012Validator

from contracts import (
    TYPES,
    ContractError,
    DataArrived,
    TrialCompleted,
    decode,
    derive_id,
    new_event,
    subject_for,
)
from contracts.schemas import ASYNCAPI_PATH, SCHEMA_DIR, asyncapi_text, schema_files

HAND_WRITTEN = {
    "specversion": "1.0",
    "id": "upstream-42",
    "source": "/warehouse/exports",
    "type": "cairn.data.arrived.v1",
    "time": "2026-11-26T10:00:00Z",
    "correlationid": "upstream-42",
    "data": {"uri": "s3://bucket/sales.csv", "target": "revenue", "tuning": {"trials": 8}},
}


def test_committed_schemas_match_models():
    expected = schema_files()
    committed = {p.name: p.read_text() for p in SCHEMA_DIR.glob("*.json")}
    assert committed.keys() == expected.keys(), "run `make schemas`"
    for name, text in expected.items():
        assert committed[name] == text, f"{name} drifted from the model: run `make schemas`"


def test_committed_asyncapi_matches_models():
    assert ASYNCAPI_PATH.read_text() == asyncapi_text(), "run `make schemas`"
    doc = json.loads(ASYNCAPI_PATH.read_text())
    addresses = {c["address"] for c in doc["channels"].values()}
    assert {subject_for(t) for t in TYPES} <= addresses


def test_every_type_has_a_schema_file():
    assert {f"{t}.json" for t in TYPES} == {p.name for p in SCHEMA_DIR.glob("*.json")}


def test_hand_written_event_valid_against_published_schema_and_models():
    schema = json.loads((SCHEMA_DIR / "cairn.data.arrived.v1.json").read_text())
    Draft202012Validator(schema).validate(HAND_WRITTEN)
    event = decode(json.dumps(HAND_WRITTEN).encode())
    assert event.data.tuning.trials == 8
    assert event.data.seed == 0


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d["data"].pop("target"), "target is required"),
        (lambda d: d["data"].update(sha256="abc"), "data.sha256"),
        (lambda d: d.update(type="cairn.data.arrived.v9"), "unknown event type"),
        (lambda d: d.update(time="yesterday"), "time"),
        (lambda d: d["data"].update(surprise=1), "data.surprise"),
        (lambda d: d["data"]["tuning"].update(trails=8), "unknown field 'trails'"),  # the strict door
        (lambda d: d.update(specversion="0.3"), "specversion"),
        (lambda d: d.update({"Bad-Ext": 1}), "extension attribute"),
    ],
)
def test_invalid_events_name_the_problem(mutate, needle):
    doc = json.loads(json.dumps(HAND_WRITTEN))
    mutate(doc)
    with pytest.raises(ContractError) as err:
        decode(json.dumps(doc).encode())
    assert needle in err.value.reason + " ".join(err.value.problems)


def test_hand_written_invalid_event_also_fails_the_schema():
    doc = json.loads(json.dumps(HAND_WRITTEN))
    doc["data"].pop("target")
    schema = json.loads((SCHEMA_DIR / "cairn.data.arrived.v1.json").read_text())
    assert list(Draft202012Validator(schema).iter_errors(doc))


def test_not_json_and_not_object():
    with pytest.raises(ContractError, match="not JSON"):
        decode(b"\xff\xfe{")
    with pytest.raises(ContractError, match="JSON object"):
        decode(b"[1, 2]")


def test_output_ids_derive_from_the_cause():
    cause = new_event(DataArrived(uri="file:///d.csv", target="y"), source="/t")
    assert derive_id(cause.id, "cairn.x.v1") == derive_id(cause.id, "cairn.x.v1")
    assert derive_id(cause.id, "cairn.x.v1", "a") != derive_id(cause.id, "cairn.x.v1", "b")
    child = new_event(DataArrived(uri="file:///e.csv", target="y"), source="/t", cause=cause)
    assert child.causationid == cause.id and child.correlationid == cause.correlationid


def test_ok_trial_needs_a_score():
    with pytest.raises(ValueError, match="score"):
        TrialCompleted(
            study_id="s",
            trial_id=0,
            rung=0,
            budget=1,
            family="xgboost",
            params={},
            status="ok",
            metric="rmse",
            duration_s=0.1,
        )


def test_round_trip_is_stable():
    event = new_event(DataArrived(uri="file:///d.csv", target="y", seed=7), source="/t")
    assert decode(event.encode()).encode() == event.encode()
