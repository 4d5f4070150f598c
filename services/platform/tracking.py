"""MLflow: every trial and final model as a run, and the registry's `champion` alias.

Runs carry tags that link back to the event log (event id, correlation id) and the artifact
store (hashes), so either side can be reached from the other. Writes are idempotent: a run is
found by its event id before a second one is created.

Registry reads tell "no champion yet" (None) from "registry unreachable" (`RegistryUnavailable`,
retried by the bus policy): treating an outage as "no champion" would let any challenger through.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from services.platform.local_store import schema_lock, write_ahead_log

EVENT_TAG = "cairn.event_id"
SHA_TAG = "cairn.model_sha256"
URI_TAG = "cairn.model_uri"  # where the bundle is in cairn's artifact store
SIGNATURE_URI_TAG = "cairn.signature_uri"  # the bundle's model signature in the store (unsigned: absent)
SIGNATURE_SHA_TAG = "cairn.signature_sha256"
BUNDLE_DIR = "cairn-model"  # run artifact folder holding the bundle when MLflow keeps it
REMOTE_SCHEMES = frozenset({"http", "https", "databricks"})
MLFLOW_SOURCE_SCHEMES = frozenset({"runs", "mlflow-artifacts"})


class RegistryUnavailable(RuntimeError):
    """The registry did not answer (connection refused, timeout, 5xx): retry, never 'no champion'."""


@dataclass(frozen=True)
class Champion:
    version: int
    model_sha256: str
    model_uri: str  # the bundle in cairn's store (tag), or the registry source for older versions
    run_id: str | None
    source: str = ""  # the registry's own source (runs:/..., or a store URI on local registries)
    signature_uri: str = ""  # the model signature deployment stored; "" when it signed none
    signature_sha256: str = ""


def is_absent(exc: MlflowException) -> bool:
    """Only these mean 'nothing there': no such registered model, or no such alias on it."""
    if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
        return True
    message = str(exc).lower()
    return exc.error_code == "INVALID_PARAMETER_VALUE" and "alias" in message and "not found" in message


def bound_http_client(retries: int, timeout_s: int) -> None:
    """MLflow's REST client reads its retry policy from the environment only (default: 7 retries
    with exponential backoff, 120 s timeouts, minutes per call): bound it, so an outage fails an
    attempt in seconds and the bus policy's nak backoff does the waiting."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(retries)
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(timeout_s)


