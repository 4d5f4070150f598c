"""The model bundle: a JSON manifest (transform + estimator reference), content-addressed.

Loading (services.platform.model_loading) verifies both hashes and never unpickles anything.
Tables: the transform is the feature spec and the estimator predicts. Text: the transform
carries the tokenizer and the estimator is a safetensors checkpoint with its model config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from contracts.types import ArtifactRef, ModelFamily, Task
from services.platform.artifacts import ArtifactStore
from services.platform.ml import transform
from services.platform.ml.registry import Model

BUNDLE_MEDIA_TYPE = "application/vnd.cairn.model+json"
_SUFFIX = {"xgboost-ubj": ".ubj", "linear-json": ".json"}


def save_bundle(
    store: ArtifactStore,
    *,
    estimator: bytes,
    estimator_format: str,
    spec: dict[str, Any],
    family: ModelFamily,
    params: dict[str, Any],
    budget: int,
    config: str | None = None,
) -> ArtifactRef:
    suffix = _SUFFIX.get(estimator_format, ".safetensors")
    est_ref = store.put_bytes(estimator, "application/octet-stream", suffix)
    estimator_doc: dict[str, Any] = {"format": estimator_format, "uri": est_ref.uri, "sha256": est_ref.sha256}
    if config is not None:
        estimator_doc["config"] = json.loads(config)
    manifest = {
        "format": "cairn.model.v1",
        "family": family.value,
        "params": params,
        "budget": budget,
        "transform": spec,
        "estimator": estimator_doc,
    }
    return store.put_bytes(json.dumps(manifest, sort_keys=True).encode(), BUNDLE_MEDIA_TYPE, ".json")


@dataclass
class LoadedModel:
    ref: ArtifactRef
    manifest: dict[str, Any]
    predictor: Model | None = None
    checkpoint: bytes | None = None

    @property
    def spec(self) -> dict[str, Any]:
        return self.manifest["transform"]

    @property
    def task(self) -> Task:
        return Task(self.spec["task"])

    def predict_raw(self, frame: pd.DataFrame) -> np.ndarray:
        """Raw rows (arrival columns, no target) -> values or class probabilities."""
        if self.predictor is None:
            raise TypeError("a text model generates; it does not predict rows")
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

    def generate(self, prompt: str, max_tokens: int, temperature: float, top_k: int | None, seed: int) -> str:
        from services.platform.ml.textgen.generate import generate

        return generate(self.checkpoint, self.manifest["estimator"]["config"], self.spec["tokenizer"], prompt,
                        max_tokens, temperature, top_k, seed)

    def perplexity(self, text: str) -> float:
        """Perplexity of this model on raw text, tokenized with its own tokenizer."""
        from services.platform.ml.textgen.tokenizer import encode
        from services.platform.ml.textgen.train import perplexity

        tokens = encode(self.spec["tokenizer"], text)
        return perplexity(self.checkpoint, self.manifest["estimator"]["config"], tokens, device="cpu")

