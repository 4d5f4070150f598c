"""The lineage store: every stream message as a hash-chained record, plus the artifacts it names.

SQLite under $CAIRN_HOME by default, PostgreSQL by URL (`postgresql+psycopg://...`). The store is
derived data: `cairn lineage rebuild` recreates it from the stream at any time.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    func,
    insert,
    select,
)
from sqlalchemy.engine import Connection, Engine

from contracts import is_dead_letter
from services.platform.local_store import schema_lock, write_ahead_log

GENESIS = "0" * 64

metadata = MetaData()
records = Table(
    "cairn_records",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("subject", String(512), nullable=False),
    Column("event_id", String(128), index=True),
    Column("type", String(128), index=True),
    Column("correlationid", String(128), index=True),
    Column("causationid", String(128), index=True),
    Column("time", String(64)),
    Column("raw_sha256", String(64), nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Column("body", Text, nullable=False),
)
artifacts = Table(
    "cairn_artifacts",
    metadata,
    Column("sha256", String(64), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("role", String(256), nullable=False),
    Column("uri", Text, nullable=False),
    Column("media_type", String(128)),
    Index("cairn_artifacts_sha", "sha256"),
    Index("cairn_artifacts_seq", "seq"),
)


# The statements of every append, built once (SQLAlchemy derives a new statement's cache key on
# each execution).
HEAD = select(records.c.seq, records.c.hash).order_by(records.c.seq.desc()).limit(1)
INSERT_RECORDS, INSERT_ARTIFACTS = insert(records), insert(artifacts)


def _head(conn: Connection) -> tuple[int, str]:
    """The last record's sequence and hash; (0, GENESIS) when the store is empty."""
    row = conn.execute(HEAD).first()
    return (row.seq, row.hash) if row else (0, GENESIS)


def chain_hash(prev_hash: str, seq: int, subject: str, raw_sha256: str) -> str:
    """Each record commits to its predecessor: changing, dropping or swapping one breaks every later hash."""
    return hashlib.sha256(f"{prev_hash}|{seq}|{subject}|{raw_sha256}".encode()).hexdigest()


def encode_body(raw: bytes) -> str:
    try:
        return "u:" + raw.decode("utf-8")
    except UnicodeDecodeError:
        return "b:" + base64.b64encode(raw).decode()


def decode_body(text: str) -> bytes:
    return text[2:].encode("utf-8") if text.startswith("u:") else base64.b64decode(text[2:])