class Tracker:
    """MLflow runs and registry. `prefix` goes before every experiment and model name: a tenant's
    namespace on a tracking server that other tenants share (docs/TENANTS.md)."""

    def __init__(self, tracking_uri: str, prefix: str = ""):
        with schema_lock(tracking_uri):
            # MLflow creates (or migrates) its schema on the first store access; one process at a time.
            self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
            self.client.search_experiments(max_results=1)
            self.client.search_registered_models(max_results=1)
            write_ahead_log(tracking_uri)
        self.tracking_uri = tracking_uri
        # A tracking server refuses model versions whose source is a local path outside the run's
        # artifacts, so there the bundle is logged as a run artifact (MLflow keeps a copy).
        self.remote = urlsplit(tracking_uri).scheme in REMOTE_SCHEMES
        self._experiments: dict[str, str] = {}
        self.prefix = prefix

    @classmethod
    def from_settings(cls, settings: Any) -> Tracker:
        bound_http_client(settings.mlflow_http_retries, settings.mlflow_http_timeout_s)
        return cls(settings.tracking_uri, settings.mlflow_prefix)

    def experiment(self, name: str) -> str:
        name = self.prefix + name
        if name not in self._experiments:
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                try:
                    self._experiments[name] = self.client.create_experiment(
                        name, artifact_location=self._artifact_location(name)
                    )
                except MlflowException:  # another replica created it first
                    self._experiments[name] = self.client.get_experiment_by_name(name).experiment_id
            else:
                self._experiments[name] = exp.experiment_id
        return self._experiments[name]

    def _artifact_location(self, experiment: str) -> str | None:
        """Run artifacts of a local SQLite registry beside its database, not in the working directory
        (MLflow's default, ./mlruns); a tracking server decides its own."""
        parts = urlsplit(self.tracking_uri)
        if parts.scheme != "sqlite" or not self.tracking_uri.startswith("sqlite:///"):
            return None
        db = Path(self.tracking_uri.removeprefix("sqlite:///")).resolve()
        return (db.parent / "mlflow-artifacts" / experiment).as_uri()

    def find_run(self, experiment: str, event_id: str) -> str | None:
        runs = self.client.search_runs(
            [self.experiment(experiment)], filter_string=f"tags.`{EVENT_TAG}` = '{event_id}'", max_results=1
        )
        return runs[0].info.run_id if runs else None

    def log_run(
        self,
        *,
        experiment: str,
        run_name: str,
        event_id: str,
        params: dict[str, Any],
        metrics: dict[str, float],
        tags: dict[str, str],
        failed: bool = False,
        check_existing: bool = False,
    ) -> str:
        """One finished run in three writes; with check_existing, a redelivery reuses its run."""
        if check_existing and (existing := self.find_run(experiment, event_id)):
            return existing
        run = self.client.create_run(
            self.experiment(experiment), run_name=run_name, tags={EVENT_TAG: event_id, **tags}
        )
        now = int(time.time() * 1000)
        self.client.log_batch(
            run.info.run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None],
            params=[Param(k, str(v)) for k, v in params.items()],
            tags=[],
        )
        self.client.set_terminated(run.info.run_id, status="FAILED" if failed else "FINISHED")
        return run.info.run_id

    # Registry -----------------------------------------------------------------------------
    def champion(self, model_name: str) -> Champion | None:
        """The version under the `champion` alias; None only when there is none (not on outages)."""
        model_name = self.prefix + model_name
        try:
            mv = self.client.get_model_version_by_alias(model_name, "champion")
        except MlflowException as exc:
            if is_absent(exc):
                return None
            raise RegistryUnavailable(f"MLflow registry {self.tracking_uri}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - a database or network error below the client
            raise RegistryUnavailable(
                f"MLflow registry {self.tracking_uri}: {type(exc).__name__}: {exc}"
            ) from exc
        return Champion(
            int(mv.version),
            mv.tags.get(SHA_TAG, ""),
            mv.tags.get(URI_TAG) or mv.source,
            mv.run_id,
            mv.source,
            mv.tags.get(SIGNATURE_URI_TAG, ""),
            mv.tags.get(SIGNATURE_SHA_TAG, ""),
        )

    def register(
        self,
        model_name: str,
        *,
        source: str,
        run_id: str,
        sha256: str,
        evidence_event_id: str,
        size: int,
        files: Mapping[str, bytes] | None = None,
        signature: tuple[str, str] | None = None,
    ) -> int:
        """Register (idempotently, keyed by the evaluation event) and return the version.

        `source` is the bundle in cairn's store (kept in a tag). With `files` (the verified bundle
        bytes by name; required against a tracking server) the version is a real MLflow model:
        `runs:/<run>/cairn-model` holds the bundle as it is, beside an `MLmodel` whose pyfunc is
        services/serving/mlflow_model.py (models-from-code, no pickle; it verifies the hash on load).
        `signature` (uri, sha256) is the model signature in the store, kept in tags so an endpoint
        that starts later verifies the champion it loads from the registry.
        """
        model_name = self.prefix + model_name
        with contextlib.suppress(MlflowException):
            self.client.create_registered_model(
                model_name, description="cairn champion line; the alias history lives in the event log"
            )
        for mv in self.client.search_model_versions(f"name = '{model_name}'"):
            if mv.tags.get("cairn.evidence_event_id") == evidence_event_id:
                return int(mv.version)
        registered = source
        if self.remote and not files:
            raise ValueError("a tracking server needs the bundle files to register a model")
        if files:  # an MLflow model around the bundle: models:/NAME@champion loads and serves it
            self._log_files(run_id, mlflow_model_files(files, sha256))
            registered = f"runs:/{run_id}/{BUNDLE_DIR}"
        mv = self.client.create_model_version(
            model_name,
            source=registered,
            run_id=run_id,
            tags={
                SHA_TAG: sha256,
                URI_TAG: source,
                "cairn.evidence_event_id": evidence_event_id,
                "cairn.model_size": str(size),
                **({SIGNATURE_URI_TAG: signature[0], SIGNATURE_SHA_TAG: signature[1]} if signature else {}),
            },
        )
        return int(mv.version)

    def set_signature(self, model_name: str, version: int, signature: Any) -> None:
        """Tag a version with its model signature (an ArtifactRef): made after registration, since
        the signature binds the version number only the registry assigns."""
        for key, value in ((SIGNATURE_URI_TAG, signature.uri), (SIGNATURE_SHA_TAG, signature.sha256)):
            self.client.set_model_version_tag(self.prefix + model_name, str(version), key, value)

    def _log_files(self, run_id: str, files: Mapping[str, bytes]) -> None:
        """Same names, same bytes on a redelivery: logging again overwrites with identical content."""
        with tempfile.TemporaryDirectory(prefix="cairn-bundle-") as tmp:
            folder = Path(tmp) / BUNDLE_DIR
            folder.mkdir()
            for name, data in files.items():
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(data)
            self.client.log_artifacts(run_id, str(folder), BUNDLE_DIR)

    def download(self, source: str, dst: Path) -> Path:
        """A version's source folder through MLflow (runs:/ or mlflow-artifacts:/), into dst."""
        import mlflow.artifacts

        try:
            return Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=source, dst_path=str(dst), tracking_uri=self.tracking_uri
                )
            )
        except MlflowException as exc:
            if is_absent(exc):
                raise FileNotFoundError(f"{source}: {exc}") from exc
            raise RegistryUnavailable(f"MLflow artifacts {source}: {exc}") from exc

    def set_champion(self, model_name: str, version: int) -> None:
        self.client.set_registered_model_alias(self.prefix + model_name, "champion", str(version))

    def champions(self) -> dict[str, Champion]:
        """Every champion in this namespace, by name without the prefix."""
        out = {}
        for rm in self.client.search_registered_models():
            if not rm.name.startswith(self.prefix):
                continue
            name = rm.name.removeprefix(self.prefix)
            if (c := self.champion(name)) is not None:
                out[name] = c
        return out


