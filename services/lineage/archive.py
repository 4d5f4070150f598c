"""The stream's archive: events leave the stream only after they are written, hash-chained and
signed, to the artifact store; readers see archive and stream as one history.

A segment is a gzip'd JSON document of consecutive lineage records (sequence, subject, the exact
bytes published, and each record's chain hash, which already commits to its predecessor). Each
segment also names the SHA-256 of the segment before it, and a sidecar holds an Ed25519 signature
over its own SHA-256: a changed, dropped, reordered or forged segment is found by anyone holding
the public key. Segments are written before the stream is trimmed, so retention never loses a
record: the stream only forgets what the archive already holds.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import fsspec
from sqlalchemy import select

from services.lineage import signing
from services.lineage.store import GENESIS, LineageStore, Record, chain_hash, decode_body, records
from services.platform.settings import CairnSettings

log = logging.getLogger(__name__)

SEGMENT_FORMAT = "cairn.archive.segment.v1"
SEGMENT_SUFFIX = ".json.gz"
SIGNATURE_SUFFIX = ".sig"


class ArchiveError(RuntimeError):
    """The archive is not a continuous, untampered history: the first broken place is named."""


class MissingKey(ArchiveError):
    """Signed segments and no public key to check them: an error, never a silent skip."""


@dataclass(frozen=True)
class SegmentRef:
    first_seq: int
    last_seq: int
    path: str  # inside the archive's filesystem


def archive_url(settings: CairnSettings) -> str:
    return f"{settings.artifacts.rstrip('/')}/archive/{settings.stream}"


def key_paths(settings: CairnSettings) -> tuple[Path, Path]:
    """The signing key pair: CAIRN_ARCHIVE_KEY (private PEM) with `<stem>-public.pem` beside it, or
    under the home; CAIRN_ARCHIVE_PUBLIC_KEY names the public key for readers who hold only that."""
    if settings.archive_key is not None:
        private = settings.archive_key.expanduser()
        public = private.with_name(private.stem.removesuffix("-private") + "-public.pem")
    else:
        folder = settings.home_dir / "archive-keys"
        private, public = folder / "audit-private.pem", folder / "audit-public.pem"
    if settings.archive_public_key is not None:
        public = settings.archive_public_key.expanduser()
    return private, public


def signing_key(settings: CairnSettings) -> bytes:
    """The private key; made once on a home that has none (a cluster mounts its own, see docs)."""
    private, _ = key_paths(settings)
    if not private.exists():
        if settings.archive_key is not None:
            raise ArchiveError(f"CAIRN_ARCHIVE_KEY {private} does not exist")
        signing.keygen(private.parent)
    return private.read_bytes()


def public_key(settings: CairnSettings) -> bytes | None:
    _, public = key_paths(settings)
    return public.read_bytes() if public.exists() else None


# Segments: pure functions -------------------------------------------------------------------------
def encode_segment(records: Sequence[Record], prev_segment_sha256: str, stream: str) -> bytes:
    """Canonical JSON, gzip without a timestamp: the same records always give the same bytes."""
    doc = {
        "format": SEGMENT_FORMAT,
        "stream": stream,
        "first_seq": records[0].seq,
        "last_seq": records[-1].seq,
        "count": len(records),
        "prev_segment_sha256": prev_segment_sha256,
        "records": [
            {
                "seq": r.seq,
                "subject": r.subject,
                "raw_sha256": r.raw_sha256,
                "prev_hash": r.prev_hash,
                "hash": r.hash,
                "body": r.body,
            }
            for r in records
        ],
    }
    text = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return gzip.compress(text, mtime=0)


def decode_segment(data: bytes) -> dict:
    try:
        doc = json.loads(gzip.decompress(data))
    except (OSError, ValueError) as exc:
        raise ArchiveError(f"not an archive segment: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != SEGMENT_FORMAT:
        raise ArchiveError("not an archive segment: unknown format")
    return doc


def segment_records(doc: dict) -> list[Record]:
    """The records of a decoded segment, each checked against its bytes and its predecessor."""
    out = []
    for item in doc["records"]:
        raw = decode_body(item["body"])
        if hashlib.sha256(raw).hexdigest() != item["raw_sha256"]:
            raise ArchiveError(f"archived record {item['seq']}: its bytes do not match their hash")
        if chain_hash(item["prev_hash"], item["seq"], item["subject"], item["raw_sha256"]) != item["hash"]:
            raise ArchiveError(f"archived record {item['seq']}: its chain hash does not match")
        out.append(
            Record(
                seq=item["seq"],
                subject=item["subject"],
                event_id=None,
                type=None,
                correlationid=None,
                causationid=None,
                time=None,
                raw_sha256=item["raw_sha256"],
                prev_hash=item["prev_hash"],
                hash=item["hash"],
                body=item["body"],
            )
        )
    return out


def segment_name(first: int, last: int) -> str:
    return f"{first:012d}-{last:012d}{SEGMENT_SUFFIX}"


def parse_name(name: str) -> tuple[int, int] | None:
    if not name.endswith(SEGMENT_SUFFIX):
        return None
    first, _, last = name.removesuffix(SEGMENT_SUFFIX).partition("-")
    return (int(first), int(last)) if first.isdigit() and last.isdigit() else None


def retention_cutoff(
    records: Iterable[Record],
    *,
    now: datetime,
    max_age_s: float,
    stream_bytes: int,
    max_bytes: int,
) -> int:
    """The highest sequence that retention sends out of the stream (0: none), oldest first.

    Age counts from each event's own time; bytes from the stream's size, freeing the oldest records'
    bytes until it fits. A record that is neither too old nor needed to free bytes stops the scan:
    the stream always keeps a suffix of the history.
    """
    cutoff, freed = 0, 0
    oldest_kept = now - timedelta(seconds=max_age_s) if max_age_s > 0 else None
    for r in records:
        too_old = oldest_kept is not None and r.time is not None and _parse_time(r.time) < oldest_kept
        too_big = max_bytes > 0 and stream_bytes - freed > max_bytes
        if not (too_old or too_big):
            break
        cutoff, freed = r.seq, freed + len(r.body) + len(r.subject)
    return cutoff


def _parse_time(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return datetime.max.replace(tzinfo=UTC)  # an unreadable time never ages a record out
    return value if value.tzinfo else value.replace(tzinfo=UTC)


# The archive on its filesystem ---------------------------------------------------------------------
class Archive:
    """Segments under `<artifact store>/archive/<stream>/`, listed in sequence order."""

    def __init__(self, url: str, stream: str, key_hint: str = "CAIRN_ARCHIVE_PUBLIC_KEY"):
        self.stream = stream
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.key_hint = key_hint  # where a reader's public key was looked for, named when it is missing

    @classmethod
    def of(cls, settings: CairnSettings) -> Archive:
        hint = f"{key_paths(settings)[1]} (CAIRN_ARCHIVE_PUBLIC_KEY)"
        return cls(archive_url(settings), settings.stream, hint)

    def segments(self) -> list[SegmentRef]:
        if not self.fs.exists(self.root):
            return []
        refs = []
        for path in self.fs.ls(self.root, detail=False):
            seqs = parse_name(path.rsplit("/", 1)[-1])
            if seqs is not None:
                refs.append(SegmentRef(seqs[0], seqs[1], path))
        return sorted(refs, key=lambda s: s.first_seq)

    def last_seq(self) -> int:
        refs = self.segments()
        return refs[-1].last_seq if refs else 0

    def _read(self, path: str) -> bytes:
        with self.fs.open(path, "rb") as f:
            return f.read()

    def write(self, records: Sequence[Record], private_pem: bytes) -> SegmentRef:
        """Append one segment after the last, signed; atomic where the filesystem allows."""
        refs = self.segments()
        expected = refs[-1].last_seq + 1 if refs else 1
        if records[0].seq != expected:
            raise ArchiveError(f"segment starts at {records[0].seq}, the archive continues at {expected}")
        prev = hashlib.sha256(self._read(refs[-1].path)).hexdigest() if refs else GENESIS
        data = encode_segment(records, prev, self.stream)
        digest = hashlib.sha256(data).hexdigest()
        path = f"{self.root}/{segment_name(records[0].seq, records[-1].seq)}"
        self.fs.makedirs(self.root, exist_ok=True)
        signature = {
            "segment_sha256": digest,
            "algorithm": signing.ALGORITHM,
            "signature": signing.sign(private_pem, digest.encode()),
        }
        self._put(path + SIGNATURE_SUFFIX, json.dumps(signature).encode())
        self._put(path, data)  # the segment last: a listed segment always has its signature
        return SegmentRef(records[0].seq, records[-1].seq, path)

    def _put(self, path: str, data: bytes) -> None:
        tmp = f"{path}.tmp"
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        self.fs.mv(tmp, path)

    def records(self, public_pem: bytes | None = None, below: int | None = None) -> list[Record]:
        """Every archived record in order, the whole archive checked on the way (see `verify`)."""
        out: list[Record] = []
        prev_segment, prev_hash, expected = GENESIS, GENESIS, 1
        for ref in self.segments():
            if below is not None and ref.first_seq >= below:
                break
            data = self._read(ref.path)
            doc = decode_segment(data)
            where = f"archive segment {ref.first_seq}-{ref.last_seq}"
            if (doc["first_seq"], doc["last_seq"]) != (ref.first_seq, ref.last_seq):
                raise ArchiveError(f"{where}: its name and its contents disagree")
            if ref.first_seq != expected:
                raise ArchiveError(f"{where}: records {expected}..{ref.first_seq - 1} are missing")
            if doc["prev_segment_sha256"] != prev_segment:
                raise ArchiveError(f"{where} does not link to the segment before it")
            digest = hashlib.sha256(data).hexdigest()
            if public_pem is None:
                raise MissingKey(
                    f"{where} is signed, but there is no public key to check it: expected {self.key_hint}"
                )
            self._check_signature(ref, digest, public_pem, where)
            for record in segment_records(doc):
                if record.seq != expected or record.prev_hash != prev_hash:
                    raise ArchiveError(f"{where}: record {record.seq} breaks the chain")
                out.append(record)
                prev_hash, expected = record.hash, record.seq + 1
            prev_segment = digest
        return out

    def _check_signature(self, ref: SegmentRef, digest: str, public_pem: bytes, where: str) -> None:
        try:
            sig = json.loads(self._read(ref.path + SIGNATURE_SUFFIX))
        except (FileNotFoundError, ValueError) as exc:
            raise ArchiveError(f"{where}: no readable signature") from exc
        if sig.get("segment_sha256") != digest:
            raise ArchiveError(f"{where} was changed after it was signed")
        if not signing.verify(public_pem, digest.encode(), str(sig.get("signature", ""))):
            raise ArchiveError(f"{where}: the signature does not verify with this public key")

    def messages(
        self, public_pem: bytes | None = None, below: int | None = None
    ) -> list[tuple[int, str, bytes]]:
        """(sequence, subject, raw bytes) as the stream held them, for readers of the history."""
        return [
            (r.seq, r.subject, r.raw)
            for r in self.records(public_pem, below)
            if below is None or r.seq < below
        ]


def store_range(store: LineageStore, first: int, last: int) -> list[Record]:
    """The store's records `first..last`, in order."""
    query = select(records).where(records.c.seq.between(first, last)).order_by(records.c.seq)
    with store.engine.connect() as conn:
        return [Record(**row) for row in conn.execute(query).mappings().all()]


