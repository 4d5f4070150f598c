"""Upcasters: pure functions that bring an older event's data up to its type's current model.

The log is kept for years and read by code written later, so a breaking change is a new vN *and*
a way to read the old one: a payload class declares ``UPCASTERS = {1: v1_to_v2, 2: v2_to_v3}``
(key: the version a function reads). Decoding applies the chain on read, so the lineage store,
replay and every service see an old event as the current model, with its current `type`. The bytes
in the stream are never rewritten: the hash chain and the audit bundle stay what they were.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable
from functools import cache
from typing import Any

from contracts.types import Contract

Upcast = Callable[[dict[str, Any]], dict[str, Any]]

_VERSION = re.compile(r"^(?P<base>.+)\.v(?P<n>[1-9][0-9]*)$")


def split_version(event_type: str) -> tuple[str, int]:
    """`cairn.data.arrived.v1` -> (`cairn.data.arrived`, 1)."""
    match = _VERSION.match(event_type)
    if match is None:
        raise ValueError(f"event type {event_type!r} does not end in .v<N>")
    return match["base"], int(match["n"])


def with_version(event_type: str, version: int) -> str:
    return f"{split_version(event_type)[0]}.v{version}"


def chain_of(payload_cls: type[Contract]) -> dict[int, Upcast]:
    """The class's upcasters, checked: contiguous, and ending at the version before the current one."""
    event_type: str = payload_cls.EVENT_TYPE  # type: ignore[attr-defined]
    current = split_version(event_type)[1]
    chain: dict[int, Upcast] = dict(getattr(payload_cls, "UPCASTERS", {}))
    if chain and sorted(chain) != list(range(min(chain), current)):
        raise ValueError(
            f"{payload_cls.__name__}: UPCASTERS must map each version from {min(chain)} to "
            f"v{current - 1} (got {sorted(chain)}): every older version needs a step to the next"
        )
    return chain


def older_types(payloads: Iterable[type[Contract]]) -> dict[str, tuple[type[Contract], tuple[Upcast, ...]]]:
    """Every superseded type string a current model can read, with the steps that bring it up."""
    out: dict[str, tuple[type[Contract], tuple[Upcast, ...]]] = {}
    for payload_cls in payloads:
        chain = chain_of(payload_cls)
        current = split_version(payload_cls.EVENT_TYPE)[1]  # type: ignore[attr-defined]
        for start in chain:
            steps = tuple(chain[v] for v in range(start, current))
            out[with_version(payload_cls.EVENT_TYPE, start)] = (payload_cls, steps)  # type: ignore[attr-defined]
    return out


def upcast(data: Any, steps: Iterable[Upcast]) -> Any:
    """Apply the steps to a copy: the caller's document (the raw event) is never changed."""
    if not isinstance(data, dict):
        return data  # validation names the problem
    out = copy.deepcopy(data)
    for step in steps:
        out = step(out)
    return out


@cache
def earlier(payload_cls: type[Contract], version: int) -> type[Contract]:
    """The payload class of a route that still consumes `vN` of a type during a migration.

    Its EVENT_TYPE is the old one (so the subject, the durable name and the permissions are the
    old version's), but decoding upcasts what it receives: the handler gets today's model.
    """
    event_type = with_version(payload_cls.EVENT_TYPE, version)  # type: ignore[attr-defined]
    if version not in chain_of(payload_cls):
        raise ValueError(f"{payload_cls.__name__} has no upcaster from {event_type}")
    return type(payload_cls.__name__ + f"V{version}", (payload_cls,), {"EVENT_TYPE": event_type})  # type: ignore[return-value]
