"""Value types shared by the event models: validated identifiers, hashes and enums."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

Sha256 = Annotated[
    str,
    StringConstraints(pattern=r"^[0-9a-f]{64}$"),
    Field(description="Lower-case hex SHA-256 digest."),
]
EventId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$"),
    Field(description="Event id: letters, digits and . _ : - (usable as a Nats-Msg-Id)."),
]
ModelName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_-]*$"),
    Field(description="Registered model name: lower-case letters, digits, '_' and '-'."),
]
ColumnName = Annotated[str, StringConstraints(min_length=1, max_length=256)]
# No whitespace and no control characters: a NUL would reach path and URL handling as is.
Uri = Annotated[
    str,
    StringConstraints(
        min_length=1,
        max_length=2048,
        pattern=r"^[A-Za-z][A-Za-z0-9+.-]*://[^\s\x00-\x1f\x7f]+$|^[^\s:\x00-\x1f\x7f][^\s\x00-\x1f\x7f]*$",
    ),
    Field(description="A URL with a scheme (file://, s3://, ...) or a plain path; no control characters."),
]
StudyId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$"),
    Field(description="Study id: letters, digits, '_' and '-' (a token of tuning's KV keys)."),
]
RunId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$"),
    Field(description="MLflow run id: letters, digits, '_' and '-' (it reaches MLflow's API and store)."),
]
ParamValue = bool | int | float | str


class Contract(BaseModel):
    """Base for every payload: immutable, unknown fields refused, so typos surface at the edge."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_enum_values=False)


class Task(StrEnum):
    regression = "regression"
    classification = "classification"
    text_generation = "text_generation"


class DataFormat(StrEnum):
    csv = "csv"
    parquet = "parquet"
    jsonl = "jsonl"
    text = "text"


class ModelFamily(StrEnum):
    xgboost = "xgboost"
    random_forest = "random_forest"
    linear = "linear"
    mlp = "mlp"
    transformer = "transformer"

    @property
    def uses_torch(self) -> bool:
        return self in (ModelFamily.mlp, ModelFamily.transformer)


class SearchStrategy(StrEnum):
    random = "random"
    asha = "asha"


class Metric(StrEnum):
    rmse = "rmse"
    mae = "mae"
    r2 = "r2"
    accuracy = "accuracy"
    f1 = "f1"
    roc_auc = "roc_auc"
    log_loss = "log_loss"
    perplexity = "perplexity"

    @property
    def higher_is_better(self) -> bool:
        return self in (Metric.r2, Metric.accuracy, Metric.f1, Metric.roc_auc)

    @property
    def task(self) -> Task:
        if self is Metric.perplexity:
            return Task.text_generation
        return Task.regression if self in (Metric.rmse, Metric.mae, Metric.r2) else Task.classification


class ColumnKind(StrEnum):
    numeric = "numeric"
    categorical = "categorical"
    boolean = "boolean"


class TrialStatus(StrEnum):
    ok = "ok"
    failed = "failed"


class ArtifactRef(Contract):
    """A content-addressed artifact: the hash is the identity, the URI only where it lives."""

    uri: Uri
    sha256: Sha256
    size: int = Field(ge=0, description="Size in bytes.")
    media_type: str = Field(description="IANA media type or a cairn-specific one.")
