"""cairn's champion as an MLflow model, from code (no pickle): MLflow runs this file to get the model.

The MLflow model directory that deployment registers holds the cairn bundle as it is (`bundle.json`,
`estimator`) beside MLflow's `MLmodel`; `load_context` verifies the manifest against the hash in
the model config and the estimator against the manifest (services.platform.model_loading.from_bytes) before
anything is used, so `mlflow.pyfunc.load_model("models:/NAME@champion")`, `mlflow models serve`,
and KServe's or Seldon's MLflow runtimes (with cairn installed) serve the very bytes cairn serves.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

SHA_KEY = "cairn_sha256"  # model config key: the bundle manifest's hash, the cairn identity


class CairnBundleModel(PythonModel):
    """Predicts as cairn's endpoint does: values (regression), or label and class probabilities."""

    def load_context(self, context: Any) -> None:
        from contracts import ArtifactRef
        from services.platform.artifacts import IntegrityError
        from services.platform.ml.bundle import BUNDLE_MEDIA_TYPE
        from services.platform.model_loading import from_bytes

        manifest_path = Path(context.artifacts["manifest"])
        manifest = manifest_path.read_bytes()
        expected = (context.model_config or {}).get(SHA_KEY, "")
        actual = hashlib.sha256(manifest).hexdigest()
        if actual != expected:
            raise IntegrityError(f"{manifest_path}: hash {actual} does not match the model's {expected}")
        ref = ArtifactRef(uri=str(manifest_path), sha256=actual, size=len(manifest),
                          media_type=BUNDLE_MEDIA_TYPE)
        self.model = from_bytes(ref, manifest, Path(context.artifacts["estimator"]).read_bytes())

    def predict(self, context, model_input, params=None):  # untyped: MLflow reads hints as a schema
        import pandas as pd

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        out = self.model.predict_raw(frame)
        spec = self.model.spec
        if spec["task"] == "regression":
            return out.astype(float)
        classes = spec["classes"]
        result = pd.DataFrame(out.astype(float), columns=[f"p_{c}" for c in classes])
        result.insert(0, "label", [classes[i] for i in out.argmax(axis=1)])
        return result


mlflow.models.set_model(CairnBundleModel())
