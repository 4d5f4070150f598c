"""Tamper evidence: verify the hash chain, against the stream and offline from an exported bundle.

Each record's hash covers its predecessor's hash, its stream sequence, subject and the SHA-256
of the exact bytes published. A changed record breaks its own hash; a dropped or swapped record
breaks the link to its neighbour; the first broken place is named.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nats.js.api import DeliverPolicy

from contracts import stream_filter
from services.lineage import signing
from services.lineage.store import GENESIS, LineageStore, Record, chain_hash, decode_body, make_record


@dataclass(frozen=True)
class Verdict:
    ok: bool
    checked: int
    head: str
    problem: str | None = None
    seq: int | None = None
    signed_by: str | None = None  # the fingerprint of the public key that checked the signature

    def text(self) -> str:
        if not self.ok:
            return f"TAMPERED: {self.problem}"
        signed = f", signed by Ed25519 key {self.signed_by}" if self.signed_by else ""
        return f"OK: {self.checked} records, chain head {self.head}{signed}"


def verify_records(records: Iterable[Record], check_bodies: bool = True) -> Verdict:
    """Walk the chain from genesis; name the first modified, missing or reordered record."""
    prev, expected_seq, count = GENESIS, 1, 0
    for r in records:
        if r.seq != expected_seq:
            kind = "missing" if r.seq > expected_seq else "reordered"
            what = (
                f"record {expected_seq} is missing"
                if kind == "missing"
                else (f"record {r.seq} appears after {expected_seq - 1}: records were reordered")
            )
            return Verdict(False, count, prev, what, expected_seq)
        if r.prev_hash != prev:
            return Verdict(
                False,
                count,
                prev,
                f"record {r.seq} does not link to record {r.seq - 1} "
                "(its predecessor was changed, removed or reordered)",
                r.seq,
            )
        if check_bodies and hashlib.sha256(decode_body(r.body)).hexdigest() != r.raw_sha256:
            return Verdict(
                False,
                count,
                prev,
                f"record {r.seq} ({r.type or r.subject}) was modified: "
                "its content no longer matches its hash",
                r.seq,
            )
        if chain_hash(prev, r.seq, r.subject, r.raw_sha256) != r.hash:
            return Verdict(
                False,
                count,
                prev,
                f"record {r.seq} ({r.type or r.subject}) was modified: its chain hash does not match",
                r.seq,
            )
        prev, expected_seq, count = r.hash, r.seq + 1, count + 1
    return Verdict(True, count, prev)


async def stream_records(
    js: Any, stream: str, subject: str = stream_filter()
) -> list[tuple[int, str, bytes]]:
    """Every message of the stream as (sequence, subject, raw bytes), in order."""
    info = await js.stream_info(stream)
    last = info.state.last_seq
    out: list[tuple[int, str, bytes]] = []
    if info.state.messages == 0:
        return out
    sub = await js.subscribe(subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    try:
        while True:
            msg = await sub.next_msg(timeout=10)
            seq = msg.metadata.sequence.stream
            out.append((seq, msg.subject, msg.data))
            if seq >= last:
                return out
    finally:
        await sub.unsubscribe()


async def history_records(js: Any, settings: Any) -> list[tuple[int, str, bytes]]:
    """The whole history: the archive (what retention took out of the stream), then the stream.

    Archive segments are checked on the way (chain, and signatures when the public key is at hand);
    a gap between archive and stream is an error, never a silent hole."""
    import asyncio

    from services.lineage.archive import Archive, history, public_key

    live = await stream_records(js, settings.stream)
    return await asyncio.to_thread(history, Archive.of(settings), live, public_key(settings))


def verify_against_stream(store_records: list[Record], stream: list[tuple[int, str, bytes]]) -> Verdict:
    """The chain must hold, and every stream message must be recorded with the same bytes."""
    verdict = verify_records(store_records)
    if not verdict.ok:
        return verdict
    by_seq = {r.seq: r for r in store_records}
    for seq, subject, raw in stream:
        record = by_seq.get(seq)
        if record is None:
            if seq > max(by_seq, default=0):
                break  # recorded up to here; the lineage service is still catching up
            return Verdict(
                False, len(store_records), verdict.head, f"record {seq} is missing from the store", seq
            )
        if record.subject != subject or record.raw_sha256 != hashlib.sha256(raw).hexdigest():
            return Verdict(
                False,
                len(store_records),
                verdict.head,
                f"record {seq} ({record.type or subject}) differs between the stream and the audit "
                "chain: modified",
                seq,
            )
    stream_seqs = {seq for seq, _, _ in stream}
    last_stream = max(stream_seqs, default=0)
    for r in store_records:
        if r.seq <= last_stream and r.seq not in stream_seqs:
            return Verdict(
                False,
                len(store_records),
                verdict.head,
                f"record {r.seq} ({r.type or r.subject}) is missing from the stream",
                r.seq,
            )
    return verdict


def export_bundle(
    records: list[Record], path: Path, stream: str, private_pem: bytes | None = None
) -> Verdict:
    """Events plus the chain head; with an Ed25519 private key, a signature over the header.

    Only Ed25519 signs: a shared secret would let every verifier forge, so there is no HMAC."""
    verdict = verify_records(records)
    if not verdict.ok:
        raise ValueError(f"refusing to export a broken chain: {verdict.problem}")
    header = {
        "format": "cairn.audit.v1",
        "stream": stream,
        "created": datetime.now(UTC).isoformat(),
        "records": verdict.checked,
        "head": verdict.head,
    }
    if private_pem is not None:
        value = signing.sign(private_pem, _signed_part(header))
        header["signature"] = {"alg": signing.ALGORITHM, "value": value}
    with path.open("w") as f:
        f.write(json.dumps(header, sort_keys=True) + "\n")
        for r in records:
            f.write(
                json.dumps(
                    {
                        "seq": r.seq,
                        "subject": r.subject,
                        "body": r.body,
                        "prev_hash": r.prev_hash,
                        "hash": r.hash,
                    },
                    sort_keys=True,
                )
                + "\n"
            )
    return verdict


def verify_bundle(path: Path, public_pem: bytes | None = None) -> Verdict:
    """Offline: recompute every hash from the bytes in the bundle, compare with the header's head,
    and, given a public key, check the header's Ed25519 signature with it.

    The key decides the check, never the bundle: an Ed25519 public key verifies an Ed25519
    signature and nothing else, and a bundle without one fails. Without a key only the bundle's
    self-consistency is checked (`Verdict.signed` is False): anyone can write such a bundle."""
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    records = []
    for line in lines[1:]:
        doc = json.loads(line)
        rebuilt = make_record(doc["seq"], doc["subject"], decode_body(doc["body"]), doc["prev_hash"])
        records.append(Record(**{**rebuilt.__dict__, "hash": doc["hash"]}))
    verdict = verify_records(records)
    if not verdict.ok:
        return verdict
    if verdict.head != header.get("head") or verdict.checked != header.get("records"):
        return Verdict(
            False,
            verdict.checked,
            verdict.head,
            f"chain head {verdict.head[:16]} over {verdict.checked} records does not match the "
            f"head {str(header.get('head'))[:16]} over {header.get('records')} in the bundle's header: "
            "records were removed or added",
        )
    if public_pem is None:
        return verdict
    problem = signature_problem(header, public_pem)
    if problem is not None:
        return Verdict(False, verdict.checked, verdict.head, problem)
    return Verdict(True, verdict.checked, verdict.head, signed_by=signing.fingerprint(public_pem))


def signature_problem(header: dict, public_pem: bytes) -> str | None:
    """Why the header's signature does not hold under this Ed25519 public key, or None when it does."""
    key_problem = signing.public_key_problem(public_pem)
    if key_problem is not None:
        return key_problem
    signature = header.get("signature")
    if not isinstance(signature, dict) or not signature.get("value"):
        return (
            "the bundle carries no Ed25519 signature; a key was given, so an unsigned bundle is refused "
            "(sign it with `cairn audit export --key PRIVATE.pem`)"
        )
    if signature.get("alg") != signing.ALGORITHM:
        return f"the bundle's signature is {signature.get('alg')!r}; this key checks only {signing.ALGORITHM}"
    if not signing.verify(public_pem, _signed_part(header), str(signature["value"])):
        return "the Ed25519 signature does not match the public key (or the header was changed)"
    return None


def _signed_part(header: dict) -> bytes:
    """What the Ed25519 signature covers: every header field but the signature itself."""
    return json.dumps({k: v for k, v in header.items() if k != "signature"}, sort_keys=True).encode()


def rebuild(store: LineageStore, stream: list[tuple[int, str, bytes]]) -> int:
    """Recreate the store from the stream (the store is derived data)."""
    store.clear()
    for i in range(0, len(stream), 1000):
        store.append_many(stream[i : i + 1000])
    return store.count()
