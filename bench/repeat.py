"""Interleaved repeats: the only ratios a noisy 2-core machine gives that mean anything.

A single A-then-B run lets a background burst land on one side; running A B A B A B and reporting
each side's median with its spread (min and max) shows how much of a difference is noise.
"""

from __future__ import annotations

import statistics
from collections.abc import Awaitable, Callable, Sequence
from typing import Any


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and the relative half-range: `spread` 0.1 means +-10 % around the median."""
    median = statistics.median(values)
    low, high = min(values), max(values)
    return {
        "median": median,
        "min": low,
        "max": high,
        "spread": (high - low) / 2 / median if median else 0.0,
        "n": len(values),
    }


def ratio_spread(numerators: Sequence[float], denominators: Sequence[float]) -> dict[str, float]:
    """The ratio of paired repeats (A_i / B_i, taken in the same round), summarised like `spread`."""
    return spread([a / b for a, b in zip(numerators, denominators, strict=True)])


async def interleave(
    sides: dict[str, Callable[[], Awaitable[dict[str, Any]]]], repeats: int
) -> dict[str, list[dict[str, Any]]]:
    """Run every side once per round, round after round, so drift hits all sides alike."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, run in sides.items():
            results[name].append(await run())
    return results


def column(rows: Sequence[dict[str, Any]], key: str) -> list[float]:
    return [float(row[key]) for row in rows]


def rounded(doc: Any, digits: int = 3) -> Any:
    """Every float in a JSON-able document rounded, for output people read and diff."""
    if isinstance(doc, float):
        return round(doc, digits)
    if isinstance(doc, dict):
        return {k: rounded(v, digits) for k, v in doc.items()}
    if isinstance(doc, list):
        return [rounded(v, digits) for v in doc]
    return doc
