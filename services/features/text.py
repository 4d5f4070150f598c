"""Text features: a seeded split into train/validation/test, a byte-pair encoding trained on the
training split only, and the three token arrays in one safetensors file (no pickle)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import safetensors.numpy

from contracts import ArtifactRef, DatasetIngested, FeaturesBuilt, SplitSizes
from services.artifacts import ArtifactStore, read_verified
from services.ml.textgen.tokenizer import encode, train_bpe

CHUNK_LINES = 32
SPLITS = ("train", "validation", "test")
TOKENS_MEDIA_TYPE = "application/vnd.cairn.tokens+safetensors"
TRANSFORM_MEDIA_TYPE = "application/vnd.cairn.text-transform+json"


class TextFeatureProblem(Exception):
    pass


def split_text(text: str, seed: int) -> dict[str, str]:
    """Chunks of lines, each placed by a seeded hash of its content (80/10/10): the same corpus
    and seed always give the same split, whatever else is in the corpus."""
    lines = text.splitlines(keepends=True)
    parts: dict[str, list[str]] = {name: [] for name in SPLITS}
    for i in range(0, len(lines), CHUNK_LINES):
        chunk = "".join(lines[i : i + CHUNK_LINES])
        u = int.from_bytes(hashlib.sha256(f"{seed}:{chunk}".encode()).digest()[:8], "big") / 2**64
        parts["train" if u < 0.8 else "validation" if u < 0.9 else "test"].append(chunk)
    return {name: "".join(chunks) for name, chunks in parts.items()}


def tokens_file(tokens: dict[str, np.ndarray]) -> bytes:
    return bytes(safetensors.numpy.save({k: np.ascontiguousarray(v, dtype=np.int32) for k, v in tokens.items()}))


def load_tokens(ref: ArtifactRef) -> dict[str, np.ndarray]:
    return safetensors.numpy.load(read_verified(ref.uri, ref.sha256))


def build_text(ingested: DatasetIngested, store: ArtifactStore) -> FeaturesBuilt:
    ctx = ingested.context
    text = read_verified(ingested.dataset.uri, ingested.dataset.sha256).decode("utf-8")
    parts = split_text(text, ctx.seed)
    empty = [name for name in SPLITS if not parts[name].strip()]
    if empty:
        raise TextFeatureProblem(f"the {', '.join(empty)} split is empty: the corpus is too small")
    tokenizer = json.loads(train_bpe(parts["train"], ctx.tuning.vocab_size))
    tokens = {name: encode(tokenizer, parts[name]) for name in SPLITS}
    spec: dict[str, Any] = {"format": "cairn.text-transform.v1", "task": ctx.task.value, "tokenizer": tokenizer}
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


def holdout_text(dataset: ArtifactRef, seed: int) -> str:
    return split_text(read_verified(dataset.uri, dataset.sha256).decode("utf-8"), seed)["test"]
