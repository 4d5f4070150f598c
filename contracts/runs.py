"""When a pipeline run ends: what `cairn submit --wait`, replay, the tests and the benchmarks follow.

A run ends on an event whose class declares ``ENDS_RUN`` (deployed, data rejected, event rejected,
deployment failed) or on a model evaluation whose gate did not pass: nothing follows either.
"""

from __future__ import annotations

from typing import Any

from contracts.envelope import Envelope
from contracts.events import PAYLOADS, ModelEvaluated

TERMINAL_TYPES: frozenset[str] = frozenset(
    p.EVENT_TYPE  # type: ignore[attr-defined]
    for p in PAYLOADS
    if getattr(p, "ENDS_RUN", False)
)
GATE_TYPE: str = ModelEvaluated.EVENT_TYPE


def type_ends_run(event_type: str, passed: bool | None = None) -> bool:
    """The rule on raw fields (`passed` of a model evaluation; None counts as not passed)."""
    return event_type in TERMINAL_TYPES or (event_type == GATE_TYPE and not passed)


def ends_run(event: Envelope[Any]) -> bool:
    """True when no further event of this run will follow."""
    return type_ends_run(event.type, getattr(event.data, "passed", None))
