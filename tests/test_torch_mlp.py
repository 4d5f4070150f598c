"""The PyTorch MLP family (CPU, tiny) and the placement rule that sends torch trials to GPUs."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors  # noqa: F401  (runtime dependencies: a missing one is an error, not a skip)
import torch

from contracts.types import ModelFamily, Task
from services.platform.ml import placement
from services.platform.ml.fitted import FitRequest
from services.platform.ml.torch_mlp import (
    MLP_FORMAT,
    MLPPredictor,
    fit_mlp,
    read_mlp_config,
    sample_mlp_params,
)

ROOT = Path(__file__).resolve().parents[1]


def mlp(*args, **kwargs):
    """`fit_mlp` of a request built from the positional fields of `FitRequest`."""
    return fit_mlp(FitRequest(*args, **kwargs))


SMALL = {"hidden": 32, "depth": 2, "learning_rate": 3e-3, "dropout": 0.05, "batch_size": 64}


def regression_data(seed: int = 0, n: int = 800):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32) * np.array([1, 3, 0.5, 10, 1, 1], dtype=np.float32)
    y = 2 * x[:, 0] - x[:, 1] / 3 + np.sin(2 * x[:, 2]) + 0.1 * rng.normal(size=n) + 50.0
    cut = int(0.75 * n)
    return x[:cut], y[:cut], x[cut:], y[cut:]


def classification_data(seed: int = 1, n: int = 900):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    score = np.stack([x[:, 0] + x[:, 1], x[:, 2] - x[:, 0], 0.5 * x[:, 3] * x[:, 4]], axis=1)
    y = score.argmax(axis=1)
    cut = int(0.75 * n)
    return x[:cut], y[:cut], x[cut:], y[cut:]


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_regression_learns():
    xt, yt, xv, yv = regression_data()
    fitted = mlp(SMALL, 40, Task.regression, 0, 7, xt, yt, xv, yv, device="cpu")
    assert fitted.estimator_format == MLP_FORMAT
    assert fitted.family is ModelFamily.mlp
    assert 1 <= fitted.rounds_used <= 40
    pred = MLPPredictor(fitted.estimator_bytes, Task.regression, 0).predict(xv)
    assert pred.shape == (len(xv),)
    rmse = float(np.sqrt(np.mean((pred - yv) ** 2)))
    assert rmse < 0.35 * float(np.std(yv)), rmse  # far better than predicting the mean


def test_classification_learns_probabilities():
    xt, yt, xv, yv = classification_data()
    fitted = mlp(SMALL, 40, Task.classification, 3, 7, xt, yt, xv, yv, device="cpu")
    probs = MLPPredictor(fitted.estimator_bytes, Task.classification, 3).predict(xv)
    assert probs.shape == (len(xv), 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-9)
    assert float((probs.argmax(axis=1) == yv).mean()) > 0.85


def test_refit_is_bit_identical_and_seed_matters():
    xt, yt, xv, yv = classification_data(n=400)
    a = mlp(SMALL, 6, Task.classification, 3, 11, xt, yt, xv, yv, device="cpu")
    b = mlp(SMALL, 6, Task.classification, 3, 11, xt, yt, xv, yv, device="cpu")
    c = mlp(SMALL, 6, Task.classification, 3, 12, xt, yt, xv, yv, device="cpu")
    assert sha(a.estimator_bytes) == sha(b.estimator_bytes)
    assert sha(a.estimator_bytes) != sha(c.estimator_bytes)


def test_bit_identical_across_processes():
    """Another interpreter (fresh hash seeds, fresh allocator) writes the same bytes."""
    script = """
import hashlib, numpy as np
from contracts.types import Task
from services.platform.ml.fitted import FitRequest
from services.platform.ml.torch_mlp import fit_mlp
rng = np.random.default_rng(0)
x = rng.normal(size=(300, 4)).astype(np.float32); y = x[:, 0] * 2 + x[:, 1]
request = FitRequest({"hidden": 16, "depth": 2}, 4, Task.regression, 0, 5,
                     x[:200], y[:200], x[200:], y[200:], device="cpu")
