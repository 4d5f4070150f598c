"""Model families: fit on arrays, predict, and serialise to native, non-pickle formats.

- xgboost: gradient boosting (native API), saved as XGBoost UBJSON.
- random_forest: XGBoost's random-forest mode (one round of `num_parallel_tree` bagged trees,
  row and per-node column subsampling), also UBJSON; far faster than scikit-learn's forest on
  the same rows, which is what keeps 80 trials within budget on two cores.
- linear: ridge or logistic regression on standardised features, saved as plain JSON numbers.
- mlp: a PyTorch MLP, in its own module (services.platform.ml.torch_mlp); `services.platform.ml.registry` puts
  them all under one name each, so this module imports no other family.

Every fit is single-threaded and seeded: Dask supplies the parallelism, and the same inputs
give bit-identical model files.

XGBoost and scikit-learn are imported where a model is fitted or loaded, not with this module:
tuning reads the families' defaults and would otherwise pay seconds of start-up for libraries it
never calls (measured with `python -X importtime`).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from contracts.types import Metric, ModelFamily, Task
from services.platform.ml.fitted import FitRequest, Fitted
from services.platform.ml.matrices import training_matrices

EARLY_STOPPING_ROUNDS = 20


def _xgb_objective(task: Task, n_classes: int) -> dict[str, Any]:
    if task is Task.regression:
        return {"objective": "reg:squarederror", "eval_metric": "rmse"}
    if n_classes <= 2:
        return {"objective": "binary:logistic", "eval_metric": "logloss"}
    return {"objective": "multi:softprob", "eval_metric": "mlogloss", "num_class": n_classes}


def rf_trees(budget: int) -> int:
    """Forest size for a budget: a third of the boosting rounds (trees are deeper), at least 10."""
    return max(10, budget // 3)


def _xgb_base(task: Task, n_classes: int, seed: int) -> dict[str, Any]:
    base = {"tree_method": "hist", "nthread": 1, "seed": seed, "verbosity": 0}
    return {**base, **_xgb_objective(task, n_classes)}


def fit_xgboost(r: FitRequest) -> Fitted:
    """Boosting for up to `budget` rounds; with a validation split, stops early and keeps the best."""
    params, budget, task, n_classes, seed = r.params, r.budget, r.task, r.n_classes, r.seed
    x_train, y_train, x_valid, y_valid = r.x_train, r.y_train, r.x_valid, r.y_valid
    import xgboost as xgb

    dtrain, dvalid = training_matrices(r.data_key, x_train, y_train, x_valid, y_valid)
    evals = []
    kwargs: dict[str, Any] = {}
    if dvalid is not None:
        evals = [(dvalid, "valid")]
        kwargs["early_stopping_rounds"] = EARLY_STOPPING_ROUNDS
    booster = xgb.train(
        {**_xgb_base(task, n_classes, seed), **params},
        dtrain,
        num_boost_round=budget,
        evals=evals,
        verbose_eval=False,
        **kwargs,
    )
    if evals:
        booster = booster[: booster.best_iteration + 1]
    rounds = booster.num_boosted_rounds()
    return Fitted(ModelFamily.xgboost, bytes(booster.save_raw("ubj")), "xgboost-ubj", rounds)


def fit_random_forest(r: FitRequest) -> Fitted:
    """One round of `rf_trees(budget)` bagged trees; the validation split is not used."""
    params, budget, task, n_classes, seed = r.params, r.budget, r.task, r.n_classes, r.seed
    x_train, y_train = r.x_train, r.y_train
    booster_params = {
        **_xgb_base(task, n_classes, seed),
        "learning_rate": 1.0,
        "num_parallel_tree": rf_trees(budget),
        "subsample": params.get("subsample", 0.632),
        "colsample_bynode": params.get("colsample_bynode", 0.6),
        "max_depth": params.get("max_depth", 10),
        "min_child_weight": params.get("min_child_weight", 1.0),
    }
    import xgboost as xgb

    # With the validation split though the forest does not use it: a study's boosted fits of the same
    # feature set then find their pair kept.
    dtrain, _ = training_matrices(r.data_key, x_train, y_train, r.x_valid, r.y_valid)
    booster = xgb.train(booster_params, dtrain, num_boost_round=1)
    return Fitted(ModelFamily.random_forest, bytes(booster.save_raw("ubj")), "xgboost-ubj", 1)


def fit_linear(r: FitRequest) -> Fitted:
    """Ridge or logistic regression on standardised features; budget and validation are not used."""
    from sklearn.linear_model import LogisticRegression, Ridge

    params, task, seed, x, y = r.params, r.task, r.seed, r.x_train, r.y_train
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std[std == 0] = 1.0
    z = (x - mean) / std
    alpha = float(params.get("alpha", 1.0))
    if task is Task.regression:
        model = Ridge(alpha=alpha).fit(z, y)
        coef = np.atleast_2d(model.coef_)
        intercept = np.atleast_1d(model.intercept_)
        classes: list[int] = []
    else:
        model = LogisticRegression(C=1.0 / alpha, max_iter=500, random_state=seed).fit(z, y)
        coef, intercept, classes = model.coef_, model.intercept_, model.classes_.tolist()
    doc = {
        "mean": mean.tolist(),
        "std": std.tolist(),
        "coef": coef.tolist(),
        "intercept": intercept.tolist(),
        "classes": classes,
        "task": task.value,
    }
    return Fitted(ModelFamily.linear, json.dumps(doc, sort_keys=True).encode(), "linear-json", 1)


class TreePredictor:
    """A loaded `xgboost-ubj` model: regression values, or class probabilities (binary widened)."""

    def __init__(self, data: bytes, task: Task, n_classes: int):
        import xgboost as xgb

        self.task = task
        self.booster = xgb.Booster(params={"nthread": 1})
        self.booster.load_model(bytearray(data))

    def predict(self, x: np.ndarray) -> np.ndarray:
        import xgboost as xgb

        out = self.booster.predict(xgb.DMatrix(x, nthread=1))
        if self.task is Task.classification and out.ndim == 1:
            out = np.column_stack([1 - out, out])
        return out


class LinearPredictor:
    """A loaded `linear-json` model: plain numpy over the stored coefficients."""

    def __init__(self, data: bytes, task: Task, n_classes: int):
        self.task = task
        self.n_classes = n_classes
        self.linear = json.loads(data)

    def predict(self, x: np.ndarray) -> np.ndarray:
        lin = self.linear
        z = (x - np.asarray(lin["mean"])) / np.asarray(lin["std"])
        scores = z @ np.asarray(lin["coef"]).T + np.asarray(lin["intercept"])
        if self.task is Task.regression:
            return scores[:, 0]
        if scores.shape[1] == 1:
            p = 1 / (1 + np.exp(-scores[:, 0]))
            probs = np.column_stack([1 - p, p])
        else:
            e = np.exp(scores - scores.max(axis=1, keepdims=True))
            probs = e / e.sum(axis=1, keepdims=True)
        full = np.zeros((len(x), self.n_classes))
        full[:, lin["classes"]] = probs
        return full


def import_tree_library() -> None:
    """Import XGBoost ahead of need: a model server calls this while it starts, so that its first
    swap to a tree model is not also seconds of import while the deployment is already announced."""
    import xgboost  # noqa: F401


def default_metric(task: Task) -> Metric:
    if task is Task.text_generation:
        return Metric.perplexity
    return Metric.rmse if task is Task.regression else Metric.log_loss
