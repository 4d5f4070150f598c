"""The champion/challenger gate as pure functions over holdout metrics."""

from __future__ import annotations

from contracts import Metric, Task
from services.platform.ml.metrics import better


def gate(
    metric: Metric,
    task: Task,
    challenger: dict[str, float],
    champion: dict[str, float] | None,
    *,
    margin: float,
    min_r2: float | None = None,
    min_accuracy: float | None = None,
) -> tuple[bool, list[str]]:
    """Pass when every absolute floor holds and the challenger beats the champion by the margin."""
    reasons: list[str] = []
    passed = True
    if task is Task.regression and min_r2 is not None:
        ok = challenger["r2"] >= min_r2
        passed &= ok
        reasons.append(f"holdout r2 {challenger['r2']:.4f} {'>=' if ok else '<'} floor {min_r2}")
    if task is Task.classification and min_accuracy is not None:
        ok = challenger["accuracy"] >= min_accuracy
        passed &= ok
        reasons.append(
            f"holdout accuracy {challenger['accuracy']:.4f} {'>=' if ok else '<'} floor {min_accuracy}"
        )
    mine = challenger[metric.value]
    if champion is None or metric.value not in champion:
        reasons.append(f"no champion yet; holdout {metric.value} {mine:.4f}")
    else:
        theirs = champion[metric.value]
        ok = better(metric, mine, theirs, margin)
        passed &= ok
        direction = "higher" if metric.higher_is_better else "lower"
        reasons.append(
            f"holdout {metric.value} {mine:.4f} vs champion {theirs:.4f} on the same rows "
            f"({direction} is better, margin {margin:.1%}): {'better' if ok else 'not better'}"
        )
    return passed, reasons
