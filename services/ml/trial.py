"""One trial as a pure function: runs on any Dask worker, needs no NATS and no MLflow."""

from __future__ import annotations

import time
from typing import Any

from contracts.types import Metric, ModelFamily, Task
from services.ml import families
from services.ml.featureset import load_featureset
from services.ml.metrics import score
from services.ml.transform import TRAIN, VALIDATION


def run_trial(
    featureset_uri: str,
    featureset_sha256: str,
    family: str,
    params: dict[str, Any],
    budget: int,
    task: str,
    metric: str,
    seed: int,
) -> dict[str, Any]:
    """Fit on the training split, score on validation. Returns plain data (cheap to ship back)."""
    started = time.perf_counter()
    data = load_featureset(featureset_uri, featureset_sha256)
    x_train, y_train = data.split(TRAIN)
    x_valid, y_valid = data.split(VALIDATION)
    task_ = Task(task)
    fitted = families.fit(
        ModelFamily(family), params, budget, task_, data.n_classes, seed, x_train, y_train, x_valid, y_valid
    )
    predictor = families.Predictor(fitted.estimator_format, fitted.estimator_bytes, task_, data.n_classes)
    value = score(Metric(metric), task_, y_valid, predictor.predict(x_valid))
    return {"score": value, "rounds": fitted.rounds_used, "duration_s": time.perf_counter() - started}


def fit_final(
    featureset_uri: str,
    featureset_sha256: str,
    family: str,
    params: dict[str, Any],
    budget: int,
    task: str,
    metric: str,
    seed: int,
) -> dict[str, Any]:
    """The final model: the winning configuration at full budget; returns the native model bytes."""
    data = load_featureset(featureset_uri, featureset_sha256)
    x_train, y_train = data.split(TRAIN)
    x_valid, y_valid = data.split(VALIDATION)
    task_ = Task(task)
    fitted = families.fit(
        ModelFamily(family), params, budget, task_, data.n_classes, seed, x_train, y_train, x_valid, y_valid
    )
    predictor = families.Predictor(fitted.estimator_format, fitted.estimator_bytes, task_, data.n_classes)
    return {
        "estimator": fitted.estimator_bytes,
        "format": fitted.estimator_format,
        "rounds": fitted.rounds_used,
        "n_classes": data.n_classes,
        "validation_score": score(Metric(metric), task_, y_valid, predictor.predict(x_valid)),
    }
