"""OpenSSF Model Signing of champion bundles: deployment signs, the inference endpoint verifies.

A hash in an event proves bytes are the ones the event names, not who chose them: someone who can
write the artifact store and publish (or rewrite) a deployment can name any bytes with their right
hash. A signature made with a key only deployment holds closes that gap.

What is signed: a model directory of three files, `bundle.json` (the manifest), `estimator` (the
bytes it names) and `cairn-identity.json`, which model and version they are (name, registry
version, the manifest's sha256; `identity`). Files alone would let anyone able to publish a
deployment or write registry tags serve a genuinely signed bundle as something it is not: an older
version under a higher number (rollback), another model's champion under this name (substitution).
The endpoint never reads the identity it is sent: it rebuilds it from the name and version it is
about to serve them as, so a signature made for another name or version fails. The package's own
command line checks a champion fetched from the store (the identity file is stored too and named
in `model.deployed`), with nothing of cairn installed:

    model_signing verify key DIR --signature SIG --public_key model-signing-public.pem

The signature is a Sigstore bundle from `model_signing`'s key signer, whose keys are elliptic-curve
(P-256/384/521; it takes no Ed25519, so the audit key of `cairn audit keygen` cannot serve). It is
stored in the content-addressed store and named in `model.deployed` (`signature`).

Keys are PEM files: CAIRN_MODEL_SIGNING_KEY (deployment), CAIRN_MODEL_VERIFY_KEY (the endpoint);
unset, the pair `cairn up` makes in the home (`model-signing/`, the private key 0600). With a verify
key the endpoint refuses an unsigned model and one whose signature does not verify, including one
signed before identities were (its signature names no `cairn-identity.json`): deploy it again.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from contracts import ArtifactRef
from services.platform.artifact_policy import ArtifactLocationError, check_artifact_uri
from services.platform.artifacts import ArtifactStore, read_verified, sha256_bytes
from services.platform.settings import CairnSettings

SIGNATURE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
SIGNATURE_SUFFIX = ".sigstore.json"
KEY_DIR = "model-signing"
PRIVATE_NAME, PUBLIC_NAME = "model-signing-private.pem", "model-signing-public.pem"
MODEL_FILES = ("bundle.json", "estimator")  # services.platform.model_loading.MANIFEST_FILE, ESTIMATOR_FILE
IDENTITY_FILE = "cairn-identity.json"
IDENTITY_FORMAT = "cairn.identity.v1"
IDENTITY_MEDIA_TYPE = "application/vnd.cairn.identity+json"


class SignatureRefused(ValueError):
    """Unsigned while a verify key is held, or a signature that does not verify: no retry fixes it."""


class KeyProblem(ValueError):
    """A configured key that is missing or of the wrong kind: a setup error, said at start."""


# Keys -------------------------------------------------------------------------------------------
def home_keys(settings: CairnSettings) -> tuple[Path, Path]:
    folder = settings.home_dir / KEY_DIR
    return folder / PRIVATE_NAME, folder / PUBLIC_NAME


def signing_key(settings: CairnSettings) -> Path | None:
    """CAIRN_MODEL_SIGNING_KEY, else the home's key when `cairn up` made one; None: sign nothing."""
    return _key(settings.model_signing_key, home_keys(settings)[0], "CAIRN_MODEL_SIGNING_KEY", private=True)


def verify_key(settings: CairnSettings) -> Path | None:
    """CAIRN_MODEL_VERIFY_KEY, else the home's public key when `cairn up` made one; None: verify nothing."""
    return _key(settings.model_verify_key, home_keys(settings)[1], "CAIRN_MODEL_VERIFY_KEY", private=False)


def _key(explicit: Path | None, default: Path, variable: str, private: bool) -> Path | None:
    if explicit is None and not default.exists():
        return None
    path = (explicit or default).expanduser()
    if not path.is_file():
        raise KeyProblem(f"{variable} {path} does not exist")
    check_key(path.read_bytes(), private, f"{variable} {path}")
    return path


