"""TLS material for nats-server and its clients: a CA, a server and a client certificate.

Generated with `cryptography` by `cairn nats-config --tls` (services.tools.nats_auth); an existing CA is
kept so the certificates it signed stay valid. `load_or_create_ca` and `issue_cert` are shared
with services.platform.dask_tls (the Dask cluster's CA and member certificate).
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, cast

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec


def write_file(path: Path, data: str | bytes, mode: int = 0o644) -> Path:
    """Write with `mode` from the start: a private key is never readable by others, even briefly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chmod(path, mode)
    return path


class CA(NamedTuple):
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(cn: str) -> x509.Name:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    org = x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cairn")
    return x509.Name([org, x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """Digital signature, plus certificate and CRL signing for a CA."""
    from cryptography import x509

    unused = ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement")
    off = dict.fromkeys((*unused, "encipher_only", "decipher_only"), False)
    return x509.KeyUsage(digital_signature=True, key_cert_sign=ca, crl_sign=ca, **off)


def _builder(
    cn: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, days: int, *, ca: bool
) -> x509.CertificateBuilder:
    """Subject O=cairn/CN=cn, valid from five minutes ago for `days` days, with BasicConstraints."""
    from cryptography import x509

    now = _dt.datetime.now(_dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
    )


def load_or_create_ca(cert_path: Path, key_path: Path, common_name: str, days: int) -> CA:
    """The CA stored at `cert_path`/`key_path`, or a new ECDSA P-256 one valid `days` days, written
    there (key 0600) so the certificates it signs stay valid across runs."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if cert_path.exists() and key_path.exists():
        pem = key_path.read_bytes()
        key = cast("ec.EllipticCurvePrivateKey", serialization.load_pem_private_key(pem, None))
        return CA(x509.load_pem_x509_certificate(cert_path.read_bytes()), key)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(common_name, _name(common_name), key, days, ca=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_file(key_path, _pem_key(key), 0o600)
    write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return CA(cert, key)


def issue_cert(
    ca: CA,
    common_name: str,
    usages: list[x509.ObjectIdentifier],
    days: int,
    sans: list[x509.GeneralName] | None = None,
    *,
    key_usage: bool = False,
) -> tuple[bytes, bytes]:
    """A new ECDSA P-256 leaf certificate signed by `ca`: (certificate PEM, PKCS#8 key PEM).

    `usages` are its extended key usages; `key_usage` adds a critical KeyUsage (digital signature).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    builder = _builder(common_name, ca.cert.subject, key, days, ca=False)
    if key_usage:
        builder = builder.add_extension(_key_usage(ca=False), critical=True)
    builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False).add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def write_tls(folder: Path, days: int = 825, hosts: Sequence[str] = ()) -> list[Path]:
    """A CA, a server certificate for loopback names and a client certificate, all ECDSA P-256.

    An existing CA is kept (certificates it signed stay valid); leaf certificates are reissued.
    `hosts` adds DNS names to the server certificate (e.g. the Kubernetes Service names, and
    `*.<headless service>` for cluster routes); with them the server certificate may also be
    presented as a client, which is what a NATS server does on its routes to the others.
    """
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    folder.mkdir(parents=True, exist_ok=True)
    ca_path, ca_key_path = folder / "ca.pem", folder / "ca-key.pem"
    ca = load_or_create_ca(ca_path, ca_key_path, "cairn CA", days * 2)
    loopback = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", "::1")]
    sans: list[x509.GeneralName] = [*loopback, x509.DNSName("localhost")]
    sans += [x509.DNSName(h) for h in dict.fromkeys(hosts) if h != "localhost"]
    server, client = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
    usages = [server, client] if hosts else [server]
    server_cert, server_key = issue_cert(ca, "cairn nats-server", usages, days, sans)
    client_cert, client_key = issue_cert(ca, "cairn client", [client], days)
    return [
        ca_path,
        ca_key_path,
        write_file(folder / "server-cert.pem", server_cert),
        write_file(folder / "server-key.pem", server_key, 0o600),
        write_file(folder / "client-cert.pem", client_cert),
        write_file(folder / "client-key.pem", client_key, 0o600),
    ]
