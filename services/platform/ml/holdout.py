"""The splits every step must agree on: features builds from them, evaluation scores the test part.

Kept here (not in the features service) so evaluation can re-derive the same holdout from the
snapshot without importing another service.
"""

from __future__ import annotations

import hashlib
import io

import pandas as pd
import pyarrow.parquet as pq

from contracts import ArtifactRef
from services.platform.artifacts import read_verified
from services.platform.ml import transform
from services.platform.ml.transform import TEST

CHUNK_LINES = 32
SPLITS = ("train", "validation", "test")


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


def holdout_frame(dataset: ArtifactRef, seed: int) -> pd.DataFrame:
    """The raw test rows of a snapshot, by the same split the features used."""
    frame = pq.read_table(io.BytesIO(read_verified(dataset.uri, dataset.sha256))).to_pandas()
    return frame[transform.assign_split(frame, seed) == TEST].reset_index(drop=True)


def holdout_text(dataset: ArtifactRef, seed: int) -> str:
    return split_text(read_verified(dataset.uri, dataset.sha256).decode("utf-8"), seed)["test"]
