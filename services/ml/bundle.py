"""The model bundle: a JSON manifest (transform + estimator reference), content-addressed.

Loading verifies both hashes and never unpickles anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from contracts.types import ArtifactRef, ModelFamily, Task
from services.artifacts import ArtifactStore, read_verified
from services.ml import transform
from services.ml.families import Predictor

BUNDLE_MEDIA_TYPE = "application/vnd.cairn.model+json"


def save_bundle(
    store: ArtifactStore,
    *,
    estimator: bytes,
    estimator_format: str,
    spec: dict[str, Any],
    family: ModelFamily,
    params: dict[str, Any],
    budget: int,
) -> ArtifactRef:
    est_ref = store.put_bytes(
        estimator, "application/octet-stream", ".ubj" if "ubj" in estimator_format else ".json"
    )
    manifest = {
        "format": "cairn.model.v1",
        "family": family.value,
        "params": params,
        "budget": budget,
        "transform": spec,
        "estimator": {"format": estimator_format, "uri": est_ref.uri, "sha256": est_ref.sha256},
    }
    return store.put_bytes(json.dumps(manifest, sort_keys=True).encode(), BUNDLE_MEDIA_TYPE, ".json")


@dataclass
class LoadedModel:
    ref: ArtifactRef
    manifest: dict[str, Any]
    predictor: Predictor

    @property
    def spec(self) -> dict[str, Any]:
        return self.manifest["transform"]

    @property
    def task(self) -> Task:
        return Task(self.spec["task"])

    def predict_raw(self, frame: pd.DataFrame) -> np.ndarray:
        """Raw rows (arrival columns, no target) -> values or class probabilities."""
        return self.predictor.predict(transform.apply(self.spec, frame))

    def present(self, frame: pd.DataFrame) -> list[Any]:
        """Predictions as a client sees them: numbers, or {label, probabilities}."""
        out = self.predict_raw(frame)
        if self.task is Task.regression:
            return [float(v) for v in out]
        classes = self.spec["classes"]
        return [
            {
                "label": classes[int(row.argmax())],
                "probabilities": dict(zip(classes, map(float, row), strict=True)),
            }
            for row in out
        ]


def load_bundle(ref: ArtifactRef) -> LoadedModel:
    manifest = json.loads(read_verified(ref.uri, ref.sha256))
    if manifest.get("format") != "cairn.model.v1":
        raise ValueError(f"{ref.uri}: not a cairn model bundle")
    est = manifest["estimator"]
    data = read_verified(est["uri"], est["sha256"])
    task = Task(manifest["transform"]["task"])
    n_classes = len(manifest["transform"]["classes"])
    return LoadedModel(ref, manifest, Predictor(est["format"], data, task, n_classes))
