"""An XGBoost regressor's trees compiled for serving, with XGBoost's answers to the bit.

Why: XGBoost's `inplace_predict` costs about 0.3 ms per call before any tree is walked (its Python
wrapper and its C++ set-up), so a one-row batch costs some 50 times its walk (docs/SERVING.md, "The
compiled forest"). Here every tree is laid out as a complete binary tree of the forest's depth, one
array per field, and a row steps down with `node = 2*node + 1 + (x[feature] >= threshold)`: no child
pointers, eight rows down each tree together, compiled by numba. Per row on large batches it takes
about a third of XGBoost's time; the call itself costs microseconds.

The same answer, by construction: the float32 comparisons XGBoost makes (`x < threshold` goes
left, a missing value goes its node's default way), the leaf values added in tree order onto the
base score in float32. A leaf above the bottom passes its value down the left-most path (its
threshold is NaN, which no value reaches or exceeds). Only what that covers is compiled: gbtree
regressors whose prediction is the margin itself, one target, numerical splits, a bounded size;
anything else keeps XGBoost's predict. And each compiled model is checked at load against XGBoost on
rows made from its own thresholds (each one, the floats either side, infinities; once without
missing values and once with, so both ways of the walk are tried): one differing bit and the model
keeps XGBoost's predict (tests/test_forest.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import numba
import numpy as np

log = logging.getLogger(__name__)

BLOCK = 512  # rows every tree walks in turn: 18 KB of nine features, within the L1/L2 cache
MAX_SLOTS = 1 << 21  # trees x bottom slots: 2 M slots, about 26 MB; beyond it, XGBoost's predict
IDENTITY_OBJECTIVES = frozenset({"reg:squarederror"})  # the margin is the prediction (what cairn trains)
PROBE_ROWS = 512


ONE = np.uint64(1)


@numba.njit(inline="always")
def _down(x, row, node, feature, threshold, nan_right, missing):  # noqa: ANN001, ANN202, PLR0913 - numba types
    """One level down: node 2i+1 when the row's value is below the threshold (XGBoost's `x < t`
    goes left), else 2i+2; a missing value goes its node's default way. `x` is the matrix
    flattened and `row` the offset of the row in it. Every index is unsigned: numba then drops its
    check for negative indices, which with a view per row made the walk 2.4 times slower."""
    v = x[row + np.uint64(feature[node])]
    if missing:
        return (node << ONE) + ONE + np.uint64((v >= threshold[node]) | ((v != v) & nan_right[node]))
    return (node << ONE) + ONE + np.uint64(v >= threshold[node])


def _walk_for(missing: bool) -> Callable:
    """The walk compiled for batches with NaN (`missing`) or without (serving's matrices never have
    one): a constant here, so the step without the missing-value test is compiled on its own (a
    test left in the loop made it half as fast again)."""

    def walk(x, width, feature, threshold, nan_right, leaf, depth, base, out):  # noqa: ANN001, ANN202, PLR0913
        """out[row] = base + each tree's leaf for the row, added in tree order in float32. Eight
        rows walk each tree together, their nodes in registers: eight independent chains of loads
        for the CPU to overlap. `x` is the matrix flattened (rows of `width`)."""
        rows = out.shape[0]
        trees, inner = feature.shape
        w, bottom = np.uint64(width), np.uint64(inner)
        out[:] = base
        for start in range(0, rows, BLOCK):  # a block of rows stays in the cache while every tree walks it
            stop = min(start + BLOCK, rows)
            eights = stop - (stop - start) % 8
            for t in range(trees):
                f, th, nr, values = feature[t], threshold[t], nan_right[t], leaf[t]
                for i in range(start, eights, 8):
                    r0 = np.uint64(i) * w  # each row's offset in x, unsigned
                    r1 = r0 + w
                    r2 = r1 + w
                    r3 = r2 + w
                    r4 = r3 + w
                    r5 = r4 + w
                    r6 = r5 + w
                    r7 = r6 + w
                    n0 = n1 = n2 = n3 = n4 = n5 = n6 = n7 = np.uint64(0)
                    for _ in range(depth):
                        n0 = _down(x, r0, n0, f, th, nr, missing)
                        n1 = _down(x, r1, n1, f, th, nr, missing)
                        n2 = _down(x, r2, n2, f, th, nr, missing)
                        n3 = _down(x, r3, n3, f, th, nr, missing)
                        n4 = _down(x, r4, n4, f, th, nr, missing)
                        n5 = _down(x, r5, n5, f, th, nr, missing)
                        n6 = _down(x, r6, n6, f, th, nr, missing)
                        n7 = _down(x, r7, n7, f, th, nr, missing)
                    out[i] += values[n0 - bottom]
                    out[i + 1] += values[n1 - bottom]
                    out[i + 2] += values[n2 - bottom]
                    out[i + 3] += values[n3 - bottom]
                    out[i + 4] += values[n4 - bottom]
                    out[i + 5] += values[n5 - bottom]
                    out[i + 6] += values[n6 - bottom]
                    out[i + 7] += values[n7 - bottom]
                for i in range(eights, stop):
                    n = np.uint64(0)
                    for _ in range(depth):
                        n = _down(x, np.uint64(i) * w, n, f, th, nr, missing)
                    out[i] += values[n - bottom]
        return out

    return _jit(walk)


def _jit(function: Callable) -> Callable:
    """numba's compiled `function`, its machine code cached beside this module (or in the user's
    cache directory) so that a restart loads it in about 0.3 s instead of compiling it for 1 to 2;
    uncached where neither is writable (a read-only image), which numba refuses as an error."""
    try:
        return numba.njit(nogil=True, cache=True)(function)
    except RuntimeError:
        return numba.njit(nogil=True)(function)


_walk_finite, _walk_missing = _walk_for(missing=False), _walk_for(missing=True)


class CompiledForest:
    """The arrays the walk reads, built from XGBoost's JSON model."""

    def __init__(self, trees: list[dict[str, Any]], base: np.float32, depth: int, features: int):
        inner, count = (1 << depth) - 1, len(trees)
        self.depth, self.base, self.features = depth, base, features
        self.feature = np.zeros((count, inner), np.uint32)
        self.threshold = np.full((count, inner), np.nan, np.float32)  # NaN: a pass-through, always left
        self.nan_right = np.zeros((count, inner), np.bool_)
        self.leaf = np.zeros((count, inner + 1), np.float32)
        for t, tree in enumerate(trees):
            self._place(t, tree, inner)

    def _place(self, t: int, tree: dict[str, Any], inner: int) -> None:
        left, right = tree["left_children"], tree["right_children"]
        # float64 first: the JSON holds each float32 in its shortest round-trip text
        value = np.asarray(tree["split_conditions"], np.float64).astype(np.float32)
        stack = [(0, 0, 0)]  # (XGBoost's node id, slot in the complete tree, level)
        while stack:
            node, slot, level = stack.pop()
            if left[node] < 0:
                for _ in range(self.depth - level):
                    slot = 2 * slot + 1  # the left-most bottom slot below: where pass-throughs lead
                self.leaf[t, slot - inner] = value[node]
                continue
            self.feature[t, slot] = tree["split_indices"][node]
            self.threshold[t, slot] = value[node]
            self.nan_right[t, slot] = not tree["default_left"][node]
            stack += [(left[node], 2 * slot + 1, level + 1), (right[node], 2 * slot + 2, level + 1)]

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.features:  # the walk reads x[row, feature] unchecked
            raise ValueError(f"expected rows of {self.features} features, got shape {x.shape}")
        out = np.empty(len(x), np.float32)
        walk = _walk_missing if np.isnan(x).any() else _walk_finite
        return walk(
            x.reshape(-1),
            self.features,
            self.feature,
            self.threshold,
            self.nan_right,
            self.leaf,
            self.depth,
            self.base,
            out,
        )


