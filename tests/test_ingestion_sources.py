"""Ingestion cannot be turned on its own state or on internal addresses: the source policy against
real files, a real HTTP server on loopback and the machine's own resolver."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from contracts import DataArrived, DataFormat
from services.artifacts import ArtifactStore
from services.ingestion import logic
from services.ingestion.problems import DataProblem
from services.ingestion.sources import read_bytes, resolve_source
from services.settings import CairnSettings

TABLE = b"x,y\n" + b"".join(f"{i},{2 * i}\n".encode() for i in range(40))


def arrival(uri: str, **extra) -> DataArrived:
    return DataArrived(uri=uri, target=extra.pop("target", "y"), **extra)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    (home / "mlflow.db").write_bytes(b"SQLite format 3\x00 secret rows")
    (home / "nats-auth").mkdir()
    (home / "nats-auth" / "passwords.csv").write_text("user,password\nadmin,hunter2\n")
    return home


def test_home_is_never_readable_even_when_the_roots_allow_everything(home: Path) -> None:
    s = CairnSettings(home=home, allowed_roots=["/"])
    for secret in (home / "mlflow.db", home / "nats-auth" / "passwords.csv"):
        with pytest.raises(DataProblem, match="cairn's own state"):
            resolve_source(arrival(secret.as_uri(), format=DataFormat.csv), s)
    sneaky = home.parent / "data" / "link.csv"
    sneaky.parent.mkdir()
    sneaky.symlink_to(home / "nats-auth" / "passwords.csv")
    with pytest.raises(DataProblem, match="cairn's own state"):
        resolve_source(arrival(sneaky.as_uri()), s)


def test_landing_area_is_readable_outside_the_roots(home: Path, tmp_path: Path) -> None:
    s = CairnSettings(home=home, allowed_roots=[str(tmp_path / "nowhere")])
    user_file = tmp_path / "elsewhere" / "houses.csv"
    user_file.parent.mkdir()
    user_file.write_bytes(TABLE)
    ref = ArtifactStore(s.artifacts).put_file(user_file, "text/csv")
    source = resolve_source(arrival(ref.uri), s)
    assert read_bytes(source, s) == TABLE
    assert ref.uri.endswith("/houses.csv") and f"/landing/sha256/{ref.sha256[:2]}/{ref.sha256}/" in ref.uri
    with pytest.raises(DataProblem, match="outside the allowed roots"):
        resolve_source(arrival(user_file.as_uri()), s)  # --no-upload: the roots still apply
    other_artifact = ArtifactStore(s.artifacts).put_bytes(TABLE, "text/csv", ".csv")
    with pytest.raises(DataProblem):
        resolve_source(arrival(other_artifact.uri), s)  # the store outside the landing area is not data


def test_remote_roots_are_judged_after_percent_decoding(home: Path) -> None:
    s = CairnSettings(home=home, allowed_schemes=["s3"], allowed_roots=["s3://bucket/data"])
    assert resolve_source(arrival("s3://bucket/data/ok.csv"), s).uri == "s3://bucket/data/ok.csv"
    for uri in (
        "s3://bucket/data/%2e%2e/secret/x.csv",
        "s3://bucket/data/%2E%2E/secret/x.csv",
        "s3://bucket/data-evil/x.csv",
        "s3://bucket/dat%61-evil/x.csv",
    ):
        with pytest.raises(DataProblem, match="outside the allowed roots"):
            resolve_source(arrival(uri), s)
    with pytest.raises(DataProblem, match="control character"):
        resolve_source(arrival("s3://bucket/data/a%00.csv"), s)


def test_host_names_are_judged_by_the_addresses_they_resolve_to(home: Path) -> None:
    name = socket.gethostname()
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(name, 80)}
    except OSError:
        pytest.skip("this machine's own name does not resolve")
    import ipaddress

    if any(ipaddress.ip_address(a.split("%")[0]).is_global for a in addresses):
        pytest.skip("this machine's name resolves to a public address")
    s = CairnSettings(home=home, allowed_schemes=["http"], allowed_roots=[f"http://{name}"])
    with pytest.raises(DataProblem, match="not a public address"):
        resolve_source(arrival(f"http://{name}/data.csv"), s)
    s = CairnSettings(home=home, allowed_schemes=["http"], allowed_roots=["http://169.254.169.254"])
    with pytest.raises(DataProblem, match="not a public address"):
        resolve_source(arrival("http://169.254.169.254/latest/meta-data.csv"), s)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        if self.path == "/redirect.csv":
            self.send_response(302)
            self.send_header("Location", "/internal/secret.csv")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(TABLE)))
        self.end_headers()
        self.wfile.write(TABLE)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join(5)


def test_redirects_are_refused_not_followed(home: Path, http_server: str) -> None:
    s = CairnSettings(
        home=home, allowed_schemes=["http"], allowed_roots=[http_server], allow_private_hosts=True
    )
    assert read_bytes(resolve_source(arrival(f"{http_server}/data.csv"), s), s) == TABLE
    with pytest.raises(DataProblem, match="redirects are not followed"):
        read_bytes(resolve_source(arrival(f"{http_server}/redirect.csv"), s), s)
    strict = CairnSettings(home=home, allowed_schemes=["http"], allowed_roots=[http_server])
    with pytest.raises(DataProblem, match="not a public address"):
        resolve_source(arrival(f"{http_server}/data.csv"), strict)


def test_a_rejection_never_echoes_a_file_that_is_not_data(tmp_path: Path, home: Path) -> None:
    s = CairnSettings(home=home, allowed_roots=[str(tmp_path)])
    secret = tmp_path / "notes.txt"
    secret.write_text("API_TOKEN=hunter2-very-secret\nDB_PASSWORD=swordfish\n" * 20)
    event = arrival(secret.as_uri(), format=DataFormat.csv, target="price")
    with pytest.raises(DataProblem) as caught:
        raw = read_bytes(resolve_source(event, s), s)
        logic.validate(logic.parse(raw, DataFormat.csv, s), event, s)
    text = caught.value.reason + " ".join(caught.value.problems)
    assert "hunter2" not in text and "swordfish" not in text and "API_TOKEN" not in text
    binary = tmp_path / "blob.csv"
    binary.write_bytes(b'"unterminated, hunter2\n' + b"x" * 50)
    with pytest.raises(DataProblem) as caught:
        logic.parse(binary.read_bytes(), DataFormat.csv, s)
    assert "hunter2" not in caught.value.reason
