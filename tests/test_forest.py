"""The compiled forest answers as XGBoost does, to the bit, or it does not serve.

Real XGBoost models, real numba: every comparison below is `np.array_equal` on float32 output, the
same bits the endpoint would have answered with XGBoost's own predict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xgboost as xgb

from services.serving.forest import CompiledForest, compile_forest, probe_rows

ROOT = Path(__file__).resolve().parent.parent


def _table(rows: int = 3000, features: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features)).astype(np.float32)
    x[:, 1] = rng.integers(-1, 5, rows)  # category codes, -1 for unknown, as serving makes them
    x[:, 2] = np.round(x[:, 2], 1)  # many ties: values exactly on thresholds
    y = 3 * x[:, 0] + np.sin(x[:, 3]) * x[:, 1] + rng.normal(0, 0.1, rows)
    x[rng.random(x.shape) < 0.05] = np.nan  # missing values take each node's default way
    return x, y


def _train(params: dict, rounds: int, x: np.ndarray, y: np.ndarray, **kwargs) -> xgb.Booster:
    base = {"nthread": 1, "seed": 0, "objective": "reg:squarederror", "tree_method": "hist"}
    return xgb.train({**base, **params}, xgb.DMatrix(x, label=y, nthread=1), rounds, **kwargs)


def _same_as_xgboost(booster: xgb.Booster, x: np.ndarray) -> None:
    forest = compile_forest(booster)
    assert forest is not None
    finite = np.where(np.isnan(x), np.float32(-1), x)  # serving's matrices: no missing value
    for data in (x, finite):
        for rows in (data[:1], data[:7], data[:8], data[:13], data[:600], data):  # eights, tails, blocks
            ours, theirs = forest.predict(rows), booster.inplace_predict(rows)
            assert ours.dtype == theirs.dtype == np.float32
            assert np.array_equal(ours, theirs)


@pytest.mark.parametrize(
    ("params", "rounds"),
    [
        ({"max_depth": 6, "learning_rate": 0.1}, 120),  # cairn's default kind
        ({"max_depth": 1}, 30),  # stumps
        ({"max_depth": 10, "min_child_weight": 0}, 20),  # deep and ragged: many leaves above the bottom
        ({"max_depth": 3, "num_parallel_tree": 4, "subsample": 0.7, "colsample_bynode": 0.6}, 5),  # forests
        ({"max_depth": 4, "base_score": 123.25}, 40),
        ({"grow_policy": "lossguide", "max_leaves": 24, "max_depth": 0}, 25),
    ],
)
def test_compiled_forest_gives_xgboosts_bits(params: dict, rounds: int) -> None:
    x, y = _table()
    _same_as_xgboost(_train(params, rounds, x, y), x)


def test_an_early_stopped_model_and_a_forest_of_bare_leaves() -> None:
    x, y = _table()
    stopped = _train(
        {"max_depth": 5},
        400,
        x[:2000],
        y[:2000],
        evals=[(xgb.DMatrix(x[2000:], label=y[2000:]), "v")],
        early_stopping_rounds=5,
        verbose_eval=False,
    )
    _same_as_xgboost(stopped, x)
    constant = _train({"max_depth": 4}, 3, x, np.full(len(x), 2.5))  # no split gains anything: single leaves
    _same_as_xgboost(constant, x)


def test_the_probe_rows_catch_a_threshold_one_float_off() -> None:
    """The check at load is what keeps a compiled model from serving different answers: a forest whose
    thresholds are each moved by one float32 must differ from XGBoost on the probe rows."""
    x, y = _table()
    booster = _train({"max_depth": 6}, 40, x, y)
    learner = json.loads(booster.save_raw("json"))["learner"]
    trees = learner["gradient_booster"]["model"]["trees"]
    probes = [probe_rows(trees, x.shape[1], missing) for missing in (False, True)]
    exact = compile_forest(booster)
    assert all(np.array_equal(exact.predict(p), booster.inplace_predict(p)) for p in probes)
    for tree in trees:
        tree["split_conditions"] = [
            float(np.nextafter(np.float32(v), np.float32(np.inf))) if left >= 0 else v
            for v, left in zip(tree["split_conditions"], tree["left_children"], strict=True)
        ]
    nudged = CompiledForest(trees, exact.base, exact.depth, exact.features)
    for p in probes:  # each probe alone catches it, the walk with missing values and the one without
        assert not np.array_equal(nudged.predict(p), booster.inplace_predict(p))


@pytest.mark.parametrize(
    ("params", "why"),
    [
        ({"objective": "binary:logistic"}, "objective binary:logistic"),
        ({"objective": "multi:softprob", "num_class": 3}, "objective multi:softprob"),
        ({"booster": "dart", "rate_drop": 0.1}, "booster dart"),
    ],
)
def test_what_the_walk_does_not_reproduce_keeps_xgboosts_predict(params: dict, why: str, caplog) -> None:
    x, y = _table()
    labels = np.clip(np.round(np.abs(y)), 0, 2) if "num_class" in params else (y > 0).astype(float)
    target = labels if params.get("objective", "").startswith(("binary", "multi")) else y
    with caplog.at_level("INFO", logger="services.serving.forest"):
        assert compile_forest(_train({"max_depth": 3, **params}, 5, x, target)) is None
    assert why in caplog.text


def test_categorical_splits_keep_xgboosts_predict(caplog) -> None:
    rng = np.random.default_rng(0)
    codes, other = rng.integers(0, 12, 3000), rng.normal(size=3000)
    data = xgb.DMatrix(
        np.column_stack([codes, other]).astype(np.float32),
        label=np.sin(codes) * 3 + other,
        feature_types=["c", "q"],
        enable_categorical=True,
    )
    booster = xgb.train({"nthread": 1, "max_depth": 3, "tree_method": "hist"}, data, 5)
    with caplog.at_level("INFO", logger="services.serving.forest"):
        assert compile_forest(booster) is None
    assert "categorical splits" in caplog.text


def test_where_no_cache_can_be_written_the_walk_still_compiles() -> None:
    """A read-only image: numba refuses `cache=True` when it finds nowhere to write (played here by
    leaving it only IPython's locator, which applies to no file), and without the fallback the import
    itself fails; the forest compiles uncached and gives XGBoost's answers."""
    code = (
        "import numpy as np, xgboost as xgb\n"
        "from services.serving import forest\n"
        "rng = np.random.default_rng(0); x = rng.normal(size=(500, 3)).astype(np.float32)\n"
        "b = xgb.train({'nthread': 1, 'max_depth': 4}, xgb.DMatrix(x, label=x[:, 0] * 2), 10)\n"
        "assert np.array_equal(forest.compile_forest(b).predict(x), b.inplace_predict(x))\n"
    )
    env = {**os.environ, "NUMBA_CACHE_LOCATOR_CLASSES": "_IPythonCacheLocator"}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (lambda tree: tree["split_indices"].__setitem__(0, 50), "splits on feature 50 of 7"),
        (lambda tree: tree["left_children"].__setitem__(1, 0), "children are not after it"),  # a loop
        (lambda tree: tree["right_children"].__setitem__(0, 10**6), "children are not after it"),
    ],
)
def test_a_hand_edited_model_that_xgboost_loads_is_not_compiled(edit, why: str, caplog) -> None:
    """The attacker's model file (or a corrupt one): XGBoost loads a tree that splits on a feature
    past the row's end, or whose child points back up, but the walk reads by these indices
    unchecked and the layout would follow the loop forever. It keeps XGBoost's predict."""
    x, y = _table()
    doc = json.loads(_train({"max_depth": 4}, 5, x, y).save_raw("json"))
    edit(doc["learner"]["gradient_booster"]["model"]["trees"][2])
    edited = xgb.Booster()
    edited.load_model(bytearray(json.dumps(doc).encode()))  # XGBoost takes it
    with caplog.at_level("INFO", logger="services.serving.forest"):
        assert compile_forest(edited) is None
    assert "tree 2: node" in caplog.text and why in caplog.text


def test_rows_of_another_width_are_refused() -> None:
    x, y = _table()
    forest = compile_forest(_train({"max_depth": 3}, 5, x, y))
    with pytest.raises(ValueError, match="expected rows of 7 features"):
        forest.predict(x[:, :3])
