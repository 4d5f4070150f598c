"""Ingestion cannot be turned on its own state or on internal addresses: the source policy against
real files, a real HTTP server on loopback and the machine's own resolver."""

from __future__ import annotations

import contextlib
import http.server
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from contracts import DataArrived, DataFormat
from services.ingestion import logic
from services.ingestion.problems import DataProblem
from services.ingestion.sources import read_bytes, resolve_source
from services.platform.artifacts import ArtifactStore
from services.platform.settings import CairnSettings
from tests.conftest import missing_system_dependency

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


def test_internal_addresses_are_refused_in_every_form_a_resolver_can_answer(home: Path) -> None:
    """A hostile resolver answers IPv6 forms that carry an internal IPv4 (mapped, NAT64, 6to4,
    IPv4-compatible); an allowed network admits itself and nothing around it."""
    import ipaddress

    from services.ingestion.sources import refuse_internal_addresses

    s = CairnSettings(home=home, allowed_host_networks=["10.20.0.0/16"])
    for answer in (
        "::ffff:127.0.0.1",
        "64:ff9b::a9fe:a9fe",
        "2002:7f00:1::",
        "::127.0.0.1",
        "169.254.169.254",
        "10.21.0.1",
        "0.0.0.0",
        "::",
    ):
        with pytest.raises(DataProblem, match="not a public address"):
            refuse_internal_addresses("h", [ipaddress.ip_address(answer)], s)
        with pytest.raises(DataProblem, match="not a public address"):  # one bad answer among good ones
            refuse_internal_addresses("h", [ipaddress.ip_address("8.8.8.8"), ipaddress.ip_address(answer)], s)
    for answer in ("8.8.8.8", "::ffff:8.8.8.8", "2606:4700::1111", "10.20.3.4"):
        refuse_internal_addresses("h", [ipaddress.ip_address(answer)], s)


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


class _Recording(http.server.ThreadingHTTPServer):
    """A server that counts the connections it accepts and keeps the Host headers and TLS server
    names it was sent: the forbidden address must see no connection at all."""

    def __init__(self, address: tuple[str, int], body: bytes, tls: ssl.SSLContext | None = None):
        self.connections, self.hosts, self.server_names = 0, [], []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                server.hosts.append(self.headers["Host"])
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(address, Handler)
        if tls is not None:
            tls.sni_callback = lambda sock, name, ctx: server.server_names.append(name)
            self.socket = tls.wrap_socket(self.socket, server_side=True)

    def verify_request(self, request: object, client_address: object) -> bool:
        self.connections += 1
        return True


@contextlib.contextmanager
def checked_and_forbidden(
    tls: Callable[[], ssl.SSLContext] | None = None,
) -> Iterator[tuple[_Recording, _Recording]]:
    """The data on 127.0.0.1 (the address the check admits) and a decoy on 127.0.0.2, same port:
    the answer a rebinding resolver gives the second time it is asked."""
    good = _Recording(("127.0.0.1", 0), TABLE, tls() if tls else None)
    port = good.server_address[1]
    try:
        bad = _Recording(("127.0.0.2", port), b"secret,rows\n1,2\n", tls() if tls else None)
    except OSError as exc:
        good.server_close()
        missing_system_dependency(f"127.0.0.2:{port} cannot be bound here (Linux routes all of 127/8): {exc}")
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (good, bad)]
    for thread in threads:
        thread.start()
    try:
        yield good, bad
    finally:
        for server, thread in zip((good, bad), threads, strict=True):
            server.shutdown()
            server.server_close()
            thread.join(5)


