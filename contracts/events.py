"""Event payloads, one model per fact. Names are past-tense facts; a breaking change is a new vN.

Each payload class declares its names here, so nothing else spells them: its CloudEvents `type`
in ``EVENT_TYPE`` (the subject on the bus is the same string, see ``contracts.subjects``), who
publishes it in ``PRODUCER`` (the AsyncAPI document and the NATS permissions are derived from
it) and, with ``ENDS_RUN``, that it always ends a pipeline run (see ``contracts.runs``).
"""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import BeforeValidator, ConfigDict, Field, model_validator

from contracts.types import (
    ArtifactRef,
    ColumnKind,
    ColumnName,
    Contract,
    DataFormat,
    EventId,
    Metric,
    ModelFamily,
    ModelName,
    ParamValue,
    RunId,
    SearchStrategy,
    Sha256,
    StudyId,
    Task,
    TrialStatus,
    Uri,
    strict_door,
)

# Producers that are not one of cairn's services: the NATS permissions grant them differently.
UPSTREAM = "upstream"  # an outside system announcing data
ANY_SERVICE = "any service"  # every consuming service may reject what it cannot handle
ENDPOINT = "serve"  # the inference endpoint (its NATS user): it consumes no event through the policy


class TuningSpec(Contract):
    """How to search: carried from the arrival event through every step so replay sees the same."""

    trials: int = Field(80, ge=1, le=10_000, description="Number of trial configurations sampled.")
    strategy: SearchStrategy = Field(
        SearchStrategy.asha, description="random: every trial at full budget; asha: successive halving."
    )
    metric: Metric | None = Field(None, description="Primary metric; default rmse or log_loss by task.")
    families: list[ModelFamily] = Field(
        default_factory=lambda: [ModelFamily.xgboost, ModelFamily.random_forest, ModelFamily.linear],
        min_length=1,
        description="Model families in the search space.",
    )
    max_budget: int = Field(300, ge=1, le=5000, description="Full budget: boosting rounds or trees.")
    eta: int = Field(3, ge=2, le=10, description="Successive-halving reduction factor.")
    vocab_size: int = Field(512, ge=256, le=65536, description="Text only: BPE vocabulary (256 = bytes).")


# In the strict door a TuningSpec refuses unknown fields too; inside, it is as tolerant as the rest.
StrictTuningSpec = Annotated[TuningSpec, BeforeValidator(strict_door(TuningSpec))]


class DataArrived(Contract):
    """An upstream system says a dataset is ready. The only event outsiders usually publish."""

    # The strict door: unlike the internal events it refuses unknown fields (nested ones too),
    # naming them, so an outsider's typo ("trails": 8) is an error, not a silently ignored wish.

    EVENT_TYPE: ClassVar[str] = "cairn.data.arrived.v1"
    PRODUCER: ClassVar[str] = UPSTREAM
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "anyOf": [
                {"required": ["target"]},
                {"required": ["task"], "properties": {"task": {"const": "text_generation"}}},
                {"required": ["format"], "properties": {"format": {"const": "text"}}},
            ]
        },
    )

    uri: Uri = Field(description="Where the data is: file://, s3://, ... or a local path.")
    target: ColumnName | None = Field(None, description="Column to predict (tables; not for text).")
    task: Task | None = Field(
        None, description="regression, classification or text_generation; inferred when absent."
    )
    format: DataFormat | None = Field(
        None, description="csv, parquet, jsonl or text; inferred from the name."
    )
    sha256: Sha256 | None = Field(None, description="Expected SHA-256 of the file; verified when given.")
    model_name: ModelName | None = Field(None, description="Champion scope; default <dataset>-<target>.")
    seed: int = Field(0, ge=0, lt=2**32, description="Seed for splits and every trial.")
    tuning: StrictTuningSpec = Field(default_factory=TuningSpec)

    @property
    def is_text(self) -> bool:
        return self.task is Task.text_generation or self.format is DataFormat.text

    @model_validator(mode="after")
    def _target_for_tables(self) -> DataArrived:
        if self.target is None and not self.is_text:
            raise ValueError("target is required for tabular data (omit it only for text corpora)")
        if self.format is DataFormat.text and self.task not in (None, Task.text_generation):
            raise ValueError("a text corpus can only be used for task text_generation")
        return self