def check_key(pem: bytes, private: bool, what: str) -> None:
    """An EC key on a curve model_signing takes; said at start instead of at the first deployment."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = (
            serialization.load_pem_private_key(pem, None)
            if private
            else serialization.load_pem_public_key(pem)
        )
    except (ValueError, TypeError) as exc:
        raise KeyProblem(
            f"{what}: not an unencrypted PEM {'private' if private else 'public'} key ({exc})"
        ) from None
    wanted = ec.EllipticCurvePrivateKey if private else ec.EllipticCurvePublicKey
    if not isinstance(key, wanted) or key.curve.name not in {"secp256r1", "secp384r1", "secp521r1"}:
        raise KeyProblem(
            f"{what}: model signing takes an elliptic-curve key (P-256, P-384 or P-521), not "
            f"{type(key).__name__}; make a pair with `cairn serving keygen`"
        )


def keygen(folder: Path) -> tuple[Path, Path]:
    """An EC P-256 pair: `model-signing-private.pem` (0600, for deployment) and the public key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / PRIVATE_NAME, folder / PUBLIC_NAME
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    spki = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write(private, pem, 0o600)  # private first: a public key alone would refuse every deployment
    _write(public, spki, 0o644)
    return private, public


def _write(path: Path, data: bytes, mode: int) -> None:
    """Whole or not at all (temporary name, then rename), created with its mode, never wider."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def ensure_home_keys(settings: CairnSettings) -> Path | None:
    """The home's pair, made once (`cairn up`, `cairn provision`), so a local system signs and verifies
    by default. Nothing when a key is set explicitly: that pair is the operator's (a Secret)."""
    if settings.model_signing_key is not None or settings.model_verify_key is not None:
        return None
    private, public = home_keys(settings)
    if not private.exists():
        keygen(private.parent)
    elif not public.exists():  # a lost public key: derived again from the private one
        from cryptography.hazmat.primitives import serialization

        key = serialization.load_pem_private_key(private.read_bytes(), None)
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        _write(public, key.public_key().public_bytes(serialization.Encoding.PEM, spki), 0o644)
    return public


