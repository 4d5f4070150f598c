"""XGBoost's training matrices, kept for the feature set a worker thread keeps fitting.

Why: a fit on a new `DMatrix` first sketches the quantiles of every column (XGBoost's `hist`
method bins the values before it grows a tree), about 22 ms of CPU on the 38k-row diamonds split,
a quarter of a 33-round fit, and a study fits one feature set a hundred times. The arrays behind a
matrix are an immutable feature set (cached by its sha256, services.platform.ml.featureset), so
the matrix built once serves every fit of that set; the boosters come out byte for byte the same
(tests/test_matrices.py).

Per thread, and only the last feature set: XGBoost builds a matrix's bins on its first fit and two
fits must not race there (the Optuna peer, bench/peers, fits in two threads of one process); a Dask
worker of cairn's has one thread, so one matrix pair per worker process. The pair's memory (XGBoost's
float32 copy of the two splits, then their bins) now stays with the worker between fits, until it
fits another feature set; it was freed after each fit before.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

_KEPT = threading.local()


def training_matrices(
    key: str | None,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_valid: np.ndarray | None,
    y_valid: np.ndarray | None,
) -> tuple[Any, Any | None]:
    """(train, validation or None) matrices; the ones this thread built last when `key` (the feature
    set's sha256) is theirs, new ones otherwise. `key` None: always new (arrays of unknown origin)."""
    import xgboost as xgb

    validated = x_valid is not None and y_valid is not None
    kept = getattr(_KEPT, "matrices", None)
    if key is not None and kept is not None and kept[0] == (key, validated):
        return kept[1], kept[2]
    train = xgb.DMatrix(x_train, label=y_train, nthread=1)
    valid = xgb.DMatrix(x_valid, label=y_valid, nthread=1) if validated else None
    if key is not None:
        _KEPT.matrices = ((key, validated), train, valid)
    return train, valid