MLFLOW_MODEL_CODE = "services.serving.mlflow_model"  # the pyfunc, found by module name (not imported)
MANIFEST_NAME, ESTIMATOR_NAME = "bundle.json", "estimator"


def mlflow_model_files(files: Mapping[str, bytes], sha256: str) -> dict[str, bytes]:
    """The files of an MLflow model directory around a verified bundle: MLflow's own (`MLmodel`,
    the code file, environment files) and the bundle's two files at the top, as they were before
    (MLmodel names them as the pyfunc's artifacts, with the manifest's hash in the model config)."""
    import importlib.util

    import mlflow.pyfunc
    from mlflow.models import Model

    code = importlib.util.find_spec(MLFLOW_MODEL_CODE)
    if code is None or code.origin is None:
        raise RuntimeError(f"{MLFLOW_MODEL_CODE} is not importable: cairn is not installed properly")
    with tempfile.TemporaryDirectory(prefix="cairn-pyfunc-") as tmp:
        src, dst = Path(tmp) / "bundle", Path(tmp) / "model"
        src.mkdir()
        for name in (MANIFEST_NAME, ESTIMATOR_NAME):
            (src / name).write_bytes(files[name])
        mlflow.pyfunc.save_model(
            path=str(dst),
            python_model=code.origin,
            artifacts={"manifest": str(src / MANIFEST_NAME), "estimator": str(src / ESTIMATOR_NAME)},
            model_config={"cairn_sha256": sha256},
            pip_requirements=["cairn", f"mlflow=={mlflow.__version__}"],
        )
        model = Model.load(str(dst / "MLmodel"))
        artifacts = model.flavors["python_function"]["artifacts"]
        for key, name in (("manifest", MANIFEST_NAME), ("estimator", ESTIMATOR_NAME)):
            (dst / artifacts[key]["path"]).rename(dst / name)
            artifacts[key]["path"] = name
        model.save(str(dst / "MLmodel"))
        return {
            str(p.relative_to(dst)): p.read_bytes() for p in sorted(dst.rglob("*")) if p.is_file()
        }
