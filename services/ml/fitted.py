"""What every model family's fit returns: its own module, so families never import each other."""

from __future__ import annotations

from dataclasses import dataclass

from contracts.types import ModelFamily


@dataclass(frozen=True)
class Fitted:
    family: ModelFamily
    estimator_bytes: bytes
    estimator_format: str
    rounds_used: int
