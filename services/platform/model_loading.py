"""Open a model bundle from wherever it lives, and only from there: location-checked, hash-verified.

Bundle and estimator URIs come from events, from manifests and from the registry: each is checked
against the artifact store (`services.platform.artifact_policy.check_artifact_uri`) before a byte
is fetched, so a forged event or registry entry cannot make a service read an arbitrary file or
address. A
registered champion whose bundle is not in cairn's store is fetched through MLflow (its run
artifacts), and checked against the hashes the registry and the manifest name. Nothing is
unpickled: estimators are XGBoost UBJSON, JSON or safetensors (services.platform.ml.bundle).
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import fsspec

from contracts import ArtifactRef, Task
from services.platform.artifact_policy import ArtifactLocationError, check_artifact_uri
from services.platform.artifacts import IntegrityError, read_verified, sha256_bytes
from services.platform.ml.bundle import BUNDLE_MEDIA_TYPE, LoadedModel
from services.platform.ml.registry import predictor
from services.platform.settings import CairnSettings
from services.platform.tracking import MLFLOW_SOURCE_SCHEMES, Champion, Tracker

MANIFEST_FILE = "bundle.json"
ESTIMATOR_FILE = "estimator"


class UnusableModel(ValueError):
    """A bundle that cannot be used as it is (outside the store, not a bundle): no retry fixes it."""


def load_from_store(ref: ArtifactRef, settings: CairnSettings) -> LoadedModel:
    """A bundle in cairn's store: the manifest and the estimator it names, both location-checked."""
    manifest_bytes = read_verified(_checked(ref.uri, settings), ref.sha256)
    estimator = _estimator_doc(ref.uri, manifest_bytes)
    estimator_bytes = read_verified(_checked(estimator["uri"], settings), estimator["sha256"])
    return from_bytes(ref, manifest_bytes, estimator_bytes)


def bundle_files(ref: ArtifactRef, settings: CairnSettings) -> dict[str, bytes]:
    """The verified bytes of a stored bundle by file name, as the registry keeps a copy of them."""
    manifest_bytes = read_verified(_checked(ref.uri, settings), ref.sha256)
    estimator = _estimator_doc(ref.uri, manifest_bytes)
    return {
        MANIFEST_FILE: manifest_bytes,
        ESTIMATOR_FILE: read_verified(_checked(estimator["uri"], settings), estimator["sha256"]),
    }


def champion_location(champion: Champion, settings: CairnSettings) -> str:
    """'store' when the bundle can be read from cairn's store, 'mlflow' when MLflow holds it.

    Refuses (UnusableModel) a champion whose bundle is neither in the store nor an MLflow run
    artifact: e.g. a registry entry pointing at a local file or a URL elsewhere.
    """
    try:
        check_artifact_uri(champion.model_uri, settings)
        in_store = True
    except ArtifactLocationError as exc:
        in_store, refused = False, exc
    if in_store and _exists(champion.model_uri):
        return "store"
    if urlsplit(champion.source).scheme in MLFLOW_SOURCE_SCHEMES:
        return "mlflow"
    if in_store:
        raise FileNotFoundError(f"{champion.model_uri}: not in the artifact store and MLflow has no copy")
    raise UnusableModel(f"champion v{champion.version}: {refused}")


def champion_ref(champion: Champion) -> ArtifactRef:
    """The registry champion's bundle as a reference; refused without a hash to verify it with."""
    if not re.fullmatch(r"[0-9a-f]{64}", champion.model_sha256):
        raise UnusableModel(f"champion v{champion.version} has no cairn.model_sha256 tag to verify it with")
    return ArtifactRef(
        uri=champion.model_uri, sha256=champion.model_sha256, size=0, media_type=BUNDLE_MEDIA_TYPE
    )


def champion_files(champion: Champion, tracker: Tracker, settings: CairnSettings) -> dict[str, bytes]:
    """The registry champion's bundle files (as bundle_files), from cairn's store or through MLflow."""
    ref = champion_ref(champion)
    if champion_location(champion, settings) == "store":
        return bundle_files(ref, settings)
    with tempfile.TemporaryDirectory(prefix="cairn-champion-") as tmp:
        folder = tracker.download(champion.source, Path(tmp))
        manifest_bytes = _read_file(folder / MANIFEST_FILE)
        if sha256_bytes(manifest_bytes) != champion.model_sha256:
            raise IntegrityError(
                f"{champion.source}/{MANIFEST_FILE}: content hash {sha256_bytes(manifest_bytes)} does not "
                f"match the registry's {champion.model_sha256}"
            )
        return {MANIFEST_FILE: manifest_bytes, ESTIMATOR_FILE: _read_file(folder / ESTIMATOR_FILE)}


def load_champion(champion: Champion, tracker: Tracker, settings: CairnSettings) -> LoadedModel:
    """The registry's champion from cairn's store, or through MLflow's artifact download."""
    files = champion_files(champion, tracker, settings)
    return from_bytes(champion_ref(champion), files[MANIFEST_FILE], files[ESTIMATOR_FILE])


def from_bytes(ref: ArtifactRef, manifest_bytes: bytes, estimator_bytes: bytes) -> LoadedModel:
    """A LoadedModel from verified manifest bytes and the estimator bytes it names (hash-checked)."""
    manifest = json.loads(manifest_bytes)
    estimator = _estimator_doc(ref.uri, manifest_bytes)
    if sha256_bytes(estimator_bytes) != estimator["sha256"]:
        raise IntegrityError(f"{ref.uri}: estimator bytes do not match the manifest's {estimator['sha256']}")
    task = Task(manifest["transform"]["task"])
    if task is Task.text_generation:
        return LoadedModel(ref, manifest, checkpoint=estimator_bytes)
    n_classes = len(manifest["transform"]["classes"])
    return LoadedModel(ref, manifest, predictor(estimator["format"], estimator_bytes, task, n_classes))


def _checked(uri: str, settings: CairnSettings) -> str:
    try:
        return check_artifact_uri(uri, settings)
    except ArtifactLocationError as exc:
        raise UnusableModel(str(exc)) from None


def _estimator_doc(uri: str, manifest_bytes: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(manifest_bytes)
    except ValueError:
        raise UnusableModel(f"{uri}: not a cairn model bundle (not JSON)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "cairn.model.v1":
        raise UnusableModel(f"{uri}: not a cairn model bundle")
    estimator = manifest.get("estimator")
    if (
        not isinstance(estimator, dict)
        or not isinstance(estimator.get("uri"), str)
        or not isinstance(estimator.get("sha256"), str)
    ):
        raise UnusableModel(f"{uri}: not a cairn model bundle")
    return estimator


def _exists(uri: str) -> bool:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs.exists(path)


def _read_file(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"{path.name}: missing from the model's MLflow artifacts")
    return path.read_bytes()
