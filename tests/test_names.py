"""Contracts own every bus name: services spell no event type, subject, stream filter or DLQ token.

Each payload class declares its type, producer and whether it ends a run (contracts/events.py);
services reach them through `contracts` (`X.EVENT_TYPE`, `subject_for`, `stream_filter`,
`is_dead_letter`, `ends_run`, ...). MLflow tags and file formats such as `cairn.model.v1` are not
bus names and stay where they are.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from contracts import (
    ANY_SERVICE,
    ENDPOINT,
    PAYLOADS,
    PRODUCERS,
    TERMINAL_TYPES,
    TYPES,
    UPSTREAM,
    DataRejected,
    DeploymentFailed,
    EventRejected,
    ModelDeployed,
    ends_run,
    is_dead_letter,
    stream_filter,
    type_ends_run,
)
from contracts.subjects import ROOT, dead_letter_subject, replay_namespace
from services.tools.catalog import SERVICES

SERVICES_DIR = Path(__file__).resolve().parents[1] / "services"
# The command line (cli.py, its cli/ package and client.py) and the demo still spell names while
# they move to contracts; drop each entry as it is fixed.
PENDING: tuple[str, ...] = ()


def bus_name(text: str) -> bool:
    """A literal that names the bus: an event type or a prefix of one, `cairn.>`, a replay or DLQ subject."""
    if ".dlq" in text or text.startswith(f"{ROOT}.replay") or text == stream_filter():
        return True
    return text.startswith(ROOT + ".") and any(t.startswith(text) or text.startswith(t) for t in TYPES)


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def bus_literals(source: str) -> list[tuple[int, str]]:
    tree = ast.parse(source)
    skip = _docstrings(tree)
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in skip
        and bus_name(node.value)
    ]


def test_the_detector_finds_what_it_must() -> None:
    src = (
        '"""Docs may say cairn.model.deployed.v1."""\n'
        'a = "cairn.model.deployed.v1"\nb = "cairn.>"\nc = ".dlq." in s\n'
        "d = f'cairn.replay.{rid}'\ne = s.removeprefix('cairn.')\n"
        'ok = ("cairn.model.v1", "cairn.model_sha256", "cairn.kind", "cairn.event_id", "cairn")\n'
    )
    assert [line for line, _ in bus_literals(src)] == [2, 3, 4, 5, 6]


def test_services_spell_no_bus_names() -> None:
    found = []
    for path in sorted(SERVICES_DIR.rglob("*.py")):
        if path.relative_to(SERVICES_DIR).as_posix().startswith(PENDING):
            continue
        found += [f"{path.relative_to(SERVICES_DIR)}:{n}: {v!r}" for n, v in bus_literals(path.read_text())]
    assert found == [], "use the names in contracts instead:\n" + "\n".join(found)


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: p.__name__)
def test_every_event_declares_its_producer(payload: type) -> None:
    assert "EVENT_TYPE" in vars(payload) and "PRODUCER" in vars(payload), payload.__name__
    assert payload.PRODUCER in {*SERVICES, UPSTREAM, ANY_SERVICE, ENDPOINT}
    assert PRODUCERS[payload.EVENT_TYPE] == payload.PRODUCER
    assert isinstance(getattr(payload, "ENDS_RUN", False), bool)


def test_producers_and_terminal_types_cover_the_models() -> None:
    assert set(PRODUCERS) == set(TYPES)
    ending = (ModelDeployed, DataRejected, EventRejected, DeploymentFailed)
    assert {p.EVENT_TYPE for p in ending} == TERMINAL_TYPES
    assert set(TYPES) >= TERMINAL_TYPES


def test_a_failed_gate_ends_a_run_and_a_passed_one_does_not() -> None:
    evaluated = "cairn.model.evaluated.v1"
    assert type_ends_run(evaluated, passed=False) and type_ends_run(evaluated, passed=None)
    assert not type_ends_run(evaluated, passed=True)
    assert not type_ends_run("cairn.model.trained.v1")
    assert all(type_ends_run(t) for t in TERMINAL_TYPES)

    class Event:  # ends_run reads only type and data.passed
        def __init__(self, type_: str, passed: bool | None = None) -> None:
            self.type = type_
            self.data = type("Data", (), {"passed": passed})() if passed is not None else object()

    assert ends_run(Event(evaluated, False)) and not ends_run(Event(evaluated, True))  # type: ignore[arg-type]
    assert ends_run(Event("cairn.model.deployed.v1"))  # type: ignore[arg-type]


def test_subject_helpers() -> None:
    assert stream_filter() == "cairn.>" and stream_filter("cairn.replay.x") == "cairn.replay.x.>"
    assert is_dead_letter(dead_letter_subject("ingestion"))
    assert is_dead_letter(dead_letter_subject("ingestion", replay_namespace("ab12")))
    assert not is_dead_letter("cairn.data.arrived.v1")
    assert replay_namespace("ab12") == "cairn.replay.ab12"


def test_every_routed_durable_carries_its_event_version(tmp_path) -> None:
    """docs/CONTRACTS.md: a v1 and a v2 route are two consumers, never one re-pointed durable."""
    from services.platform.bus.consumer import durable_name
    from services.platform.settings import CairnSettings
    from services.tools.catalog import build_service

    settings = CairnSettings(home=tmp_path)
    for name in SERVICES:
        for route in build_service(name, settings).routes():
            version = route.payload_cls.EVENT_TYPE.rsplit(".", 1)[1]
            assert durable_name(name, route.payload_cls, ROOT).endswith(f"-{version}"), (name, route)
