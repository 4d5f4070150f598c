"""The peers bench/serve.py serves the champion with, besides cairn: Seldon MLServer with its XGBoost
runtime, and `mlflow models serve` (from the project's own .venv: mlflow is a dependency).

MLServer is never a dependency of cairn: it lives in its own virtual environment,
.venv-mlserver at the repository root (git-ignored), created by `mlserver_venv()` on first use
with `pip install mlserver mlserver-xgboost` (pin with CAIRN_BENCH_MLSERVER_SPEC, e.g.
"mlserver==1.7.1 mlserver-xgboost==1.7.1"). It serves the same booster (the bundle's UBJSON
file) from a model folder written here; it is given the feature matrix cairn computes from the
rows, since its runtime has no transform of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MLSERVER_VENV = ROOT / ".venv-mlserver"


def mlserver_venv(venv: Path = MLSERVER_VENV) -> Path:
    """The `mlserver` executable of a venv of its own, created and filled on first use."""
    exe = venv / "bin" / "mlserver"
    if exe.exists():
        return exe
    spec = os.environ.get("CAIRN_BENCH_MLSERVER_SPEC", "mlserver mlserver-xgboost uvloop<0.22").split()
    print(f"creating {venv} for MLServer ({' '.join(spec)}): once", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *spec], check=True)
    return exe


def mlserver_version(exe: Path) -> str:
    out = subprocess.run(
        [
            str(exe.parent / "python"),
            "-c",
            "import mlserver, xgboost; print(mlserver.__version__, xgboost.__version__)",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return f"mlserver {out[0]}, xgboost {out[1]}"


def mlserver_folder(
    folder: Path,
    name: str,
    booster_ubj: bytes,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    parallel_workers: int,
) -> Path:
    """A model repository MLServer serves: settings.json (ports, workers) and the model's folder."""
    model = folder / name
    model.mkdir(parents=True)
    (model / "model.ubj").write_bytes(booster_ubj)
    (model / "model-settings.json").write_text(
        json.dumps(
            {
                "name": name,
                "implementation": "mlserver_xgboost.XGBoostModel",
                "parameters": {"uri": "./model.ubj", "version": "1"},
            }
        )
    )
    (folder / "settings.json").write_text(
        json.dumps(
            {
                "host": "127.0.0.1",
                "http_port": http_port,
                "grpc_port": grpc_port,
                "metrics_port": metrics_port,
                "parallel_workers": parallel_workers,
            }
        )
    )
    return folder
