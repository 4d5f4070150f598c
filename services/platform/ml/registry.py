"""The model families by name, and their model files by format.

Assembled here, so no family module imports another and a new family is one entry in each map.
Importing it is cheap: the PyTorch family imports torch only when it fits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from contracts.types import ModelFamily, Task
from services.platform.ml import families, torch_mlp
from services.platform.ml.fitted import FitRequest, Fitted


class Model(Protocol):
    """A loaded model: regression -> (n,) values; classification -> (n, n_classes) probabilities."""

    def predict(self, x: np.ndarray) -> np.ndarray: ...


FIT: dict[ModelFamily, Callable[[FitRequest], Fitted]] = {
    ModelFamily.xgboost: families.fit_xgboost,
    ModelFamily.random_forest: families.fit_random_forest,
    ModelFamily.linear: families.fit_linear,
    ModelFamily.mlp: torch_mlp.fit_mlp,
}

# (bytes, task, n_classes) -> Model
LOAD: dict[str, Callable[[bytes, Task, int], Model]] = {
    "xgboost-ubj": families.TreePredictor,
    "linear-json": families.LinearPredictor,
    torch_mlp.MLP_FORMAT: torch_mlp.MLPPredictor,
}


def fit(family: ModelFamily, request: FitRequest) -> Fitted:
    """Fit one table family; single-threaded and seeded (Dask supplies the parallelism)."""
    if family not in FIT:
        raise ValueError(f"{family.value} is not a table model family")
    return FIT[family](request)



def predictor(estimator_format: str, data: bytes, task: Task, n_classes: int) -> Model:
    """Load a model file by its format; formats are native and never unpickled."""
    if estimator_format not in LOAD:
        raise ValueError(f"unknown estimator format {estimator_format!r}")
    return LOAD[estimator_format](data, task, n_classes)
