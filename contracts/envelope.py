"""CloudEvents 1.0 structured-JSON envelope around every payload, plus ids and parsing.

The wire format stands alone: a publisher in any language that follows the JSON Schema in
``contracts/schemas/`` produces an event every service accepts.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import cache
from typing import Any, Generic, Literal, TypeVar

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    model_validator,
)

from contracts.events import PAYLOADS
from contracts.types import Contract, EventId
from contracts.upcasters import Upcast, older_types, upcast

CONTENT_TYPE = "application/cloudevents+json"
ID_NAMESPACE = uuid.UUID("6f1c7a3e-8d0b-5b6e-9a51-0c3a1e2b9f10")
_EXTENSION_NAME = re.compile(r"^[a-z0-9]{1,20}$")

P = TypeVar("P", bound=Contract)


class ContractError(ValueError):
    """A message that is not a valid cairn event; ``problems`` name each field at fault."""

    def __init__(self, reason: str, problems: list[str] | None = None, raw: dict[str, Any] | None = None):
        super().__init__(reason)
        self.reason = reason
        self.problems = problems or []
        self.raw = raw or {}


class Envelope(BaseModel, Generic[P]):
    """CloudEvents 1.0 attributes plus the `correlationid` and `causationid` extensions."""

    model_config = ConfigDict(frozen=True, extra="allow")

    specversion: Literal["1.0"] = Field("1.0", description="CloudEvents spec version.")
    id: EventId = Field(description="Unique per source; also the Nats-Msg-Id, so retries deduplicate.")
    source: str = Field(min_length=1, description="URI-reference of the producer, e.g. /cairn/ingestion.")
    type: str = Field(description="Event type, e.g. cairn.data.arrived.v1; equals the subject.")
    time: AwareDatetime = Field(description="When the fact happened (RFC 3339).")
    subject: str | None = Field(None, description="What the event is about (dataset, model name, ...).")
    datacontenttype: Literal["application/json"] = "application/json"
    dataschema: str | None = Field(None, description="URI of the data's JSON Schema.")
    correlationid: EventId = Field(description="One pipeline run: the id of the event that started it.")
    causationid: EventId | None = Field(None, description="Id of the event that caused this one.")
    data: P

    @model_validator(mode="after")
    def _extension_names(self) -> Envelope[P]:
        for name in self.model_extra or {}:
            if not _EXTENSION_NAME.match(name):
                raise ValueError(f"extension attribute {name!r} must be 1-20 lower-case letters or digits")
        return self

    def encode(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


def event_type_of(payload_cls: type[Contract]) -> str:
    return payload_cls.EVENT_TYPE  # type: ignore[attr-defined]


@cache
def envelope_model(payload_cls: type[Contract]) -> type[Envelope[Any]]:
    """The concrete envelope of one event type: `type` pinned, `data` typed."""
    event_type = event_type_of(payload_cls)
    name = payload_cls.__name__ + "Event"
    return create_model(
        name,
        __base__=Envelope[payload_cls],  # type: ignore[valid-type]
        __doc__=f"CloudEvent `{event_type}`. " + (payload_cls.__doc__ or "").strip(),
        type=(Literal[event_type], Field(description="Event type; equals the NATS subject.")),  # type: ignore[valid-type]
    )


TYPES: dict[str, type[Contract]] = {event_type_of(p): p for p in PAYLOADS}
# Superseded types still in the log, each read through its upcasters as today's model.
OLDER_TYPES = older_types(PAYLOADS)


def derive_id(cause_id: str, event_type: str, key: str = "") -> str:
    """Deterministic id of an output: a redelivered input re-emits the same ids, which dedup drops."""
    return str(uuid.uuid5(ID_NAMESPACE, f"{cause_id}|{event_type}|{key}"))


def new_event(
    payload: P,
    *,
    source: str,
    cause: Envelope[Any] | None = None,
    key: str = "",
    event_id: str | None = None,
    correlation_id: str | None = None,
    subject: str | None = None,
    time: datetime | None = None,
) -> Envelope[P]:
    """Wrap a payload. With a cause, id and correlation follow from it; without, a fresh run starts."""
    event_type = event_type_of(type(payload))
    if event_id is None:
        event_id = derive_id(cause.id, event_type, key) if cause else str(uuid.uuid4())
    if correlation_id is None:
        correlation_id = cause.correlationid if cause else event_id
    return envelope_model(type(payload))(
        id=event_id,
        source=source,
        type=event_type,
        time=time or datetime.now(UTC),
        subject=subject,
        correlationid=correlation_id,
        causationid=cause.id if cause else None,
        data=payload,
    )


def _problems(err: ValidationError, prefix: str = "") -> list[str]:
    out = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        out.append(f"{prefix}{loc}: {e['msg']}")
    return out


def decode(raw: bytes, expected: frozenset[str] | set[str] | None = None) -> Envelope[Any]:
    """Parse wire bytes into the typed envelope, or raise ContractError naming every problem.

    An event of a superseded version is upcast first: what comes back is today's model, with
    today's `type` (so `expected` names current types only).
    """
    if expected is not None and len(expected) == 1:
        # The common case, one expected type: pydantic parses and validates the bytes in one pass.
        # Anything it refuses takes the full path below, which names the problems exactly (and
        # reads superseded versions through their upcasters).
        payload_cls = TYPES.get(next(iter(expected)))
        if payload_cls is not None:
            try:
                return envelope_model(payload_cls).model_validate_json(raw)
            except ValidationError:
                pass
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ContractError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ContractError(f"a CloudEvent must be a JSON object, got {type(doc).__name__}")
    return decode_document(doc, expected)


def decode_document(
    doc: dict[str, Any],
    expected: frozenset[str] | set[str] | None = None,
    *,
    types: Mapping[str, type[Contract]] = TYPES,
    older: Mapping[str, tuple[type[Contract], tuple[Upcast, ...]]] = OLDER_TYPES,
) -> Envelope[Any]:
    """`decode` for an already parsed JSON object; `types` and `older` default to cairn's models."""
    event_type = doc.get("type")
    written_as = event_type
    if isinstance(event_type, str) and event_type in older:
        payload_cls, steps = older[event_type]
        event_type = event_type_of(payload_cls)
        try:
            doc = {**doc, "type": event_type, "data": upcast(doc.get("data"), steps)}
        except Exception as exc:  # noqa: BLE001 - an upcaster meeting data it cannot read
            reason = f"cannot upcast {written_as} to {event_type}: {type(exc).__name__}: {exc}"
            raise ContractError(reason, [f"data: {exc}"], raw=doc) from None
    payload_cls = types.get(event_type) if isinstance(event_type, str) else None
    if payload_cls is None:
        known = ", ".join(sorted(expected or types))
        raise ContractError(f"unknown event type {event_type!r}; expected one of: {known}", raw=doc)
    if expected is not None and event_type not in expected and written_as not in expected:
        # (A route that still consumes an older version expects the type as written.)
        raise ContractError(f"event type {written_as!r} is not handled here", raw=doc)
    try:
        return envelope_model(payload_cls).model_validate(doc)
    except ValidationError as exc:
        problems = _problems(exc)
        read_as = f" (read as {event_type})" if written_as != event_type else ""
        reason = f"invalid {written_as}{read_as}: " + "; ".join(problems[:5])
        raise ContractError(reason, problems, raw=doc) from None
