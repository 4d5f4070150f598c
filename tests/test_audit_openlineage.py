"""OpenLineage through its own client: each way a user configures the openlineage-python client
(CAIRN_OPENLINEAGE_URL, OPENLINEAGE_URL, an openlineage.yml named by OPENLINEAGE_CONFIG) delivers
the run events, over a real HTTP server or into a file, and what arrives is valid against the
OpenLineage schemas. The end-to-end emission from a running lineage service is checked in
tests/test_lineage.py."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from contracts import DataArrived, DataRejected, new_event
from services.lineage.openlineage import OpenLineageSink, make_client, run_events
from services.lineage.store import GENESIS, make_record

OPENLINEAGE = Path(__file__).resolve().parent / "openlineage"
FACETS = {
    "version": "DatasetVersionDatasetFacet.json",
    "jobType": "JobTypeJobFacet.json",
    "errorMessage": "ErrorMessageRunFacet.json",
    "tags": "TagsRunFacet.json",
}


def validate(event: dict) -> None:
    registry = Registry().with_resources(
        (doc["$id"], Resource.from_contents(doc))
        for doc in (json.loads(p.read_text()) for p in OPENLINEAGE.glob("*.json"))
    )
    Draft202012Validator(
        json.loads((OPENLINEAGE / "OpenLineage.json").read_text()), registry=registry
    ).validate(event)
    groups = [event["job"].get("facets", {}), event["run"].get("facets", {})]
    groups += [d.get("facets", {}) for d in event["inputs"] + event["outputs"]]
    for group in groups:
        for name, facet in group.items():
            schema = json.loads((OPENLINEAGE / FACETS[name]).read_text())
            Draft202012Validator(schema, registry=registry).validate({name: facet})


def a_failed_step() -> list:
    """A data-arrived event and the rejection it caused, as the lineage store records them."""
    arrived = new_event(DataArrived(uri="file:///data/t.csv", target="y"), source="/test")
    rejected = new_event(
        DataRejected(uri="file:///data/t.csv", reason="no column y"), source="/t", cause=arrived
    )
    cause = make_record(1, arrived.type, arrived.encode(), GENESIS)
    output = make_record(2, rejected.type, rejected.encode(), cause.hash)
    return run_events(output, cause)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No OpenLineage configuration from the machine: no variables, no ~/.openlineage, another cwd."""
    for name in ("OPENLINEAGE_URL", "OPENLINEAGE_CONFIG", "OPENLINEAGE_DISABLED", "OPENLINEAGE_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def receiver():
    """A real HTTP server that keeps what is POSTed to it, as Marquez's /api/v1/lineage would."""
    received: list[tuple[str, dict]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, json.loads(body)))
            self.send_response(201)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", received
    server.shutdown()
    server.server_close()


def emit(client) -> None:
    sink = OpenLineageSink(client)
    sink.emit(a_failed_step())
    sink.close()


def check(events: list[dict]) -> None:
    assert [e["eventType"] for e in events] == ["START", "FAIL"]
    assert events[1]["run"]["facets"]["errorMessage"]["message"] == "no column y"
    assert events[0]["job"] == {**events[0]["job"], "namespace": "cairn", "name": "ingestion"}
    for event in events:
        validate(event)


def test_nothing_configured_emits_nothing(clean_env: Path) -> None:
    assert make_client(None) is None


def test_cairn_openlineage_url_file_and_http(clean_env: Path, receiver) -> None:
    path = clean_env / "ol" / "events.jsonl"
    emit(make_client(f"file://{path}"))
    check([json.loads(line) for line in path.read_text().splitlines()])

    url, received = receiver
    emit(make_client(f"{url}/api/v1/lineage"))
    assert {p for p, _ in received} == {"/api/v1/lineage"}
    check([e for _, e in received])


def test_the_clients_own_configuration(clean_env: Path, receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    url, received = receiver
    monkeypatch.setenv("OPENLINEAGE_URL", url)  # how a Marquez user points every integration
    emit(make_client(None))
    assert {p for p, _ in received} == {"/api/v1/lineage"}
    check([e for _, e in received])

    monkeypatch.delenv("OPENLINEAGE_URL")
    path = clean_env / "from-yml.jsonl"
    config = clean_env / "openlineage.yml"
    config.write_text(f"transport:\n  type: file\n  log_file_path: {path}\n  append: true\n")
    monkeypatch.setenv("OPENLINEAGE_CONFIG", str(config))
    emit(make_client(None))
    check([json.loads(line) for line in path.read_text().splitlines()])
