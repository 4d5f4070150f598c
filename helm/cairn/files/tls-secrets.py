"""The chart's TLS hook (templates/tls/hook.yaml): certificates from `cairn nats-config --tls` and
`cairn dask-tls`, and the model-signing pair from `cairn serving keygen`, stored in Secrets. Runs in
the cairn image, pre-install and pre-upgrade.

Idempotent: when every Secret it keeps already holds a complete set whose certificates are
valid for more than --renew-days, signed by the CA it keeps, and (NATS) names every --nats-host,
it changes nothing. Otherwise it seeds the work folder with the CA it keeps (so the commands keep
it: services.platform.tls.load_or_create_ca) and reissues the leaves; --rotate-ca starts from a new CA.

The model-signing pair (--model-signing-secret: private.pem, public.pem) is made once, when the
Secret holds no private key, and never replaced after: a new key would make every champion signed
with the old one fail to verify. Only --rotate-model-signing makes a new pair. A public.pem that is
missing or not the private key's is derived again from private.pem (the key itself is unchanged); a
private.pem that is not a usable EC key fails the run instead of being replaced.

Talks to the API server with the pod's ServiceAccount token (standard library only), and only
through get, create and patch of the Secrets named on the command line.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

SA = Path(os.environ.get("CAIRN_TLS_HOOK_SA_DIR", "/var/run/secrets/kubernetes.io/serviceaccount"))
KEYS = ("ca.crt", "tls.crt", "tls.key")
SIGNING_CURVES = {"secp256r1", "secp384r1", "secp521r1"}  # what model_signing's key signer takes


class Api:
    def __init__(self, namespace: str) -> None:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
        self.base = os.environ.get("CAIRN_TLS_HOOK_API") or f"https://{host}:{port}"
        self.path = f"/api/v1/namespaces/{namespace}/secrets"
        self.token = (SA / "token").read_text().strip()
        self.ctx = ssl.create_default_context(cafile=str(SA / "ca.crt")) if (SA / "ca.crt").exists() else None

    def call(self, method: str, path: str, body: dict | None = None, ctype: str = "application/json") -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", ctype)
        with urllib.request.urlopen(req, context=self.ctx, timeout=30) as resp:
            return json.loads(resp.read() or b"{}")

    def get(self, name: str) -> dict[str, bytes] | None:
        try:
            secret = self.call("GET", f"{self.path}/{name}")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise
        return {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}

    def put(self, name: str, data: dict[str, bytes], labels: dict[str, str], exists: bool) -> None:
        encoded = {k: base64.b64encode(v).decode() for k, v in data.items()}
        if exists:  # a merge patch: keys of this set only, nothing else of the Secret changes
            body = {"metadata": {"labels": labels}, "data": encoded}
            self.call("PATCH", f"{self.path}/{name}", body, "application/merge-patch+json")
        else:
            body = {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": name, "labels": labels},
                "type": "Opaque",
                "data": encoded,
            }
            self.call("POST", self.path, body)
        print(f"secret/{name} {'updated' if exists else 'created'}: {', '.join(sorted(data))}")


def _cert(pem: bytes):  # noqa: ANN202 - cryptography is imported lazily
    from cryptography import x509

    return x509.load_pem_x509_certificate(pem)


def _fresh(pem: bytes | None, ca_pem: bytes | None, renew_days: int, hosts: list[str] | None = None) -> bool:
    """A certificate valid for more than renew_days, issued by this CA, naming every host."""
    if not pem or not ca_pem:
        return False
    from cryptography import x509

    try:
        cert, ca = _cert(pem), _cert(ca_pem)
    except ValueError:
        return False
    left = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    if left < dt.timedelta(days=renew_days) or cert.issuer != ca.subject:
        return False
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:  # noqa: BLE001 - a signature that does not verify, whatever the error: reissue
        return False
    if hosts:
        try:
            names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return False
        if not set(hosts) <= set(names.get_values_for_type(x509.DNSName)):
            return False
    return True


def _complete(secret: dict[str, bytes] | None) -> bool:
    return bool(secret) and all(secret.get(k) for k in KEYS)


def _public_of(private_pem: bytes) -> bytes:
    """The SubjectPublicKeyInfo PEM of a model-signing private key; ValueError if it is not one."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_private_key(private_pem, None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in SIGNING_CURVES:
        raise ValueError(f"{type(key).__name__} is not an EC P-256/384/521 key")
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(serialization.Encoding.PEM, spki)


def _same_public(pem: bytes | None, expected: bytes) -> bool:
    from cryptography.hazmat.primitives import serialization

    if not pem:
        return False
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError):
        return False
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_bytes(serialization.Encoding.PEM, spki) == expected


