"""Holdout and validation metrics, and comparing scores in the metric's own direction.

scikit-learn is imported by the scoring functions only: tuning compares scores without it.
"""

from __future__ import annotations

import numpy as np

from contracts.types import Metric, Task


def score_all(task: Task, y_true: np.ndarray, prediction: np.ndarray) -> dict[str, float]:
    """Regression: rmse, mae, r2. Classification: accuracy, f1 (macro), roc_auc, log_loss."""
    from sklearn import metrics as skm

    if task is Task.regression:
        return {
            Metric.rmse.value: float(np.sqrt(skm.mean_squared_error(y_true, prediction))),
            Metric.mae.value: float(skm.mean_absolute_error(y_true, prediction)),
            Metric.r2.value: float(skm.r2_score(y_true, prediction)),
        }
    n_classes = prediction.shape[1]
    labels = list(range(n_classes))
    probs = np.clip(prediction, 1e-15, 1.0)
    probs = probs / probs.sum(axis=1, keepdims=True)
    predicted = probs.argmax(axis=1)
    out = {
        Metric.accuracy.value: float(skm.accuracy_score(y_true, predicted)),
        Metric.f1.value: float(
            skm.f1_score(y_true, predicted, average="macro", labels=labels, zero_division=0)
        ),
        Metric.log_loss.value: float(skm.log_loss(y_true, probs, labels=labels)),
    }
    present = np.unique(y_true)
    if len(present) >= 2:
        if n_classes == 2:
            out[Metric.roc_auc.value] = float(skm.roc_auc_score(y_true, probs[:, 1]))
        else:
            out[Metric.roc_auc.value] = float(
                skm.roc_auc_score(y_true, probs, multi_class="ovr", labels=labels)
            )
    return out


def score(metric: Metric, task: Task, y_true: np.ndarray, prediction: np.ndarray) -> float:
    return score_all(task, y_true, prediction)[metric.value]


def better(metric: Metric, a: float, b: float, margin: float = 0.0) -> bool:
    """Is a better than b by at least a relative margin?"""
    if metric.higher_is_better:
        return a > b + abs(b) * margin
    return a < b - abs(b) * margin


def sort_key(metric: Metric):
    return (lambda s: -s) if metric.higher_is_better else (lambda s: s)
