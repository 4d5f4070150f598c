"""The feature transform: fitted once on training rows, applied identically everywhere.

It travels inside every model bundle, so the inference server takes raw rows (the arrival
data's columns) and evaluation scores champion and challenger on the same raw holdout.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from contracts.types import ColumnKind, Task

MAX_CATEGORIES = 256
SPLIT_COLUMN = "__split"
TARGET_COLUMN = "__target"
TRAIN, VALIDATION, TEST = 0, 1, 2
_SPLIT_BOUNDS = (0.70, 0.85)


def column_kind(series: pd.Series) -> ColumnKind:
    if pd.api.types.is_bool_dtype(series):
        return ColumnKind.boolean
    if pd.api.types.is_numeric_dtype(series):
        return ColumnKind.numeric
    return ColumnKind.categorical


def infer_task(target: pd.Series) -> Task:
    """Classification for text, booleans and small-integer targets; regression otherwise."""
    kind = column_kind(target)
    if kind is not ColumnKind.numeric:
        return Task.classification
    values = target.dropna()
    if pd.api.types.is_integer_dtype(values) or (values % 1 == 0).all():
        return Task.classification if values.nunique() <= 20 else Task.regression
    return Task.regression


def assign_split(frame: pd.DataFrame, seed: int) -> np.ndarray:
    """Train/validation/test by a seeded hash of each row's values.

    Depends on neither row order nor partitioning, so any Dask partitioning of the same data
    gives the same split, and duplicate rows never straddle train and test.
    """
    hashed = pd.util.hash_pandas_object(frame, index=False, hash_key=f"cairn{seed:011d}"[:16]).to_numpy()
    u = (hashed >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return np.where(u < _SPLIT_BOUNDS[0], TRAIN, np.where(u < _SPLIT_BOUNDS[1], VALIDATION, TEST)).astype(
        np.int8
    )


def fit_spec(
    stats: dict[str, dict[str, Any]], kinds: dict[str, ColumnKind], target: str, task: Task, classes: list
) -> dict[str, Any]:
    """Build the JSON-able transform spec from training-split statistics (computed on Dask)."""
    columns = []
    for name, kind in kinds.items():
        if name == target:
            continue
        s = stats[name]
        if kind is ColumnKind.categorical:
            columns.append({"name": name, "kind": kind.value, "categories": s["categories"]})
        else:
            fill = s.get("mean")
            columns.append(
                {
                    "name": name,
                    "kind": kind.value,
                    "fill": 0.0 if fill is None or math.isnan(fill) else float(fill),
                }
            )
    return {
        "format": "cairn.transform.v1",
        "target": target,
        "task": task.value,
        "classes": classes,
        "columns": columns,
        "feature_columns": [c["name"] for c in columns],
    }


def input_schema(spec: dict[str, Any]) -> dict[str, str]:
    return {c["name"]: c["kind"] for c in spec["columns"]}


def apply(spec: dict[str, Any], frame: pd.DataFrame) -> np.ndarray:
    """Raw rows -> float32 feature matrix. Missing numerics get the training mean; unknown
    categories and missing categoricals become -1 (trees split them off)."""
    out = np.empty((len(frame), len(spec["columns"])), dtype=np.float32)
    for j, col in enumerate(spec["columns"]):
        name = col["name"]
        values = frame[name] if name in frame else pd.Series([None] * len(frame), index=frame.index)
        if col["kind"] == ColumnKind.categorical.value:
            lookup = {c: i for i, c in enumerate(col["categories"])}
            out[:, j] = values.map(lambda v, lookup=lookup: lookup.get(str(v), -1) if pd.notna(v) else -1)
        else:
            numeric = pd.to_numeric(values, errors="coerce").astype("float64")
            out[:, j] = numeric.fillna(col["fill"]).to_numpy()
    return out


def encode_target(spec: dict[str, Any], values: pd.Series) -> np.ndarray:
    if spec["task"] == Task.regression.value:
        return pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    lookup = {c: i for i, c in enumerate(spec["classes"])}
    return values.map(lambda v: lookup.get(str(v), -1)).to_numpy(dtype=np.int64)