class DataRejected(Contract):
    """The arrived data cannot be used; the reason is written for the person who sent it."""

    EVENT_TYPE: ClassVar[str] = "cairn.data.rejected.v1"
    PRODUCER: ClassVar[str] = "ingestion"
    ENDS_RUN: ClassVar[bool] = True

    uri: str
    reason: str = Field(min_length=1)
    problems: list[str] = Field(default_factory=list)


class ColumnInfo(Contract):
    name: ColumnName
    kind: ColumnKind
    dtype: str = Field(description="Storage dtype in the snapshot.")
    missing: int = Field(ge=0)
    distinct: int = Field(ge=0)
    mean: float | None = None
    std: float | None = None
    minimum: float | None = None
    maximum: float | None = None


class PipelineContext(Contract):
    """What every step after ingestion needs to know about the run it belongs to."""

    model_name: ModelName
    target: ColumnName | None = Field(None, description="Predicted column; None for text generation.")
    task: Task
    seed: int = Field(ge=0, lt=2**32)
    tuning: TuningSpec


class DatasetIngested(Contract):
    EVENT_TYPE: ClassVar[str] = "cairn.dataset.ingested.v1"
    PRODUCER: ClassVar[str] = "ingestion"

    context: PipelineContext
    source_uri: str
    source_sha256: Sha256 = Field(description="SHA-256 of the raw bytes as received.")
    dataset: ArtifactRef = Field(description="Immutable Parquet snapshot in the artifact store.")
    rows: int = Field(ge=1)
    columns: list[ColumnInfo]


class SplitSizes(Contract):
    train: int = Field(ge=1)
    validation: int = Field(ge=1)
    test: int = Field(ge=1)


class FeaturesBuilt(Contract):
    EVENT_TYPE: ClassVar[str] = "cairn.features.built.v1"
    PRODUCER: ClassVar[str] = "features"

    context: PipelineContext
    dataset: ArtifactRef = Field(description="The ingested snapshot the features were built from.")
    featureset: ArtifactRef = Field(description="Parquet: encoded features, target and a split column.")
    transform: ArtifactRef = Field(description="JSON transform spec that turns raw rows into features.")
    feature_columns: list[ColumnName]
    splits: SplitSizes


class Rung(Contract):
    rung: int = Field(ge=0)
    budget: int = Field(ge=1)
    keep: int = Field(ge=1, description="How many trials run at this rung.")


class TuningRequested(Contract):
    """A study's plan, fixed before any trial runs: replay re-reads the plan, never re-samples it."""

    EVENT_TYPE: ClassVar[str] = "cairn.tuning.requested.v1"
    PRODUCER: ClassVar[str] = "tuning"

    study_id: StudyId
    context: PipelineContext
    features: FeaturesBuilt
    metric: Metric
    strategy: SearchStrategy
    rungs: list[Rung] = Field(min_length=1)
    configurations: list[TrialConfig] = Field(min_length=1)


class TrialConfig(Contract):
    trial_id: int = Field(ge=0)
    family: ModelFamily
    params: dict[str, ParamValue]


class TrialRequested(Contract):
    EVENT_TYPE: ClassVar[str] = "cairn.trial.requested.v1"
    PRODUCER: ClassVar[str] = "tuning"

    study_id: StudyId
    trial_id: int = Field(ge=0)
    rung: int = Field(ge=0)
    budget: int = Field(ge=1)
    family: ModelFamily
    params: dict[str, ParamValue]
    metric: Metric
    task: Task
    target: ColumnName | None = None
    seed: int = Field(ge=0, lt=2**32)
    featureset: ArtifactRef
    model_name: ModelName


