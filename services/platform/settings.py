"""One settings class for every service, every field a `CAIRN_` environment variable.

Documented once here (type, default, meaning); `cairn settings` prints the table and the Helm
chart sets the same names.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field, IPvAnyNetwork, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

RUNTIME_FILE = "runtime.json"
NATS_AUTH_DIR = "nats-auth"  # under home: the users and passwords of the nats-server `cairn up` runs
DEFAULT_TENANT = "default"
TENANTS_DIR = "tenants"  # under home: one folder per tenant but the default (services.tools.tenants)
TENANT_NAME = r"^[a-z][a-z0-9-]{1,29}$"


class CairnSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CAIRN_", extra="ignore", frozen=True)

    home: Path = Field(
        Path("~/.cairn"),
        description="State directory: artifacts, MLflow DB, runtime file; one per user, so every command "
        "finds what `cairn up` started from any working directory.",
    )
    tenant: str = Field(
        DEFAULT_TENANT,
        pattern=TENANT_NAME,
        description="The tenant a command or service acts for: its own NATS account, and its own state "
        "under home/tenants/<name> (docs/TENANTS.md). `default` is the home itself.",
    )

    # The bus
    nats_url: str | None = Field(None, description="NATS URL; unset: the one `cairn up` recorded in home.")
    nats_user: str | None = Field(None, description="NATS user of this service.")
    nats_password: SecretStr | None = Field(None, description="NATS password of this service.")
    nats_tls_ca: Path | None = Field(None, description="CA bundle that signs the NATS server certificate.")
    nats_tls_cert: Path | None = Field(None, description="Client certificate for mutual TLS.")
    nats_tls_key: Path | None = Field(None, description="Client key for mutual TLS.")
    nats_ping_interval_s: float = Field(
        5.0,
        gt=0,
        description="Ping the server this often; two unanswered pings end the connection and the client "
        "moves to another server (a server cut off by a partition sends no error to notice).",
    )
    stream: str = Field("CAIRN", description="JetStream stream holding every event (subjects cairn.>).")
    stream_replicas: int = Field(1, ge=1, le=5, description="Stream replicas in a NATS cluster.")
    duplicate_window_s: float = Field(
        3600.0, gt=0, description="Server-side de-duplication window for Nats-Msg-Id (0 is not 'off')."
    )
    namespace: str = Field("cairn", description="Subject root; replays run under cairn.replay.<id>.")

    # Consumer policy, shared by every service
    ack_wait_s: float = Field(30.0, gt=0, description="Lease on a message; long steps renew it.")
    preload: bool = Field(
        True,
        description="`cairn up` forks every process from one that imported their libraries once "
        "(Linux); false: each process its own interpreter.",
    )
    stop_timeout_s: float = Field(
        2.0,
        gt=0,
        description="At SIGTERM, what needs NATS (acks, drain) gets this long; then the connection is "
        "closed undrained and messages in flight are redelivered elsewhere.",
    )
    max_deliver: int = Field(5, ge=1, description="Attempts before a message is dead-lettered.")
    retry_backoff_s: list[float] = Field(
        default_factory=lambda: [1.0, 5.0, 15.0, 30.0], description="nak delays between attempts."
    )
    handler_timeout_s: float = Field(
        600.0, gt=0, description="Longest one attempt of a step may run; past it the attempt fails (retried)."
    )
    training_timeout_s: float = Field(
        3600.0, gt=0, description="The same bound for training's trials and final fits, which run longer."
    )
    handled_ttl_s: float = Field(
        7 * 24 * 3600.0,
        gt=0,
        description="How long the handled-inputs ledger (KV cairn_handled) remembers an input; a new or "
        "recreated durable consumer starts this far back in the stream.",
    )
    ledger_async_persist: bool = Field(
        True,
        description="Let the handled-inputs ledger's stream acknowledge a record before it is on disk "
        "(JetStream persist_mode async: a single-replica stream on nats-server 2.12 or later; applied "
        "when the bucket is created). Saves two fsyncs per handled event; a crash of the server may "
        "forget the last records, and a redelivery then reruns the step, whose outputs the stream's "
        "duplicate window drops. False: every record fsynced like the events.",
    )

    replay_inactive_s: float = Field(
        300.0,
        gt=0,
        description="A replay's consumers are deleted by NATS after this long without a fetch or ack, so a "
        "replay killed outright (SIGKILL) cannot pin stream retention; a later replay removes the buckets "
        "of one idle this long.",
    )

    # State and compute
    artifacts_url: str | None = Field(None, description="fsspec URL of the artifact store.")
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI; default SQLite under home.")
    mlflow_http_retries: int = Field(
        0, ge=0, le=10, description="MLflow client retries per HTTP call; the bus policy retries the event."
    )
    mlflow_http_timeout_s: int = Field(
        10, ge=1, description="MLflow client timeout per HTTP request, so an outage fails in seconds."
    )
    dask: str = Field("local", description="'local', a scheduler address tcp://host:8786, or 'kubernetes'.")
    dask_workers: int | None = Field(None, ge=1, description="LocalCluster workers; default: one per core.")
    dask_k8s_cluster: str = Field("cairn-dask", description="DaskCluster resource name (kubernetes).")
    dask_k8s_namespace: str | None = Field(None, description="Namespace of the DaskCluster.")
    dask_image: str | None = Field(None, description="Worker image for a DaskCluster created by training.")
    dask_gpu_workers: int = Field(0, ge=0, description="GPU worker group size (kubernetes).")
    trial_concurrency: int | None = Field(None, ge=1, description="Trials in flight per training replica.")
    dask_tls_ca: Path | None = Field(
        None,
        description="CA signing the Dask scheduler's and workers' certificates; with it CAIRN_DASK is tls://.",
    )
    dask_tls_cert: Path | None = Field(None, description="Certificate shown to the Dask scheduler (mTLS).")
    dask_tls_key: Path | None = Field(None, description="Key of CAIRN_DASK_TLS_CERT.")
    dask_local_tls: bool = Field(
        True,
        description="LocalCluster comms over TLS with a throwaway in-memory certificate, so other users of "
        "the host cannot submit tasks to it over loopback.",
    )

    # Ingestion limits
    allowed_schemes: list[str] = Field(default_factory=lambda: ["file"], description="Readable URL schemes.")
    allowed_roots: list[str] = Field(
        default_factory=list, description="Readable path prefixes; default: the working directory."
    )
    allow_private_hosts: bool = Field(
        False, description="Let http(s) sources reach private and loopback addresses (on-premises data)."
    )
    allowed_host_networks: list[IPvAnyNetwork] = Field(
        default_factory=list,
        description='Non-public networks http(s) sources may reach, e.g. ["10.20.0.0/16"] for an '
        "on-premises data server; narrower than allow_private_hosts (the rest stays refused, cloud "
        "metadata included).",
    )
    max_dataset_bytes: int = Field(512 * 1024 * 1024, gt=0, description="Largest dataset accepted.")
    max_columns: int = Field(2000, gt=0, description="Widest dataset accepted.")
    min_rows: int = Field(30, ge=1, description="Smallest dataset accepted.")

    # Evaluation gate
    gate_margin: float = Field(0.0, ge=0, description="Relative improvement a challenger needs.")
    gate_min_r2: float | None = Field(None, description="Absolute floor on holdout R2 (regression).")
    gate_min_accuracy: float | None = Field(None, description="Absolute floor on accuracy.")

    # HTTP
    http_port: int | None = Field(None, ge=0, description="Health/metrics port of a service; 0: any free.")
    health_host: str = Field(
        "0.0.0.0",
        description="Health/metrics bind address of a service (all interfaces: the kubelet and Prometheus "
        "reach pods by their IP); `cairn up` sets 127.0.0.1.",
    )
    serve_host: str = Field("127.0.0.1", description="Inference endpoint bind address.")
    serve_port: int = Field(8080, ge=0, description="Inference endpoint port.")
    serve_grpc_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Port of the endpoint's gRPC services (Open Inference Protocol, grpc.health.v1) on "
        "CAIRN_SERVE_HOST beside the HTTP port; 0: no gRPC.",
    )
    serve_token_file: Path | None = Field(
        None,
        description="File with the bearer token the inference endpoint requires (HTTP and gRPC); default "
        "home/serve-token when it exists (`cairn up` makes one per added tenant), else no token.",
    )
    max_request_bytes: int = Field(1024 * 1024, gt=0, description="Largest inference request.")
    serve_workers: int = Field(1, ge=0, description="Endpoint worker processes; 0: one per CPU.")
    serve_batch_wait_ms: float = Field(
        1.0, ge=0, le=50, description="Longest a request waits to share a predict call with others."
    )
    serve_batch_rows: int = Field(4096, ge=1, description="Most rows gathered into one predict call.")
    serve_compiled_trees: bool = Field(
        True,
        description="Serve XGBoost regressors through cairn's compiled forest (XGBoost's answers to the bit, "
        "checked at load; services/serving/forest.py); false: XGBoost's own predict.",
    )
    request_record_rate: float = Field(
        0.0, ge=0, le=1, description="Share of requests recorded to the request-record stream; 0: off."
    )
    request_record_max_age_s: int = Field(
        7 * 86400, gt=0, description="How long the request-record stream keeps a record."
    )

    # Step cache and retention (services.platform.cache, services.tools.gc)
    cache: bool = Field(True, description="Serve step outputs from the content-keyed cache (cairn_cache).")
    cache_libraries: dict[str, str] = Field(
        default_factory=dict,
        description='Library versions to key the cache with instead of the installed ones, e.g. {"xgboost": '
        '"9.0"}: shows what an upgrade would recompute.',
    )
    gc_keep_champions: int = Field(3, ge=0, description="`cairn gc` keeps this many past champions.")
    gc_keep_runs: int = Field(5, ge=0, description="`cairn gc` keeps the last N runs per model.")
    gc_grace_s: float = Field(3600.0, ge=0, description="`cairn gc` never deletes artifacts this recent.")

    lineage_db: str | None = Field(None, description="Lineage store URL; default SQLite under home.")
    # Stream retention (services.lineage.archive): events leave the stream only once archived.
    retention_max_age_s: float = Field(0.0, ge=0, description="Older events leave the stream; 0: never.")
    retention_max_bytes: int = Field(0, ge=0, description="The stream is trimmed to this size; 0: no limit.")
    archive_interval_s: float = Field(30.0, gt=0, description="How often lineage archives and trims.")
    archive_segment_records: int = Field(5000, ge=1, description="Records per archive segment at most.")
    archive_key: Path | None = Field(
        None, description="Ed25519 private key (PEM) signing archive segments; default made under home."
    )
    archive_public_key: Path | None = Field(
        None,
        description="Ed25519 public key (PEM) that readers check archive segments with; default beside "
        "CAIRN_ARCHIVE_KEY or under home. A reader with segments to check and no key is refused.",
    )
    # Model signing (services.platform.model_signatures): OpenSSF model signatures on champion bundles.
    model_signing_key: Path | None = Field(
        None,
        description="EC private key (PEM, P-256/384/521) deployment signs champion bundles with; default: "
        "the one `cairn up` makes under home (model-signing/), else bundles go unsigned.",
    )
    model_verify_key: Path | None = Field(
        None,
        description="EC public key (PEM) the inference endpoint verifies champions with; default: the one "
        "under home. With a key, an unsigned model or one whose signature fails is refused, not served.",
    )
    openlineage_url: str | None = Field(None, description="file:// path or http(s) endpoint for OL events.")
    log_level: str = Field("INFO", description="Python logging level.")

    @field_validator("nats_password")
    @classmethod
    def _no_placeholder(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and v.get_secret_value() in {"changeme", "changethis", "password", ""}:
            raise ValueError("CAIRN_NATS_PASSWORD is a placeholder; set a real secret")
        return v

    # Derived locations -------------------------------------------------------------------
    @property
    def root_dir(self) -> Path:
        """The home every tenant lives under: the NATS server, its users, the tenant registry."""
        return self.home.expanduser().resolve()

    @property
    def home_dir(self) -> Path:
        """This tenant's state: artifacts, MLflow, lineage, keys, runtime file (the root for `default`)."""
        if self.tenant == DEFAULT_TENANT:
            return self.root_dir
        return self.root_dir / TENANTS_DIR / self.tenant

    def nats_user_name(self, role: str) -> str:
        """The NATS user of `role` in this tenant's account: user names are unique across a server,
        so a tenant's are `<role>@<tenant>`; the default tenant keeps the bare names."""
        return role if self.tenant == DEFAULT_TENANT else f"{role}@{self.tenant}"

    @property
    def artifacts(self) -> str:
        if not self.artifacts_url:
            return (self.home_dir / "artifacts").as_uri()
        if self.tenant == DEFAULT_TENANT:
            return self.artifacts_url
        return f"{self.artifacts_url.rstrip('/')}/{TENANTS_DIR}/{self.tenant}"  # its own prefix

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_uri or f"sqlite:///{self.home_dir / 'mlflow.db'}"

    @property
    def mlflow_prefix(self) -> str:
        """A tenant's experiments and models on a tracking server it shares: `<tenant>.`; none on the
        default SQLite, which is the tenant's own (under its home)."""
        return f"{self.tenant}." if self.mlflow_uri and self.tenant != DEFAULT_TENANT else ""

    @property
    def lineage_url(self) -> str:
        return self.lineage_db or f"sqlite:///{self.home_dir / 'lineage.db'}"

    @property
    def read_roots(self) -> list[Path]:
        roots = self.allowed_roots or [str(Path.cwd())]
        return [Path(r).expanduser().resolve() for r in roots]

    def runtime(self) -> dict:
        """What `cairn up` recorded (URLs it serves); empty when nothing runs from this home."""
        path = self.home_dir / RUNTIME_FILE
        return json.loads(path.read_text()) if path.exists() else {}

    def resolved_nats_url(self) -> str:
        if self.nats_url:
            return self.nats_url
        url = self.runtime().get("nats_url")
        if not url:
            raise RuntimeError(
                f"no NATS to talk to: set CAIRN_NATS_URL or start one with `cairn up` (home {self.home_dir})"
            )
        return url

    def nats_servers(self) -> list[str]:
        """The seed URLs: CAIRN_NATS_URL may list several, comma-separated (as the nats CLI takes
        them), so a client finds a cluster through whichever server answers first."""
        return [u.strip() for u in self.resolved_nats_url().split(",") if u.strip()]

    def with_home_credentials(self, user: str) -> CairnSettings:
        """These settings as `user` of the nats-server `cairn up` runs from this home (it keeps the
        passwords there, 0600), so a command run by the home's owner authenticates with nothing to set.
        Unchanged when a user or a NATS URL is set explicitly: that is another server's business."""
        auth = self.runtime().get("nats_auth")
        if self.nats_user or self.nats_url or not auth:
            return self
        path = Path(auth) / "secrets.json"
        user = self.nats_user_name(user)
        try:
            password = json.loads(path.read_text())[user]
        except (OSError, ValueError, KeyError):
            raise RuntimeError(
                f"no NATS password for user {user!r} in {path}: restart with `cairn up`"
            ) from None
        return self.model_copy(update={"nats_user": user, "nats_password": SecretStr(password)})

    def to_env(self) -> dict[str, str]:
        """The explicitly set fields as CAIRN_ variables, so a child process gets the same settings."""
        out = {}
        for name in self.model_fields_set:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, list | dict):
                value = json.dumps(value)
            out[f"CAIRN_{name.upper()}"] = str(value)
        return out

    def backoff(self, delivery: int) -> float:
        """nak delay after the given (1-based) failed delivery."""
        steps = self.retry_backoff_s or [0.0]
        return steps[min(delivery, len(steps)) - 1]