def rebinding_resolver(monkeypatch: pytest.MonkeyPatch, name: str, answers: list[str]) -> list[str]:
    """The attacker's DNS: `name` resolves to answers[0] the first time, answers[1] ever after (other
    names resolve as usual). Installed as the process's resolver, which both the check and any
    library that connects by name use. Returns the answers it gave, in order."""
    real, given = socket.getaddrinfo, []

    def getaddrinfo(host, port, *args, **kwargs):  # noqa: ANN001, ANN202 - socket.getaddrinfo's shape
        if host != name:
            return real(host, port, *args, **kwargs)
        given.append(answers[min(len(given), len(answers) - 1)])
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (given[-1], port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return given


NAME = "data.example.test"


def test_the_fetch_connects_to_the_address_that_was_checked(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with checked_and_forbidden() as (good, bad):
        port = good.server_address[1]
        s = CairnSettings(
            home=home,
            allowed_schemes=["http"],
            allowed_roots=[f"http://{NAME}:{port}"],
            allowed_host_networks=["127.0.0.1/32"],
        )
        # The decoy's address is refused when it is the answer the check sees.
        rebinding_resolver(monkeypatch, NAME, ["127.0.0.2"])
        with pytest.raises(DataProblem, match="127.0.0.2, not a public address"):
            resolve_source(arrival(f"http://{NAME}:{port}/data.csv"), s)

        given = rebinding_resolver(monkeypatch, NAME, ["127.0.0.1", "127.0.0.2"])
        source = resolve_source(arrival(f"http://{NAME}:{port}/data.csv"), s)
        # A proxy would look the name up itself, unchecked: the fetch goes direct.
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.2:{port}")
        monkeypatch.setenv("ALL_PROXY", f"http://127.0.0.2:{port}")
        assert read_bytes(source, s) == TABLE
        assert bad.connections == 0, "the fetch reached the address the check never saw"
        assert given == ["127.0.0.1"], "the name was looked up again between check and fetch"
        assert good.hosts == [f"{NAME}:{port}"], "the server is asked for the host the URL names"


def test_https_connects_to_the_checked_address_and_still_verifies_the_host_name(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from services.platform.tls import issue_cert, load_or_create_ca, write_file

    ca = load_or_create_ca(tmp_path / "ca.pem", tmp_path / "ca-key.pem", "test CA", 2)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))

    def server_tls(dns_name: str) -> Callable[[], ssl.SSLContext]:
        cert, key = issue_cert(ca, dns_name, [ExtendedKeyUsageOID.SERVER_AUTH], 2, [x509.DNSName(dns_name)])
        cert_path = write_file(tmp_path / f"{dns_name}.pem", cert)
        key_path = write_file(tmp_path / f"{dns_name}-key.pem", key, 0o600)

        def context() -> ssl.SSLContext:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(cert_path, key_path)
            return ctx

        return context

    with checked_and_forbidden(server_tls(NAME)) as (good, bad):
        port = good.server_address[1]
        s = CairnSettings(
            home=home,
            allowed_schemes=["https"],
            allowed_roots=[f"https://{NAME}:{port}"],
            allowed_host_networks=["127.0.0.1/32"],
        )
        given = rebinding_resolver(monkeypatch, NAME, ["127.0.0.1", "127.0.0.2"])
        source = resolve_source(arrival(f"https://{NAME}:{port}/data.csv"), s)
        assert read_bytes(source, s) == TABLE
        assert bad.connections == 0 and given == ["127.0.0.1"]
        assert good.server_names == [NAME], "SNI names the host, not the address"
        assert good.hosts == [f"{NAME}:{port}"]

    # Pinning keeps verification: a certificate that does not name the host is refused.
    with checked_and_forbidden(server_tls("other.example.test")) as (good, bad):
        port = good.server_address[1]
        s = CairnSettings(
            home=home,
            allowed_schemes=["https"],
            allowed_roots=[f"https://{NAME}:{port}"],
            allowed_host_networks=["127.0.0.1/32"],
        )
        rebinding_resolver(monkeypatch, NAME, ["127.0.0.1", "127.0.0.2"])
        source = resolve_source(arrival(f"https://{NAME}:{port}/data.csv"), s)
        with pytest.raises(DataProblem, match="cannot be read"):
            read_bytes(source, s)
        assert bad.connections == 0 and good.hosts == []


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