class TrialCompleted(Contract):
    EVENT_TYPE: ClassVar[str] = "cairn.trial.completed.v1"
    PRODUCER: ClassVar[str] = "training"

    study_id: StudyId
    trial_id: int = Field(ge=0)
    rung: int = Field(ge=0)
    budget: int = Field(ge=1)
    family: ModelFamily
    params: dict[str, ParamValue]
    status: TrialStatus
    metric: Metric
    score: float | None = Field(None, description="Validation score on the primary metric.")
    duration_s: float = Field(ge=0)
    mlflow_run_id: RunId | None = None
    error: str | None = None

    @model_validator(mode="after")
    def _score_when_ok(self) -> TrialCompleted:
        if self.status is TrialStatus.ok and self.score is None:
            raise ValueError("a trial with status ok must carry a score")
        return self


class TrialsPromoted(Contract):
    """A successive-halving decision with its evidence, so replay follows it instead of re-deciding."""

    EVENT_TYPE: ClassVar[str] = "cairn.trials.promoted.v1"
    PRODUCER: ClassVar[str] = "tuning"

    study_id: StudyId
    from_rung: int = Field(ge=0)
    to_rung: int = Field(ge=1)
    budget: int = Field(ge=1)
    evidence: dict[int, float | None] = Field(description="trial_id -> score seen at from_rung.")
    evidence_event_ids: list[EventId]
    promoted: list[int]


class LeaderboardEntry(Contract):
    trial_id: int
    family: ModelFamily
    params: dict[str, ParamValue]
    budget: int
    rung: int
    score: float


class TuningCompleted(Contract):
    EVENT_TYPE: ClassVar[str] = "cairn.tuning.completed.v1"
    PRODUCER: ClassVar[str] = "tuning"

    study_id: StudyId
    context: PipelineContext
    features: FeaturesBuilt
    metric: Metric
    strategy: SearchStrategy
    trials_completed: int = Field(ge=0)
    trials_failed: int = Field(ge=0)
    leaderboard: list[LeaderboardEntry] = Field(min_length=1, description="Best first.")
    duration_s: float = Field(ge=0)


class ModelTrained(Contract):
    EVENT_TYPE: ClassVar[str] = "cairn.model.trained.v1"
    PRODUCER: ClassVar[str] = "training"

    context: PipelineContext
    study_id: StudyId
    model: ArtifactRef = Field(description="Model bundle (JSON manifest naming the native model file).")
    family: ModelFamily
    params: dict[str, ParamValue]
    budget: int
    metric: Metric
    validation_score: float
    featureset: ArtifactRef
    transform: ArtifactRef
    dataset: ArtifactRef
    mlflow_run_id: RunId
    versions: dict[str, str] = Field(description="Library and code versions that produced the model.")


class ChampionSnapshot(Contract):
    version: int
    model_sha256: Sha256
    metrics: dict[str, float]


class ModelEvaluated(Contract):
    EVENT_TYPE: ClassVar[str] = "cairn.model.evaluated.v1"
    PRODUCER: ClassVar[str] = "evaluation"

    context: PipelineContext
    model: ArtifactRef
    family: ModelFamily
    mlflow_run_id: RunId
    metric: Metric
    metrics: dict[str, float] = Field(description="Holdout (test split) metrics.")
    champion: ChampionSnapshot | None = Field(None, description="The champion it was compared with.")
    champion_metrics_on_holdout: dict[str, float] | None = None
    passed: bool
    reasons: list[str] = Field(min_length=1, description="Why the gate passed or failed.")
    dataset: ArtifactRef | None = Field(
        None,
        description="Snapshot the holdout was cut from (with context.seed): lets a stale decision be redone.",
    )