def warm() -> None:
    """Compile both walks ahead of need (2 to 3 s; about half a second from numba's cache): a model
    server calls this while it starts, so that its first swap to a tree model is not also a
    compilation."""
    stump = {
        "left_children": [1, -1, -1],
        "right_children": [2, -1, -1],
        "split_indices": [0, 0, 0],
        "split_conditions": [0.5, -1.0, 1.0],
        "default_left": [1, 0, 0],
    }
    forest = CompiledForest([stump], np.float32(0), 1, 1)
    for x in (np.zeros((1, 1), np.float32), np.full((1, 1), np.nan, np.float32)):  # both walks
        forest.predict(x)


def compile_forest(booster: Any) -> CompiledForest | None:  # noqa: ANN401 - an xgboost.Booster
    """The booster's compiled forest, or None where it is outside what the walk reproduces or
    where it differs from XGBoost on the probe rows (then XGBoost's own predict serves)."""
    learner = json.loads(booster.save_raw("json"))["learner"]
    why = _unsupported(learner)
    if why is None:
        trees = learner["gradient_booster"]["model"]["trees"]
        depth = max((_depth(tree) for tree in trees), default=0)
        if len(trees) << depth > MAX_SLOTS:
            why = f"{len(trees)} trees of depth {depth} exceed {MAX_SLOTS} slots"
    if why is not None:
        log.info("XGBoost's own predict serves this model: %s", why)
        return None
    base = np.float32(_base_scores(learner["learner_model_param"]["base_score"])[0])
    features = int(learner["learner_model_param"]["num_feature"])
    forest = CompiledForest(trees, base, depth, features)
    probes = [probe_rows(trees, features, missing) for missing in (False, True)]  # both ways of the walk
    if not all(np.array_equal(forest.predict(p), booster.inplace_predict(p)) for p in probes):
        log.warning(
            "the compiled forest differs from XGBoost on its probe rows: XGBoost's own predict serves"
        )
        return None
    return forest


