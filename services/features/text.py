"""Text features: a seeded split into train/validation/test, a byte-pair encoding trained on the
training split only, and the three token arrays in one safetensors file (no pickle)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import safetensors.numpy

from contracts import DatasetIngested, FeaturesBuilt, SplitSizes
from services.platform.artifacts import ArtifactStore, read_verified
from services.platform.ml.holdout import SPLITS, split_text
from services.platform.ml.textgen.tokenizer import encode, train_bpe

TOKENS_MEDIA_TYPE = "application/vnd.cairn.tokens+safetensors"
TRANSFORM_MEDIA_TYPE = "application/vnd.cairn.text-transform+json"


class TextFeatureProblem(Exception):
    pass


def tokens_file(tokens: dict[str, np.ndarray]) -> bytes:
    arrays = {k: np.ascontiguousarray(v, dtype=np.int32) for k, v in tokens.items()}
    return bytes(safetensors.numpy.save(arrays))


def build_text(ingested: DatasetIngested, store: ArtifactStore) -> FeaturesBuilt:
    ctx = ingested.context
    text = read_verified(ingested.dataset.uri, ingested.dataset.sha256).decode("utf-8")
    parts = split_text(text, ctx.seed)
    empty = [name for name in SPLITS if not parts[name].strip()]
    if empty:
        raise TextFeatureProblem(f"the {', '.join(empty)} split is empty: the corpus is too small")
    tokenizer = json.loads(train_bpe(parts["train"], ctx.tuning.vocab_size))
    tokens = {name: encode(tokenizer, parts[name]) for name in SPLITS}
    spec: dict[str, Any] = {
        "format": "cairn.text-transform.v1",
        "task": ctx.task.value,
        "tokenizer": tokenizer,
    }
    featureset = store.put_bytes(tokens_file(tokens), TOKENS_MEDIA_TYPE, ".safetensors")
    transform = store.put_bytes(json.dumps(spec, sort_keys=True).encode(), TRANSFORM_MEDIA_TYPE, ".json")
    return FeaturesBuilt(
        context=ctx,
        dataset=ingested.dataset,
        featureset=featureset,
        transform=transform,
        feature_columns=[],
        splits=SplitSizes(**{name: max(len(tokens[name]), 1) for name in SPLITS}),
    )