class EvaluationRequested(Contract):
    """A passed decision found stale when deploying (the champion moved since): decide it again."""

    EVENT_TYPE: ClassVar[str] = "cairn.evaluation.requested.v1"
    PRODUCER: ClassVar[str] = "deployment"

    evaluated: ModelEvaluated = Field(description="The stale decision, with what is needed to redo it.")
    champion_version: int | None = Field(None, description="The champion it must now be compared with.")
    reason: str = Field(min_length=1)


class ModelDeployed(Contract):
    EVENT_TYPE: ClassVar[str] = "cairn.model.deployed.v1"
    PRODUCER: ClassVar[str] = "deployment"
    ENDS_RUN: ClassVar[bool] = True

    model_name: ModelName
    version: int = Field(ge=1)
    alias: str = "champion"
    model: ArtifactRef
    previous_version: int | None = None
    mlflow_run_id: RunId
    metrics: dict[str, float]
    evidence_event_id: EventId = Field(description="The model-evaluated event that justified promotion.")
    signature: ArtifactRef | None = Field(
        None,
        description="OpenSSF model signature (a Sigstore bundle, `model_signing`) of the bundle's files "
        "laid out as bundle.json and estimator, with cairn-identity.json (`identity`) when present; "
        "None: deployment holds no signing key.",
    )
    identity: ArtifactRef | None = Field(
        None,
        description="cairn-identity.json, signed with the bundle: model name, version and the manifest's "
        "sha256, so a signature made for one model version verifies as no other. The endpoint rebuilds "
        "it from model_name and version rather than reading this copy (services.platform.model_signatures).",
    )


class ModelRefused(Contract):
    """The inference endpoint would not serve a champion (unsigned while it holds a verify key, a
    signature that does not verify, bytes that do not match their hash): it keeps the one it serves."""

    EVENT_TYPE: ClassVar[str] = "cairn.model.refused.v1"
    PRODUCER: ClassVar[str] = ENDPOINT

    model_name: ModelName
    version: int = Field(ge=1, description="The version refused.")
    model: ArtifactRef | None = Field(None, description="The bundle refused (None: its hash was unknown).")
    signature: ArtifactRef | None = Field(None, description="The signature it came with, if any.")
    reason: str = Field(min_length=1)
    served_version: int | None = Field(None, description="The version the endpoint keeps serving.")
    deployed_event_id: EventId | None = Field(
        None, description="The deployment refused; None: the registry's champion, refused at start."
    )


class DeploymentFailed(Contract):
    EVENT_TYPE: ClassVar[str] = "cairn.deployment.failed.v1"
    PRODUCER: ClassVar[str] = "deployment"
    ENDS_RUN: ClassVar[bool] = True

    model_name: ModelName
    model: ArtifactRef | None = None
    reason: str = Field(min_length=1)


class EventRejected(Contract):
    """Any service refusing any message: the original bytes are on the dead-letter subject."""

    EVENT_TYPE: ClassVar[str] = "cairn.event.rejected.v1"
    PRODUCER: ClassVar[str] = ANY_SERVICE
    ENDS_RUN: ClassVar[bool] = True

    service: str
    reason: str = Field(min_length=1)
    errors: list[str] = Field(default_factory=list)
    subject: str
    stream_sequence: int | None = None
    original_id: str | None = None
    original_type: str | None = None
    deliveries: int = Field(ge=0)
    dead_letter_subject: str


TuningRequested.model_rebuild()

PAYLOADS: tuple[type[Contract], ...] = (
    DataArrived,
    DataRejected,
    DatasetIngested,
    FeaturesBuilt,
    TuningRequested,
    TrialRequested,
    TrialCompleted,
    TrialsPromoted,
    TuningCompleted,
    ModelTrained,
    ModelEvaluated,
    EvaluationRequested,
    ModelDeployed,
    DeploymentFailed,
    EventRejected,
    ModelRefused,
)

# Who publishes each type, read off the classes above.
PRODUCERS: dict[str, str] = {p.EVENT_TYPE: p.PRODUCER for p in PAYLOADS}  # type: ignore[attr-defined]
