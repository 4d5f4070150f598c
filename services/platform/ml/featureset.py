"""Reading a feature set: verified by hash, cached per process because it is immutable."""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pyarrow.parquet as pq

from services.platform.artifacts import read_verified
from services.platform.ml.transform import SPLIT_COLUMN, TARGET_COLUMN, TEST, TRAIN, VALIDATION

N_CLASSES_KEY = b"cairn.n_classes"


@dataclass(frozen=True)
class FeatureArrays:
    x: dict[int, np.ndarray]
    y: dict[int, np.ndarray]
    n_classes: int

    def split(self, which: int) -> tuple[np.ndarray, np.ndarray]:
        return self.x[which], self.y[which]


@lru_cache(maxsize=4)
def load_featureset(uri: str, sha256: str) -> FeatureArrays:
    """Content-addressed, so caching by hash can never serve stale data."""
    table = pq.read_table(io.BytesIO(read_verified(uri, sha256)))
    n_classes = int((table.schema.metadata or {}).get(N_CLASSES_KEY, b"0"))
    split = table.column(SPLIT_COLUMN).to_numpy()
    target = table.column(TARGET_COLUMN).to_numpy()
    features = [c for c in table.column_names if c not in (SPLIT_COLUMN, TARGET_COLUMN)]
    matrix = np.column_stack([table.column(c).to_numpy(zero_copy_only=False) for c in features]).astype(
        np.float32
    )
    xs, ys = {}, {}
    for which in (TRAIN, VALIDATION, TEST):
        mask = split == which
        xs[which] = np.ascontiguousarray(matrix[mask])
        ys[which] = target[mask]
    return FeatureArrays(xs, ys, n_classes)
