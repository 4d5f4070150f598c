"""One trial as a pure function: runs on any Dask worker, needs no NATS and no MLflow.

Tables go through `families.fit`; text goes through the language-model trainer. `device` comes
from placement (a GPU worker's trial gets "cuda"); only the PyTorch families use it.
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Any

import numpy as np

from contracts.types import Metric, ModelFamily, Task
from services.ml import families
from services.ml.featureset import load_featureset
from services.ml.metrics import score
from services.ml.transform import TRAIN, VALIDATION


@lru_cache(maxsize=4)
def load_text_tokens(uri: str, sha256: str) -> dict[str, np.ndarray]:
    """Token arrays of a text feature set; immutable, so cached by hash."""
    import safetensors.numpy

    from services.artifacts import read_verified

    return safetensors.numpy.load(read_verified(uri, sha256))


def _train_text(uri: str, sha256: str, params: dict[str, Any], budget: int, seed: int, device: str) -> Any:
    from services.ml.textgen.train import train_lm

    tokens = load_text_tokens(uri, sha256)
    return train_lm(
        tokens["train"],
        dict(params),
        seed,
        budget,
        device=device,
        eval_every=max(10, budget // 10),
        valid_tokens=tokens["validation"],
    )


def _fit_table(uri, sha256, family, params, budget, task, seed, device):
    data = load_featureset(uri, sha256)
    x_train, y_train = data.split(TRAIN)
    x_valid, y_valid = data.split(VALIDATION)
    fitted = families.fit(
        ModelFamily(family), params, budget, Task(task), data.n_classes, seed,
        x_train, y_train, x_valid, y_valid, device=device,
    )
    predictor = families.Predictor(fitted.estimator_format, fitted.estimator_bytes, Task(task), data.n_classes)
    return fitted, predictor.predict(x_valid), y_valid, data.n_classes


def run_trial(
    featureset_uri: str,
    featureset_sha256: str,
    family: str,
    params: dict[str, Any],
    budget: int,
    task: str,
    metric: str,
    seed: int,
    device: str = "cpu",
) -> dict[str, Any]:
    """Fit on the training split, score on validation. Returns plain data (cheap to ship back)."""
    started = time.perf_counter()
    if ModelFamily(family) is ModelFamily.transformer:
        result = _train_text(featureset_uri, featureset_sha256, params, budget, seed, device)
        value, rounds = float(result.metrics["val_perplexity"]), int(result.metrics["steps"])
    else:
        fitted, prediction, y_valid, _ = _fit_table(
            featureset_uri, featureset_sha256, family, params, budget, task, seed, device
        )
        value, rounds = score(Metric(metric), Task(task), y_valid, prediction), fitted.rounds_used
    return {"score": value, "rounds": rounds, "duration_s": time.perf_counter() - started}


def fit_final(
    featureset_uri: str,
    featureset_sha256: str,
    family: str,
    params: dict[str, Any],
    budget: int,
    task: str,
    metric: str,
    seed: int,
    device: str = "cpu",
) -> dict[str, Any]:
    """The final model: the winning configuration at full budget; returns the native model bytes."""
    if ModelFamily(family) is ModelFamily.transformer:
        result = _train_text(featureset_uri, featureset_sha256, params, budget, seed, device)
        return {
            "estimator": result.checkpoint,
            "format": "gpt-safetensors",
            "config": result.config_json,
            "rounds": int(result.metrics["steps"]),
            "n_classes": 0,
            "validation_score": float(result.metrics["val_perplexity"]),
        }
    fitted, prediction, y_valid, n_classes = _fit_table(
        featureset_uri, featureset_sha256, family, params, budget, task, seed, device
    )
    return {
        "estimator": fitted.estimator_bytes,
        "format": fitted.estimator_format,
        "rounds": fitted.rounds_used,
        "n_classes": n_classes,
        "validation_score": score(Metric(metric), Task(task), y_valid, prediction),
    }
