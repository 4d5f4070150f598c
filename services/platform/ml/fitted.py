"""What every table family fits from and returns: their own module, so families never import
each other and a new family is one function `fit(FitRequest) -> Fitted`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from contracts.types import ModelFamily, Task


@dataclass(frozen=True)
class FitRequest:
    """One fit: a configuration, its budget, the task, and the training (and validation) split."""

    params: dict[str, Any]
    budget: int
    task: Task
    n_classes: int
    seed: int
    x_train: np.ndarray
    y_train: np.ndarray
    x_valid: np.ndarray | None = None
    y_valid: np.ndarray | None = None
    device: str | None = "cpu"
    # The feature set's sha256 when the splits are its cached arrays: its XGBoost matrices are
    # built once per worker thread (services.platform.ml.matrices); None builds them per fit.
    data_key: str | None = None


@dataclass(frozen=True)
class Fitted:
    family: ModelFamily
    estimator_bytes: bytes
    estimator_format: str
    rounds_used: int