def _unsupported(learner: dict[str, Any]) -> str | None:
    params = learner["learner_model_param"]
    objective = learner["objective"]["name"]
    if objective not in IDENTITY_OBJECTIVES:
        return f"objective {objective}"
    if learner["gradient_booster"]["name"] != "gbtree":
        return f"booster {learner['gradient_booster']['name']}"
    if int(params.get("num_target", 1)) != 1 or int(params.get("num_class", 0)) > 1:
        return "more than one output"
    if len(_base_scores(params["base_score"])) != 1:
        return "more than one base score"
    trees = learner["gradient_booster"]["model"]["trees"]
    if any(tree.get("categories_nodes") or any(tree.get("split_type", [])) for tree in trees):
        return "categorical splits"
    features = int(params["num_feature"])
    return next(
        (f"tree {t}: {why}" for t, tree in enumerate(trees) if (why := _malformed(tree, features))), None
    )


def _malformed(tree: dict[str, Any], features: int) -> str | None:
    """What makes a tree unsafe to lay out and walk. XGBoost loads such a model (a hand-edited
    file: a feature past the row's end, a child pointing back up), but the walk reads memory by
    these indices unchecked, and a loop of children would never end the layout. XGBoost always
    numbers a node's children after it; requiring that rules out loops."""
    left, right, split = tree["left_children"], tree["right_children"], tree["split_indices"]
    n = len(left)
    if not n or any(
        len(tree[k]) != n for k in ("right_children", "split_indices", "split_conditions", "default_left")
    ):
        return "fields of different lengths"
    for node in range(n):
        if left[node] < 0 and right[node] < 0:
            continue
        if not (node < left[node] < n and node < right[node] < n):
            return f"node {node}'s children are not after it"
        if not 0 <= split[node] < features:
            return f"node {node} splits on feature {split[node]} of {features}"
    return None


def _base_scores(text: str) -> list[float]:
    """XGBoost 3 writes "[5.7384385E3]", XGBoost 2 "5.7384385E3"."""
    return [float(v) for v in text.strip().strip("[]").split(",") if v.strip()]


def _depth(tree: dict[str, Any]) -> int:
    left, right = tree["left_children"], tree["right_children"]
    level = [0] * len(left)
    for node in range(len(left)):  # XGBoost numbers a node's children after it
        if left[node] >= 0:
            level[left[node]] = level[right[node]] = level[node] + 1
    return max(level)


def probe_rows(
    trees: list[dict[str, Any]], features: int, missing: bool, rows: int = PROBE_ROWS
) -> np.ndarray:
    """Rows whose every value sits on a split's edge: each threshold the forest uses, the float32s
    either side, the infinities and, if `missing`, NaN, drawn per feature with a fixed seed."""
    special = [np.inf, -np.inf, 0.0] + ([np.nan] if missing else [])
    edges: list[list[float]] = [list(special) for _ in range(features)]
    for tree in trees:
        for node, feature in enumerate(tree["split_indices"]):
            if tree["left_children"][node] >= 0:
                edges[feature].append(float(np.float32(tree["split_conditions"][node])))
    rng = np.random.default_rng(0)
    x = np.empty((rows, features), np.float32)
    for f, values in enumerate(edges):
        at = np.asarray(values, np.float32)
        at = np.concatenate([at, np.nextafter(at, np.float32(-np.inf)), np.nextafter(at, np.float32(np.inf))])
        x[:, f] = rng.choice(at, rows)
    return x
