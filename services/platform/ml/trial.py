"""One trial as a pure function: runs on any Dask worker, needs no NATS and no MLflow.

Tables go through `registry.fit`; text goes through the language-model trainer. `device` comes
from placement (a GPU worker's trial gets "cuda"); only the PyTorch families use it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from contracts.types import Metric, ModelFamily, Task
from services.platform.ml import registry
from services.platform.ml.featureset import load_featureset
from services.platform.ml.fitted import FitRequest
from services.platform.ml.metrics import score
from services.platform.ml.transform import TRAIN, VALIDATION


@lru_cache(maxsize=4)
def load_text_tokens(uri: str, sha256: str) -> dict[str, np.ndarray]:
    """Token arrays of a text feature set; immutable, so cached by hash."""
    import safetensors.numpy

    from services.platform.artifacts import read_verified

    return safetensors.numpy.load(read_verified(uri, sha256))


def _train_text(uri: str, sha256: str, params: dict[str, Any], budget: int, seed: int, device: str) -> Any:
    from services.platform.ml.textgen.train import train_lm

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


@dataclass(frozen=True)
class TrialSpec:
    """One fit to run on a worker: plain values, so Dask ships it cheaply and any worker can run it."""

    featureset_uri: str
    featureset_sha256: str
    family: str
    params: dict[str, Any]
    budget: int
    task: str
    metric: str
    seed: int
    device: str = "cpu"


def fit_final(spec: TrialSpec) -> dict[str, Any]:
    """Fit on the training split, score on validation; returns the native model bytes too.

    The one code path for trials and for the final model (the winning configuration at full budget).
    """
    family, budget, seed, device = ModelFamily(spec.family), spec.budget, spec.seed, spec.device
    if family is ModelFamily.transformer:
        result = _train_text(spec.featureset_uri, spec.featureset_sha256, spec.params, budget, seed, device)
        return {
            "estimator": result.checkpoint,
            "format": "gpt-safetensors",
            "config": result.config_json,
            "rounds": int(result.metrics["steps"]),
            "n_classes": 0,
            "validation_score": float(result.metrics["val_perplexity"]),
        }
    task = Task(spec.task)
    data = load_featureset(spec.featureset_uri, spec.featureset_sha256)
    x_train, y_train = data.split(TRAIN)
    x_valid, y_valid = data.split(VALIDATION)
    request = FitRequest(
        spec.params,
        budget,
        task,
        data.n_classes,
        seed,
        x_train,
        y_train,
        x_valid,
        y_valid,
        device,
        data_key=spec.featureset_sha256,
    )
    fitted = registry.fit(family, request)
    model = registry.predictor(fitted.estimator_format, fitted.estimator_bytes, task, data.n_classes)
    return {
        "estimator": fitted.estimator_bytes,
        "format": fitted.estimator_format,
        "rounds": fitted.rounds_used,
        "n_classes": data.n_classes,
        "validation_score": score(Metric(spec.metric), task, y_valid, model.predict(x_valid)),
    }


def run_trial(spec: TrialSpec) -> dict[str, Any]:
    """`fit_final` without the model bytes: plain data, cheap to ship back."""
    started = time.perf_counter()
    fitted = fit_final(spec)
    return {
        "score": fitted["validation_score"],
        "rounds": fitted["rounds"],
        "duration_s": time.perf_counter() - started,
    }