@dataclass(frozen=True)
class Trim:
    archived: int  # records written to new segments
    first_kept: int  # the stream's first sequence afterwards
    held_by: str | None = None  # why retention stopped short of its cutoff, if it did
    overdue: int = 0  # records retention sends out that the stream still holds (held back)


async def consumers_floor(js: object, stream: str) -> tuple[int, str | None]:
    """The lowest sequence some durable consumer still has to process (0: none waits)."""
    floor, who = 0, None
    for info in await js.consumers_info(stream):  # type: ignore[attr-defined]
        if info.num_pending or info.num_ack_pending:
            first_open = info.ack_floor.stream_seq + 1
            if floor == 0 or first_open < floor:
                floor, who = first_open, info.name
    return floor, who


async def archive_and_trim(
    js: object, settings: CairnSettings, store: LineageStore, archive: Archive, private_pem: bytes
) -> Trim:
    """Archive what retention sends out of the stream, then purge exactly that from the stream.

    Never past what the lineage store has recorded (the archive is written from its records),
    never past the first message some durable consumer has not processed yet.
    """
    info = await js.stream_info(settings.stream)  # type: ignore[attr-defined]
    first, head = info.state.first_seq, await asyncio.to_thread(store.last_seq)
    candidates = await asyncio.to_thread(store_range, store, max(first, 1), head)
    cutoff = retention_cutoff(
        candidates,
        now=datetime.now(UTC),
        max_age_s=settings.retention_max_age_s,
        stream_bytes=info.state.bytes,
        max_bytes=settings.retention_max_bytes,
    )
    wanted = cutoff
    floor, who = await consumers_floor(js, settings.stream)
    held_by = None
    if floor and cutoff >= floor:
        cutoff, held_by = floor - 1, f"consumer {who} has not processed sequence {floor} yet"
    archived_last = await asyncio.to_thread(archive.last_seq)
    written = 0
    if cutoff > archived_last:
        pending = await asyncio.to_thread(store_range, store, archived_last + 1, cutoff)
        for batch in (
            pending[i : i + settings.archive_segment_records]
            for i in range(0, len(pending), settings.archive_segment_records)
        ):
            await asyncio.to_thread(archive.write, batch, private_pem)
            written += len(batch)
    if cutoff >= max(first, 1):
        # Purge keeps every message at or above `seq`: what is gone from the stream is archived.
        await js.purge_stream(settings.stream, seq=cutoff + 1)  # type: ignore[attr-defined]
        log.info("retention: archived up to %d, the stream now starts at %d", cutoff, cutoff + 1)
    first_kept = max(first, cutoff + 1)
    return Trim(written, first_kept, held_by, overdue=max(0, wanted - first_kept + 1))


def history(
    archive: Archive, stream_messages: list[tuple[int, str, bytes]], public_pem: bytes | None
) -> list[tuple[int, str, bytes]]:
    """The archive, then the stream from where the archive ends: one history, checked for a gap."""
    stream_first = stream_messages[0][0] if stream_messages else None
    archived = archive.messages(public_pem, below=stream_first)
    if not archived:
        return stream_messages
    if stream_first is not None and archived[-1][0] + 1 < stream_first:
        raise ArchiveError(
            f"records {archived[-1][0] + 1}..{stream_first - 1} are in neither the archive nor the stream"
        )
    return archived + stream_messages