# Identity -----------------------------------------------------------------------------------------
def identity(model_name: str, version: int, manifest: bytes) -> bytes:
    """The canonical bytes of `cairn-identity.json`: one line of compact JSON, keys sorted.

    Both sides build it from what they know (deployment: the version it registered; the endpoint:
    the name and version it will serve as), so the bytes must follow from those values alone.
    """
    doc = {
        "format": IDENTITY_FORMAT,
        "model_name": model_name,
        "version": version,
        "bundle_sha256": sha256_bytes(manifest),
    }
    return (json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n").encode()


def signed_files(files: Mapping[str, bytes], model_name: str, version: int) -> dict[str, bytes]:
    """The model directory a champion's signature covers: the bundle's two files and its identity."""
    bundle = {name: files[name] for name in MODEL_FILES}
    return {**bundle, IDENTITY_FILE: identity(model_name, version, files[MODEL_FILES[0]])}


# Signing and verifying --------------------------------------------------------------------------
def _layout(files: Mapping[str, bytes], folder: Path) -> Path:
    """The model directory that is signed: exactly these files (plain names), nothing else."""
    model = folder / "model"
    model.mkdir()
    for name, data in files.items():
        if Path(name).name != name or name.startswith("."):
            raise ValueError(f"{name!r}: a model file is a plain name")
        (model / name).write_bytes(data)
    return model


def sign(files: Mapping[str, bytes], private_key: Path) -> bytes:
    """The Sigstore bundle signing these files (ECDSA: a fresh signature each time, all valid)."""
    import model_signing.signing

    with tempfile.TemporaryDirectory(prefix="cairn-sign-") as tmp:
        model, signature = _layout(files, Path(tmp)), Path(tmp) / "model.sig"
        model_signing.signing.Config().use_elliptic_key_signer(private_key=private_key).sign(model, signature)
        return signature.read_bytes()


def verify(files: Mapping[str, bytes], signature: bytes, public_key: Path) -> None:
    """Raises SignatureRefused unless `signature` signs exactly these files with `public_key`'s pair."""
    import model_signing.verifying

    with tempfile.TemporaryDirectory(prefix="cairn-verify-") as tmp:
        model, path = _layout(files, Path(tmp)), Path(tmp) / "model.sig"
        path.write_bytes(signature)
        try:
            model_signing.verifying.Config().use_elliptic_key_verifier(public_key=public_key).verify(
                model, path
            )
        except Exception as exc:  # noqa: BLE001 - any failure to verify is a refusal, said briefly
            raise SignatureRefused(f"signature does not verify: {refusal_reason(exc, files)}") from None


def refusal_reason(exc: Exception, files: Mapping[str, bytes]) -> str:
    """brief(exc), saying so when the identity is what differs: a bundle signed as another model or
    version (rollback, substitution), or one signed before identities were (no identity file)."""
    text = brief(exc)
    if IDENTITY_FILE not in text or IDENTITY_FILE not in files:
        return text
    try:
        expected = json.loads(files[IDENTITY_FILE])
        wanted = f"{expected['model_name']} v{expected['version']}"
    except (ValueError, KeyError, TypeError):
        wanted = "the model served"
    return f"identity mismatch: not signed as {wanted} ({text})"[:500]


def brief(exc: Exception) -> str:
    """model_signing's message without the digests' byte reprs: which files differ, or the key."""
    text = str(exc) or type(exc).__name__
    if "Hash mismatch for" in text:
        names = [part.split("'")[1] for part in text.split("Hash mismatch for ")[1:] if "'" in part]
        text = "Signature mismatch: hash mismatch for " + ", ".join(names)
    elif isinstance(exc, KeyError):
        text = f"not a Sigstore bundle (no {text})"
    return text[:500]


@dataclass(frozen=True)
class Signed:
    """What deployment stored for one champion: the signature and the identity file it covers."""

    signature: ArtifactRef
    identity: ArtifactRef


def sign_bundle(
    files: Mapping[str, bytes], model_name: str, version: int, settings: CairnSettings
) -> Signed | None:
    """Deployment's step, once the registry has given the version: sign the verified bundle files
    with their identity (`signed_files`) and store both; None without a key."""
    key = signing_key(settings)
    if key is None:
        return None
    folder = signed_files(files, model_name, version)
    store = ArtifactStore(settings.artifacts)
    return Signed(
        signature=store.put_bytes(sign(folder, key), SIGNATURE_MEDIA_TYPE, SIGNATURE_SUFFIX),
        identity=store.put_bytes(folder[IDENTITY_FILE], IDENTITY_MEDIA_TYPE, ".json"),
    )


def registry_signature(uri: str, sha256: str) -> ArtifactRef | None:
    """The signature a registry version's tags name (services.platform.tracking); None: it has none usable,
    and with a verify key the champion is then refused as unsigned."""
    if not uri or not re.fullmatch(r"[0-9a-f]{64}", sha256):
        return None
    try:
        return ArtifactRef(uri=uri, sha256=sha256, size=0, media_type=SIGNATURE_MEDIA_TYPE)
    except ValueError:  # pydantic's ValidationError: a URI the contract refuses
        return None


def check(
    files: Mapping[str, bytes],
    signature: ArtifactRef | None,
    public_key: Path | None,
    settings: CairnSettings,
) -> None:
    """The endpoint's rule: with a verify key a model must come signed, and the signature must verify
    on exactly `files` (for a champion: `signed_files`, the identity rebuilt by the endpoint).

    The signature is read only from the store (location-checked) and only with its hash right.
    """
    if public_key is None:
        return
    if signature is None:
        raise SignatureRefused("unsigned: the deployment names no signature and this endpoint verifies them")
    try:
        data = read_verified(check_artifact_uri(signature.uri, settings), signature.sha256)
    except (ArtifactLocationError, FileNotFoundError, OSError, RuntimeError) as exc:
        raise SignatureRefused(f"signature unreadable: {type(exc).__name__}: {exc}"[:500]) from None
    verify(files, data, public_key)


def check_champion(
    files: Mapping[str, bytes],
    model_name: str,
    version: int,
    signature: ArtifactRef | None,
    public_key: Path | None,
    settings: CairnSettings,
) -> None:
    """`check` on the bundle files as model `model_name` version `version`: the identity is the one
    the endpoint is about to serve them as, never one an event or a registry tag supplies."""
    check(signed_files(files, model_name, version), signature, public_key, settings)
