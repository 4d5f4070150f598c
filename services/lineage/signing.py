"""Ed25519 sign-off of an audit bundle: the exporter signs with a private key, an auditor verifies
with the public key alone, offline (an HMAC would need the secret to verify, and so let the verifier
forge)."""

from __future__ import annotations

import base64
import os
from pathlib import Path

ALGORITHM = "ed25519"


def keygen(folder: Path) -> tuple[Path, Path]:
    """Write `audit-private.pem` (mode 0600, keep it with the exporter) and `audit-public.pem`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    folder.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private, public = folder / "audit-private.pem", folder / "audit-public.pem"
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, spki))
    return private, public


def public_key_problem(public_pem: bytes) -> str | None:
    """Why these bytes are not an Ed25519 public key a verifier may use, or None when they are."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if b"PRIVATE KEY" in public_pem:
        return "the key given is a private key: verify with the public key (audit-public.pem)"
    try:
        key = serialization.load_pem_public_key(public_pem)
    except ValueError:
        return "the key given is not a PEM public key: verify with the Ed25519 audit-public.pem"
    if not isinstance(key, Ed25519PublicKey):
        return f"the key given is not an Ed25519 public key ({type(key).__name__}); only Ed25519 verifies"
    return None


def private_key_problem(private_pem: bytes) -> str | None:
    """Why these bytes cannot sign a bundle, or None when they are an Ed25519 private key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(private_pem, None)
    except (ValueError, TypeError):
        return "not an unencrypted PEM private key: make one with `cairn audit keygen`"
    if not isinstance(key, Ed25519PrivateKey):
        return "not an Ed25519 private key: make one with `cairn audit keygen`"
    return None


def fingerprint(public_pem: bytes) -> str:
    """SHA-256 of the raw public key, 16 hex: what an auditor compares with the key they were given."""
    import hashlib

    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_public_key(public_pem)
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(private_pem: bytes, message: bytes) -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = serialization.load_pem_private_key(private_pem, None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("the signing key is not an Ed25519 private key (make one with `cairn audit keygen`)")
    return base64.b64encode(key.sign(message)).decode()


def verify(public_pem: bytes, message: bytes, signature: str) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(public_pem)
    except ValueError:
        return False
    if not isinstance(key, Ed25519PublicKey):
        return False
    try:
        key.verify(base64.b64decode(signature), message)
    except (InvalidSignature, ValueError):
        return False
    return True