def model_signing(api: Api, name: str, rotate: bool, cairn: str, labels: dict[str, str], work: Path) -> None:
    """The model-signing pair in Secret `name`: made once, then kept (see the module's docstring)."""
    current = api.get(name)
    private = (current or {}).get("private.pem")
    if private and not rotate:
        try:
            public = _public_of(private)
        except ValueError as exc:
            raise SystemExit(
                f"secret/{name}: private.pem is {exc}; it is not replaced on its own (a new key fails "
                "every champion signed with the old one): delete the Secret or set modelSigning.rotate=true"
            ) from None
        if _same_public(current.get("public.pem"), public):
            print(f"secret/{name}: kept (private.pem and its public.pem)")
        else:
            api.put(name, {"public.pem": public}, labels, exists=True)  # derived: the key is the same
        return
    folder = work / "model-signing"
    subprocess.run([cairn, "serving", "keygen", "--out", str(folder)], check=True)
    pair = {
        "private.pem": (folder / "model-signing-private.pem").read_bytes(),
        "public.pem": (folder / "model-signing-public.pem").read_bytes(),
    }
    shutil.rmtree(folder)
    api.put(name, pair, labels, exists=current is not None)
    if private:
        print(f"secret/{name}: a new pair (modelSigning.rotate): champions signed before no longer verify")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--namespace", required=True)
    p.add_argument("--ca-secret", help="keeps the CAs (and their keys): read by this hook only")
    p.add_argument("--nats-secret", help="the NATS server's certificate: ca.crt, tls.crt, tls.key")
    p.add_argument("--nats-client-secret", help="the NATS clients' certificate: ca.crt, tls.crt, tls.key")
    p.add_argument("--nats-host", action="append", default=[], help="a DNS name of the NATS server")
    p.add_argument("--dask-secret", help="the Dask members' certificate: ca.crt, tls.crt, tls.key")
    p.add_argument("--renew-days", type=int, default=30)
    p.add_argument("--rotate-ca", action="store_true")
    p.add_argument("--model-signing-secret", help="the model-signing pair: private.pem, public.pem")
    p.add_argument("--rotate-model-signing", action="store_true", help="a new pair even if one exists")
    p.add_argument("--label", action="append", default=[], help="key=value, put on every Secret")
    p.add_argument("--cairn", default="cairn", help="the cairn command")
    a = p.parse_args(argv)
    if (a.nats_secret or a.dask_secret) and not a.ca_secret:
        p.error("--nats-secret and --dask-secret need --ca-secret")
    labels = dict(item.split("=", 1) for item in a.label)
    api = Api(a.namespace)

    ca_secret = api.get(a.ca_secret) if a.ca_secret else None
    ca = dict(ca_secret or {})
    if a.rotate_ca:
        ca = {}
    work = Path(tempfile.mkdtemp(prefix="cairn-tls-"))
    out: dict[str, dict[str, bytes]] = {}

    if a.nats_secret and a.nats_client_secret:
        server, client = api.get(a.nats_secret), api.get(a.nats_client_secret)
        ca_pem = ca.get("nats-ca.crt")
        keep = (
            ca.get("nats-ca.key")
            and _complete(server)
            and _complete(client)
            and server["ca.crt"] == client["ca.crt"] == ca_pem
            and _fresh(server["tls.crt"], ca_pem, a.renew_days, a.nats_host)
            and _fresh(client["tls.crt"], ca_pem, a.renew_days)
        )
        if keep:
            print(f"secret/{a.nats_secret}, secret/{a.nats_client_secret}: kept (complete, valid, same CA)")
        else:
            folder = work / "nats"
            if ca.get("nats-ca.crt") and ca.get("nats-ca.key"):  # kept: what it signed stays valid
                (folder / "tls").mkdir(parents=True)
                (folder / "tls" / "ca.pem").write_bytes(ca["nats-ca.crt"])
                (folder / "tls" / "ca-key.pem").write_bytes(ca["nats-ca.key"])
                os.chmod(folder / "tls" / "ca-key.pem", 0o600)
            hosts = [arg for h in a.nats_host for arg in ("--host", h)]
            subprocess.run([a.cairn, "nats-config", "--tls", "--out", str(folder), *hosts], check=True)
            tls = folder / "tls"
            read = lambda name: (tls / name).read_bytes()  # noqa: E731
            ca |= {"nats-ca.crt": read("ca.pem"), "nats-ca.key": read("ca-key.pem")}
            out[a.nats_secret] = {
                "ca.crt": read("ca.pem"),
                "tls.crt": read("server-cert.pem"),
                "tls.key": read("server-key.pem"),
            }
            out[a.nats_client_secret] = {
                "ca.crt": read("ca.pem"),
                "tls.crt": read("client-cert.pem"),
                "tls.key": read("client-key.pem"),
            }

    if a.dask_secret:
        member = api.get(a.dask_secret)
        ca_pem = ca.get("dask-ca.crt")
        keep = (
            ca.get("dask-ca.key")
            and _complete(member)
            and member["ca.crt"] == ca_pem
            and _fresh(member["tls.crt"], ca_pem, a.renew_days)
        )
        if keep:
            print(f"secret/{a.dask_secret}: kept (complete, valid, same CA)")
        else:
            folder = work / "dask"
            if ca.get("dask-ca.crt") and ca.get("dask-ca.key"):
                folder.mkdir(parents=True)
                (folder / "ca.crt").write_bytes(ca["dask-ca.crt"])
                (folder / "ca.key").write_bytes(ca["dask-ca.key"])
                os.chmod(folder / "ca.key", 0o600)
            subprocess.run([a.cairn, "dask-tls", "--out", str(folder)], check=True)
            read = lambda name: (folder / name).read_bytes()  # noqa: E731
            ca |= {"dask-ca.crt": read("ca.crt"), "dask-ca.key": read("ca.key")}
            out[a.dask_secret] = {k: read(k) for k in KEYS}

    if out:
        # The CAs first: a run that stops half-way leaves the CA the next run keeps.
        if ca != (ca_secret or {}):
            api.put(a.ca_secret, ca, labels, exists=ca_secret is not None)
        for name, data in out.items():
            api.put(name, data, labels, exists=api.get(name) is not None)

    if a.model_signing_secret:
        model_signing(api, a.model_signing_secret, a.rotate_model_signing, a.cairn, labels, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
