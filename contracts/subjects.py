"""Subjects live beside the models: services never type a subject string."""

from __future__ import annotations

from contracts.envelope import event_type_of
from contracts.types import Contract

ROOT = "cairn"
DEAD_LETTER = "dlq"  # the token that marks a dead-letter subject in any namespace


def subject_for(payload_cls: type[Contract] | str, namespace: str = ROOT) -> str:
    """`cairn.data.arrived.v1` in the live namespace; `cairn.replay.<id>.data.arrived.v1` in a replay."""
    event_type = payload_cls if isinstance(payload_cls, str) else event_type_of(payload_cls)
    return namespace + event_type[len(ROOT) :]


def event_type_for(subject: str, namespace: str = ROOT) -> str:
    """Inverse of subject_for."""
    if not subject.startswith(namespace + "."):
        raise ValueError(f"subject {subject!r} is outside namespace {namespace!r}")
    return ROOT + subject[len(namespace) :]


def dead_letter_subject(service: str, namespace: str = ROOT) -> str:
    """`cairn.dlq.<service>`; a replay's stay in its namespace: `cairn.replay.<id>.dlq.<service>`."""
    return f"{namespace}.{DEAD_LETTER}.{service}"


def is_dead_letter(subject: str) -> bool:
    """Dead letters carry a refused message's raw bytes, not an event: readers of the log skip them."""
    return f".{DEAD_LETTER}." in subject


def stream_filter(namespace: str = ROOT) -> str:
    """Every subject of a namespace (events and dead letters): `cairn.>`."""
    return f"{namespace}.>"


def replay_namespace(replay_id: str) -> str:
    """A replay's own namespace, `cairn.replay.<id>`: inside the stream, apart from live work."""
    return f"{ROOT}.replay.{replay_id}"


def is_live(namespace: str) -> bool:
    """The production namespace; resources of any other (a replay's) get a suffixed name."""
    return namespace == ROOT


def short_type(event_type: str) -> str:
    """`data.arrived.v1` for `cairn.data.arrived.v1`: a label without the common root."""
    return event_type.removeprefix(ROOT + ".")


def stream_subjects() -> list[str]:
    return [stream_filter(ROOT)]