@dataclass(frozen=True)
class Record:
    seq: int
    subject: str
    event_id: str | None
    type: str | None
    correlationid: str | None
    causationid: str | None
    time: str | None
    raw_sha256: str
    prev_hash: str
    hash: str
    body: str

    @property
    def raw(self) -> bytes:
        return decode_body(self.body)

    def event(self) -> dict[str, Any] | None:
        try:
            doc = json.loads(self.raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            return None
        return doc if isinstance(doc, dict) else None


def artifact_refs(data: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every {uri, sha256} object inside an event's data, with its JSON path as role."""
    if isinstance(data, dict):
        if (
            isinstance(data.get("sha256"), str)
            and isinstance(data.get("uri"), str)
            and len(data["sha256"]) == 64
        ):
            yield path or "data", data
        for key, value in data.items():
            if key == "features":  # an embedded copy of the upstream event, not a new reference
                continue
            yield from artifact_refs(value, f"{path}.{key}" if path else key)
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from artifact_refs(value, f"{path}[{i}]")


def make_record(seq: int, subject: str, raw: bytes, prev_hash: str) -> Record:
    raw_sha = hashlib.sha256(raw).hexdigest()
    doc: dict[str, Any] = {}
    if not is_dead_letter(subject):
        try:
            parsed = json.loads(raw)
            doc = parsed if isinstance(parsed, dict) else {}
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            doc = {}

    def text(key: str) -> str | None:
        value = doc.get(key)
        return value[:128] if isinstance(value, str) else None

    return Record(
        seq=seq,
        subject=subject,
        event_id=text("id"),
        type=text("type"),
        correlationid=text("correlationid"),
        causationid=text("causationid"),
        time=text("time"),
        raw_sha256=raw_sha,
        prev_hash=prev_hash,
        hash=chain_hash(prev_hash, seq, subject, raw_sha),
        body=encode_body(raw),
    )


class LineageStore:
    def __init__(self, url: str):
        self.url = url
        with schema_lock(url):
            self.engine: Engine = create_engine(url, future=True)
            metadata.create_all(self.engine)
            write_ahead_log(url)

    def close(self) -> None:
        self.engine.dispose()

    def head(self) -> tuple[int, str]:
        with self.engine.connect() as conn:
            return _head(conn)

    def last_seq(self) -> int:
        """The stream sequence recorded last (0 when empty): what read-your-writes waits on."""
        with self.engine.connect() as conn:
            return conn.execute(select(func.max(records.c.seq))).scalar_one() or 0

    def append(self, seq: int, subject: str, raw: bytes) -> Record | None:
        """Add the next message; returns None if already recorded. Raises on a gap (out of order)."""
        added = self.append_many([(seq, subject, raw)])
        return added[0] if added else None

    def append_many(self, messages: list[tuple[int, str, bytes]]) -> list[Record]:
        """Add consecutive messages in one transaction; already-recorded ones are skipped.

        Raises OutOfOrder at the first gap, after nothing was written.
        """
        with self.engine.begin() as conn:  # the head read in the transaction that writes after it
            added = self._append(conn, messages)
        return [Record(**r) for r in added]

    @staticmethod
    def _append(conn: Connection, messages: list[tuple[int, str, bytes]]) -> list[dict[str, Any]]:
        last_seq, last_hash = _head(conn)
        new_records, new_artifacts = [], []
        for seq, subject, raw in sorted(messages, key=lambda m: m[0]):
            if seq <= last_seq:
                continue
            if seq != last_seq + 1:
                raise OutOfOrder(f"expected stream sequence {last_seq + 1}, got {seq}")
            record = make_record(seq, subject, raw, last_hash)
            doc = record.event() if record.type else None
            new_records.append(asdict(record))
            for role, ref in artifact_refs((doc or {}).get("data")):
                new_artifacts.append(
                    {
                        "sha256": ref["sha256"],
                        "seq": seq,
                        "role": role,
                        "uri": ref["uri"],
                        "media_type": ref.get("media_type"),
                    }
                )
            last_seq, last_hash = seq, record.hash
        if new_records:
            conn.execute(INSERT_RECORDS, new_records)
            if new_artifacts:
                conn.execute(INSERT_ARTIFACTS, new_artifacts)
        return new_records

    def clear(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(artifacts))
            conn.execute(delete(records))

    # Queries -----------------------------------------------------------------------------
    def all(self) -> list[Record]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(records).order_by(records.c.seq)).mappings().all()
        return [Record(**row) for row in rows]

    def by_event_id(self, event_id: str) -> Record | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(records).where(records.c.event_id == event_id)).mappings().first()
        return Record(**row) if row else None

    def children(self, event_id: str) -> list[Record]:
        with self.engine.connect() as conn:
            rows = (
                conn.execute(select(records).where(records.c.causationid == event_id).order_by(records.c.seq))
                .mappings()
                .all()
            )
        return [Record(**row) for row in rows]

    def by_artifact(self, sha_prefix: str) -> list[Record]:
        """Events naming an artifact (full hash or a prefix of at least 8), first producer first."""
        with self.engine.connect() as conn:
            seqs = (
                conn.execute(
                    select(artifacts.c.seq)
                    .where(artifacts.c.sha256.like(sha_prefix + "%"))
                    .order_by(artifacts.c.seq)
                )
                .scalars()
                .all()
            )
            rows = (
                conn.execute(select(records).where(records.c.seq.in_(seqs)).order_by(records.c.seq))
                .mappings()
                .all()
            )
        return [Record(**row) for row in rows]

    def event_ids_starting(self, prefix: str, limit: int = 6) -> list[str]:
        """Event ids that start with `prefix` (the short ids `cairn events` prints), at most `limit`."""
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    select(records.c.event_id)
                    .where(records.c.event_id.startswith(prefix, autoescape=True))
                    .distinct()
                    .order_by(records.c.event_id)
                    .limit(limit)
                )
                .scalars()
                .all()
            )

    def by_type(self, event_type: str) -> list[Record]:
        with self.engine.connect() as conn:
            rows = (
                conn.execute(select(records).where(records.c.type == event_type).order_by(records.c.seq))
                .mappings()
                .all()
            )
        return [Record(**row) for row in rows]

    def count(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(records)).scalar_one()

    def dump(self) -> list[tuple]:
        """Everything, as plain tuples: two stores are equal when their dumps are."""
        with self.engine.connect() as conn:
            recs = [tuple(r) for r in conn.execute(select(records).order_by(records.c.seq)).all()]
            arts = [
                tuple(r)
                for r in conn.execute(
                    select(artifacts).order_by(artifacts.c.seq, artifacts.c.role, artifacts.c.sha256)
                ).all()
            ]
        return recs + arts


class OutOfOrder(RuntimeError):
    """A message arrived before its predecessor: retry later so the chain keeps stream order."""
