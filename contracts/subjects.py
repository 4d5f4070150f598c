"""Subjects live beside the models: services never type a subject string."""

from __future__ import annotations

from contracts.envelope import event_type_of
from contracts.types import Contract

ROOT = "cairn"


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
    return f"{namespace}.dlq.{service}"


def stream_subjects() -> list[str]:
    return [f"{ROOT}.>"]
