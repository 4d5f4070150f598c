"""The auditor's check cannot be chosen by what is checked: attacks on an exported audit bundle and on
the archive, each played through the `cairn` executable an auditor runs, in a fresh home with nothing
of the system beside it."""

from __future__ import annotations

import hmac
import json
import subprocess
import sys
from pathlib import Path

import pytest

from services.lineage import signing
from services.lineage.archive import Archive, MissingKey, history
from services.lineage.audit import export_bundle, verify_bundle
from services.lineage.store import GENESIS, make_record

CAIRN = str(Path(sys.executable).with_name("cairn"))


def _records(n: int, tag: str = "x"):
    out, prev = [], GENESIS
    for seq in range(1, n + 1):
        body = json.dumps({"type": f"cairn.{tag}.v1", "id": f"{tag}-{seq}", "n": seq}).encode()
        record = make_record(seq, f"cairn.{tag}.v1", body, prev)
        out.append(record)
        prev = record.hash
    return out


def _auditor(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "CAIRN_HOME": str(home)}
    return subprocess.run([CAIRN, "audit", *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture()
def signed(tmp_path: Path) -> tuple[Path, Path, Path]:
    """An honest bundle of 8 records signed with a fresh key pair: (bundle, private, public)."""
    private, public = signing.keygen(tmp_path / "keys")
    bundle = tmp_path / "honest.jsonl"
    export_bundle(_records(8), bundle, "CAIRN", private.read_bytes())
    return bundle, private, public


def _lines(bundle: Path) -> tuple[dict, list[str]]:
    lines = bundle.read_text().splitlines()
    return json.loads(lines[0]), lines[1:]


def _write(path: Path, header: dict, lines: list[str]) -> Path:
    path.write_text("\n".join([json.dumps(header, sort_keys=True), *lines]) + "\n")
    return path


def test_the_honest_bundle_verifies_with_the_public_key_and_names_it(signed, tmp_path: Path) -> None:
    bundle, _, public = signed
    ok = _auditor(tmp_path / "home", "verify", "--bundle", str(bundle), "--key", str(public))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"signed by Ed25519 key {signing.fingerprint(public.read_bytes())}" in ok.stdout


def test_a_record_dropped_and_an_hmac_keyed_with_the_public_key_is_refused(signed, tmp_path: Path) -> None:
    """The forgery that verified OK before: the header's `signature` removed, a sign-off computed as an
    HMAC keyed with the public key's bytes (which anyone holds) over a shortened chain."""
    bundle, _, public = signed
    header, lines = _lines(bundle)
    kept = lines[:-1]  # the last record (say, a deployment nobody should know of) is dropped
    head = json.loads(kept[-1])["hash"]
    forged_header = {k: v for k, v in header.items() if k != "signature"}
    forged_header.update(head=head, records=len(kept))
    signoff = hmac.new(public.read_bytes(), f"{head}|{len(kept)}".encode(), "sha256")
    forged_header["signoff"] = signoff.hexdigest()
    forged = _write(tmp_path / "forged.jsonl", forged_header, kept)

    refused = _auditor(tmp_path / "home", "verify", "--bundle", str(forged), "--key", str(public))
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "no Ed25519 signature" in refused.stdout and "OK" not in refused.stdout


def test_a_signature_swapped_from_another_bundle_is_refused(signed, tmp_path: Path) -> None:
    """Both bundles honestly signed by the same key: the other's signature covers another head."""
    bundle, private, public = signed
    other = tmp_path / "other.jsonl"
    export_bundle(_records(5, "y"), other, "CAIRN", private.read_bytes())
    header, lines = _lines(bundle)
    header["signature"] = _lines(other)[0]["signature"]
    swapped = _write(tmp_path / "swapped.jsonl", header, lines)

    refused = _auditor(tmp_path / "home", "verify", "--bundle", str(swapped), "--key", str(public))
    assert refused.returncode == 1 and "does not match the public key" in refused.stdout, refused.stdout


def test_a_bundle_never_picks_its_own_algorithm(signed, tmp_path: Path) -> None:
    """An `alg` the key does not check is refused, and a key that is not an Ed25519 public key checks
    nothing (a private key, an RSA key, a secret's bytes)."""
    bundle, private, public = signed
    header, lines = _lines(bundle)
    header["signature"] = {**header["signature"], "alg": "hmac-sha256"}
    renamed = _write(tmp_path / "renamed.jsonl", header, lines)
    assert "checks only ed25519" in verify_bundle(renamed, public.read_bytes()).problem

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    rsa_public = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    for key, why in [
        (private.read_bytes(), "private key"),
        (rsa_public, "not an Ed25519 public key"),
        (b"a shared secret", "not a PEM public key"),
    ]:
        verdict = verify_bundle(bundle, key)
        assert not verdict.ok and why in verdict.problem, (why, verdict.problem)


def test_without_a_key_only_self_consistency_is_claimed_and_that_fails_unless_accepted(
    signed, tmp_path: Path
) -> None:
    bundle, _, _ = signed
    home = tmp_path / "home"
    plain = _auditor(home, "verify", "--bundle", str(bundle))
    assert plain.returncode == 1, plain.stdout + plain.stderr
    assert "only self-consistency was checked" in plain.stderr and "--unsigned-ok" in plain.stderr
    accepted = _auditor(home, "verify", "--bundle", str(bundle), "--unsigned-ok")
    assert accepted.returncode == 0 and "only self-consistency was checked" in accepted.stderr
    # An HMAC cannot even be exported: the only signing key is an Ed25519 private key.
    secret = tmp_path / "secret"
    secret.write_bytes(b"auditor-key")
    refused = _auditor(home, "export", str(tmp_path / "out.jsonl"), "--key", str(secret))
    assert refused.returncode == 2 and "cairn audit keygen" in refused.stderr, refused.stderr


def test_a_signed_archive_without_its_public_key_is_an_error_naming_the_key(tmp_path: Path) -> None:
    """A reader that cannot check the archive's signatures is refused, never served the archive
    unchecked."""
    private, public = signing.keygen(tmp_path / "keys")
    archive = Archive(str(tmp_path / "archive"), "CAIRN", key_hint=str(public))
    records = _records(6)
    archive.write(records, private.read_bytes())
    stream = [(7, "cairn.x.v1", b"{}")]
    assert [seq for seq, _, _ in history(archive, stream, public.read_bytes())] == list(range(1, 8))
    with pytest.raises(MissingKey, match=f"no public key to check it: expected {public}"):
        history(archive, stream, None)
