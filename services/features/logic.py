"""Feature building on Dask dataframes: statistics from the training split, one pass to encode.

Partition by partition, so memory is bounded by a partition, not the dataset. Deterministic:
the split is a seeded hash of row values and the statistics reduce in a fixed tree order.
"""

from __future__ import annotations

import io
import json
from typing import Any

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from contracts import ColumnKind, DatasetIngested, FeaturesBuilt, SplitSizes, Task
from services.platform.artifacts import ArtifactStore, read_verified
from services.platform.ml import transform
from services.platform.ml.featureset import N_CLASSES_KEY
from services.platform.ml.transform import SPLIT_COLUMN, TARGET_COLUMN, TEST, TRAIN, VALIDATION


class FeatureProblem(Exception):
    """The data cannot give usable features (for example an empty split)."""


def _with_split(frame: pd.DataFrame, seed: int) -> pd.DataFrame:
    return frame.assign(**{SPLIT_COLUMN: transform.assign_split(frame, seed)})


def _classes(values: pd.Series) -> list[str]:
    unique = values.dropna().unique()
    if pd.api.types.is_numeric_dtype(values):
        return [str(v) for v in sorted(unique)]
    return sorted(str(v) for v in unique)


def fit_transform_spec(ddf: dd.DataFrame, ingested: DatasetIngested) -> dict[str, Any]:
    ctx = ingested.context
    kinds = {c.name: c.kind for c in ingested.columns}
    train = ddf[ddf[SPLIT_COLUMN] == TRAIN]
    numeric = [n for n, k in kinds.items() if k is not ColumnKind.categorical and n != ctx.target]
    categorical = [n for n, k in kinds.items() if k is ColumnKind.categorical and n != ctx.target]
    lazy: dict[str, Any] = {}
    if numeric:
        lazy["means"] = train[numeric].astype("float64").mean()
    for name in categorical:
        lazy[f"counts:{name}"] = train[name].dropna().astype(str).value_counts()
    if ctx.task is Task.classification:
        lazy["classes"] = ddf[ctx.target].dropna().unique()
    (computed,) = dask.compute(lazy)
    stats: dict[str, dict[str, Any]] = {}
    for name in numeric:
        stats[name] = {"mean": float(computed["means"][name])}
    for name in categorical:
        counts = computed[f"counts:{name}"]
        ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        stats[name] = {"categories": [k for k, _ in ordered[: transform.MAX_CATEGORIES]]}
    classes = _classes(pd.Series(computed["classes"])) if "classes" in computed else []
    return transform.fit_spec(stats, kinds, ctx.target, ctx.task, classes)


def _encode_partition(frame: pd.DataFrame, spec: dict[str, Any]) -> pa.Table:
    matrix = transform.apply(spec, frame)
    columns = {name: matrix[:, j] for j, name in enumerate(spec["feature_columns"])}
    columns[TARGET_COLUMN] = transform.encode_target(spec, frame[spec["target"]])
    columns[SPLIT_COLUMN] = frame[SPLIT_COLUMN].to_numpy(dtype=np.int8)
    return pa.table(columns)


def build(ingested: DatasetIngested, store: ArtifactStore) -> FeaturesBuilt:
    ctx = ingested.context
    snapshot = read_verified(ingested.dataset.uri, ingested.dataset.sha256)
    # On this process's threads, and so with the tasks shuffle: left to choose, Dask picks p2p in a
    # process that holds a distributed client, and p2p runs only on a distributed worker.
    with dask.config.set({"scheduler": "threads", "num_workers": 2, "dataframe.shuffle.method": "tasks"}):
        ddf = dd.from_map(
            lambda i: _with_split(_row_group(snapshot, i), ctx.seed),
            list(range(pq.ParquetFile(io.BytesIO(snapshot)).num_row_groups)),
        )
        spec = fit_transform_spec(ddf, ingested)
        sizes = ddf[SPLIT_COLUMN].value_counts().compute().to_dict()
        for which, name in ((TRAIN, "train"), (VALIDATION, "validation"), (TEST, "test")):
            if sizes.get(which, 0) < 1:
                raise FeatureProblem(f"the {name} split is empty: {ingested.rows} rows are too few")
        buf = io.BytesIO()
        writer = None
        for part in ddf.to_delayed():
            table = _encode_partition(part.compute(), spec)
            if writer is None:
                metadata = {N_CLASSES_KEY: str(len(spec["classes"])).encode()}
                writer = pq.ParquetWriter(buf, table.schema.with_metadata(metadata), compression="zstd")
            writer.write_table(table.replace_schema_metadata(writer.schema.metadata))
        assert writer is not None
        writer.close()
    featureset = store.put_bytes(buf.getvalue(), "application/vnd.apache.parquet", ".parquet")
    transform_ref = store.put_bytes(
        json.dumps(spec, sort_keys=True).encode(), "application/vnd.cairn.transform+json", ".json"
    )
    return FeaturesBuilt(
        context=ctx,
        dataset=ingested.dataset,
        featureset=featureset,
        transform=transform_ref,
        feature_columns=spec["feature_columns"],
        splits=SplitSizes(train=sizes[TRAIN], validation=sizes[VALIDATION], test=sizes[TEST]),
    )


def _row_group(snapshot: bytes, index: int) -> pd.DataFrame:
    return pq.ParquetFile(io.BytesIO(snapshot)).read_row_group(index).to_pandas()