f = fit_mlp(request)
print(hashlib.sha256(f.estimator_bytes).hexdigest())
"""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    y = x[:, 0] * 2 + x[:, 1]
    here = mlp(
        {"hidden": 16, "depth": 2}, 4, Task.regression, 0, 5, x[:200], y[:200], x[200:], y[200:], device="cpu"
    )
    other = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    assert other.stdout.strip() == sha(here.estimator_bytes)


def test_no_pickle_anywhere(monkeypatch):
    xt, yt, xv, yv = classification_data(n=300)
    data = mlp(
        {"hidden": 8, "depth": 1}, 3, Task.classification, 3, 0, xt, yt, xv, yv, device="cpu"
    ).estimator_bytes
    # a safetensors file: u64 header length, then a JSON header, then raw tensor bytes
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    assert set(header) >= {"__metadata__", "layers.0.weight", "x_mean", "x_std"}
    assert data[:1] != pickle.PROTO
    config = read_mlp_config(data)
    assert config["format"] == MLP_FORMAT and config["task"] == "classification"

    def refuse(*a, **k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert MLPPredictor(data).predict(xv).shape == (len(xv), 3)
    source = (ROOT / "services/platform/ml/torch_mlp.py").read_text()
    assert re.search(r"(?<!safetensors\.)torch\.load\(", source) is None and "import pickle" not in source


def test_fit_restores_torch_global_state():
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    rng_state = torch.get_rng_state()
    xt, yt, xv, yv = regression_data(n=200)
    mlp({"hidden": 8, "depth": 1}, 2, Task.regression, 0, 0, xt, yt, xv, yv, device="cpu")
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == det
    assert torch.equal(torch.get_rng_state(), rng_state)


def test_sample_params_are_seeded_and_fit():
    a = [sample_mlp_params(np.random.default_rng(3)) for _ in range(2)]
    assert a[0] == a[1]
    many = [sample_mlp_params(np.random.default_rng(s)) for s in range(20)]
    assert len({json.dumps(p, sort_keys=True) for p in many}) > 15
    json.dumps(many)  # plain JSON for events
    xt, yt, xv, yv = regression_data(n=200)
    mlp(many[0], 1, Task.regression, 0, 0, xt, yt, xv, yv, device="cpu")
    with pytest.raises(ValueError, match="unknown torch_mlp params"):
        mlp({"max_depth": 3}, 1, Task.regression, 0, 0, xt, yt, xv, yv, device="cpu")
    with pytest.raises(ValueError, match="not text_generation"):
        mlp({}, 1, Task.text_generation, 0, 0, xt, yt, xv, yv, device="cpu")


def test_explicit_cuda_without_gpu_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="cuda"):
        placement.resolve_device("cuda")
    assert placement.resolve_device(None) == "cpu"


# --------------------------------------------------------------------------- placement


def test_placement_rule():
    gpu_cluster = {"GPU": 2.0}
    assert placement.trial_resources("mlp", gpu_cluster) == {"GPU": 1}
    assert placement.trial_resources("transformer", gpu_cluster) == {"GPU": 1}
    assert placement.trial_resources("mlp", {}) == {}
    for family in ("xgboost", "random_forest", "linear"):
        assert placement.trial_resources(family, gpu_cluster) == {}  # measured: trees belong on CPUs
        assert placement.trial_resources(family, {"GPU": 1, "CPU": 8}) == {"CPU": 1}
    assert placement.trial_resources(ModelFamily.transformer, gpu_cluster) == {"GPU": 1}
    assert placement.trial_resources(ModelFamily.xgboost, gpu_cluster) == {}
    assert placement.trial_device({"GPU": 1}) == "cuda"
    assert placement.trial_device({}) == "cpu"


def test_resources_from_scheduler_info():
    info = {
        "workers": {
            "tcp://a": {"resources": {"GPU": 1}},
            "tcp://b": {"resources": {"GPU": 4, "CPU": 1}},
            "tcp://c": {"resources": {}},
            "tcp://d": {},
        }
    }
    assert placement.resources_from_info(info) == {"CPU": 1.0, "GPU": 5.0}
    assert placement.resources_from_info({"workers": {}}) == {}


async def test_cluster_resources_async_client():
    from distributed import Client, LocalCluster

    async with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=False,
            dashboard_address=":0",
            resources={"GPU": 2},
            asynchronous=True,
        ) as cluster,
        Client(cluster, asynchronous=True) as client,
    ):
        available = await placement.cluster_resources_async(client)
        assert available == {"GPU": 2.0}
        assert placement.trial_resources("mlp", available) == {"GPU": 1}
