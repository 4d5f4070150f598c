"""XGBoost matrices kept per worker thread (services.platform.ml.matrices): the same boosters,
byte for byte, as matrices built for each fit, and never shared between threads."""

from __future__ import annotations

import threading

import numpy as np

from contracts.types import Task
from services.platform.ml import matrices
from services.platform.ml.families import fit_random_forest, fit_xgboost
from services.platform.ml.fitted import FitRequest


def table(seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(3000, 6)).astype(np.float32)
    y = (x[:, 0] * 3 + np.sin(x[:, 1]) + rng.normal(scale=0.1, size=3000)).astype(np.float32)
    return x[:2400], y[:2400], x[2400:], y[2400:]


def request(params: dict, budget: int, data: tuple[np.ndarray, ...], key: str | None) -> FitRequest:
    return FitRequest(params, budget, Task.regression, 0, 7, *data, data_key=key)


XGB = {"max_depth": 4, "learning_rate": 0.3, "subsample": 0.8, "colsample_bytree": 0.7}
FOREST = {"max_depth": 6, "subsample": 0.7, "colsample_bynode": 0.5}


def test_kept_matrices_give_the_boosters_fresh_ones_give() -> None:
    """A study's fits in one thread, in turn (a forest between boosted fits, another budget, another
    feature set and back): each booster is the one a matrix built for that fit alone gives."""
    a, b = table(0), table(1)
    fits = [
        (fit_xgboost, XGB, 30, a, "a"),
        (fit_random_forest, FOREST, 30, a, "a"),
        (fit_xgboost, {**XGB, "max_depth": 6}, 90, a, "a"),  # early stopping on the kept validation set
        (fit_xgboost, XGB, 30, b, "b"),
        (fit_random_forest, FOREST, 60, a, "a"),
    ]
    kept = [fit(request(params, budget, data, key)) for fit, params, budget, data, key in fits]
    fresh = [fit(request(params, budget, data, None)) for fit, params, budget, data, _ in fits]
    for (fit, _, budget, _, key), one, other in zip(fits, kept, fresh, strict=True):
        assert one.estimator_bytes == other.estimator_bytes, (fit.__name__, budget, key)
        assert one.rounds_used == other.rounds_used


def test_a_thread_reuses_its_own_matrices_and_never_another_threads() -> None:
    x, y, xv, yv = table(0)
    first = matrices.training_matrices("a", x, y, xv, yv)
    assert matrices.training_matrices("a", x, y, xv, yv) == first  # the same objects
    assert matrices.training_matrices("a", x, y, None, None)[1] is None  # no validation asked: not those
    assert matrices.training_matrices("b", x, y, xv, yv)[0] is not first[0]
    elsewhere: list[tuple] = []
    worker = threading.Thread(target=lambda: elsewhere.append(matrices.training_matrices("b", x, y, xv, yv)))
    worker.start()
    worker.join()
    assert elsewhere[0][0] is not matrices.training_matrices("b", x, y, xv, yv)[0]
    assert (
        matrices.training_matrices(None, x, y, xv, yv)[0]
        is not matrices.training_matrices(None, x, y, xv, yv)[0]
    )
