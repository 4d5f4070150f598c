"""Value types shared by the event models: validated identifiers, hashes and enums."""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from functools import cache
from typing import Annotated, Any, get_args

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
    """Base for every payload: immutable, and a tolerant reader.

    Unknown fields are accepted and kept (``model_extra``, and they are re-encoded): during a rolling
    upgrade a newer producer may add an optional field that older consumers do not know yet, and
    lineage keeps what was said. The one door outsiders use stays strict (see ``strict_door``).
    """

    model_config = ConfigDict(frozen=True, extra="allow", use_enum_values=False)


def is_strict(model: type[BaseModel]) -> bool:
    """A strict door: the payload refuses unknown fields, its nested models included."""
    return model.model_config.get("extra") == "forbid"


def unknown_fields(model: type[BaseModel], data: Any, prefix: str = "") -> list[str]:
    """Dotted names in `data` that `model` (and the models nested in its fields) does not declare."""
    if not isinstance(data, dict):
        return []
    known = _declared(model)
    out = []
    for key, value in data.items():
        nested_models = known.get(key)
        if nested_models is None:
            out.append(f"{prefix}{key}")
            continue
        for nested in nested_models:
            out += unknown_fields(nested, value, f"{prefix}{key}.")
    return out


@cache
def _declared(model: type[BaseModel]) -> dict[str, tuple[type[BaseModel], ...]]:
    """Each declared name (and alias) of a model, with the models nested in its type: once per class,
    as every event through the strict door asks."""
    known: dict[str, tuple[type[BaseModel], ...]] = {}
    for name, field in model.model_fields.items():
        known[name] = tuple(_models_in(field.annotation))
        if field.alias:
            known[field.alias] = known[name]
    return known


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def strict_door(model: type[BaseModel]) -> Callable[[Any], Any]:
    """A before-validator for a nested field of a strict payload: refuse, naming, unknown fields."""

    def check(value: Any) -> Any:
        unknown = unknown_fields(model, value)
        if unknown:
            names = ", ".join(repr(u) for u in unknown)
            raise ValueError(f"unknown field {names}: events from outside may carry only published fields")
        return value

    return check


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
