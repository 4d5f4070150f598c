"""End to end on real NATS, real MLflow (SQLite), a real Dask LocalCluster, every service its own
process (as `cairn up` runs them), and the inference endpoint over HTTP."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
from nats.js.api import DeliverPolicy
from sklearn.datasets import load_breast_cancer, load_diabetes

from contracts import (
    DataArrived,
    Envelope,
    SearchStrategy,
    TuningSpec,
    decode,
    is_dead_letter,
    new_event,
    stream_filter,
)
from services.platform.bus.connection import connect
from services.tools import supervisor
from services.tools.client import Client
from tests.conftest import data_dir, make_settings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    home = tmp_path_factory.mktemp("cairn")
    from services.platform.bus.embedded import EmbeddedNats

    server = EmbeddedNats(home / "nats")
    server.start()
    settings = make_settings(server.url, home, ack_wait_s=30.0)
    try:  # a start that fails leaves nothing running either
        runtime = supervisor.up(settings)
        not_ready = supervisor.wait_ready(runtime, 180)
        assert not not_ready, not_ready
        yield settings, runtime
    finally:
        supervisor.down(settings)
        server.stop()


async def run_pipeline(settings, arrived: DataArrived, timeout: float = 240) -> list[Envelope[Any]]:
    """Publish an arrival and collect its run's events until a terminal one."""
    async with Client(settings, "test") as client:
        return (await client.run(new_event(arrived, source="/test"), timeout=timeout)).events


def of_type(run: list[Envelope[Any]], event_type: str) -> list[Any]:
    return [e.data for e in run if e.type == event_type]


async def served_version(url: str, name: str, version: int) -> dict:
    """Wait until the endpoint serves `name` at `version` (it swaps on the deployed event)."""
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            models = (await client.get(url + "/v1/models")).json()
            if models.get(name, {}).get("version") == version:
                return models[name]
            await asyncio.sleep(0.1)
    raise AssertionError(f"endpoint never served {name} v{version}")


def quick(trials: int, *families: str, strategy: str = "asha", budget: int = 60) -> TuningSpec:
    return TuningSpec(
        trials=trials, strategy=SearchStrategy(strategy), families=list(families), max_budget=budget
    )


async def test_regression_from_arrival_to_served_model(system):
    settings, runtime = system
    csv = data_dir(settings) / "diabetes.csv"
    load_diabetes(as_frame=True, scaled=False).frame.to_csv(csv, index=False)
    run = await run_pipeline(
        settings, DataArrived(uri=csv.as_uri(), target="target", tuning=quick(9, "xgboost", "linear"))
    )
    types = [e.type for e in run]
    for expected in (
        "cairn.dataset.ingested.v1",
        "cairn.features.built.v1",
        "cairn.tuning.requested.v1",
        "cairn.trials.promoted.v1",
        "cairn.tuning.completed.v1",
        "cairn.model.trained.v1",
        "cairn.model.evaluated.v1",
        "cairn.model.deployed.v1",
    ):
        assert expected in types, types
    deployed = of_type(run, "cairn.model.deployed.v1")[0]
    evaluated = of_type(run, "cairn.model.evaluated.v1")[0]
    assert set(evaluated.metrics) == {"rmse", "mae", "r2"} and evaluated.metrics["r2"] > 0.2
    trained = of_type(run, "cairn.model.trained.v1")[0]
    assert trained.versions["xgboost"] and trained.mlflow_run_id
    served = await served_version(runtime["serve_url"], deployed.model_name, deployed.version)
    assert served["sha256"] == deployed.model.sha256
    row = load_diabetes(as_frame=True, scaled=False).frame.drop(columns=["target"]).iloc[:3]
    response = httpx.post(
        f"{runtime['serve_url']}/v1/models/{deployed.model_name}/predict",
        json={"rows": row.to_dict(orient="records")},
    )
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == 3 and all(25 < p < 350 for p in predictions)
    bad = httpx.post(
        f"{runtime['serve_url']}/v1/models/{deployed.model_name}/predict",
        json={"age": "old", "zodiac": "leo"},
    )
    assert bad.status_code == 422 and "zodiac" in bad.text and "age" in bad.text


async def test_classification_from_arrival_to_served_model(system):
    settings, runtime = system
    data = load_breast_cancer(as_frame=True)
    frame = data.frame.iloc[:, list(range(8)) + [-1]].copy()
    frame["target"] = frame["target"].map({0: "malignant", 1: "benign"})
    csv = data_dir(settings) / "cancer.csv"
    frame.to_csv(csv, index=False)
    run = await run_pipeline(
        settings,
        DataArrived(
            uri=csv.as_uri(),
            target="target",
            model_name="cancer",
            tuning=quick(6, "xgboost", "random_forest", "linear"),
        ),
    )
    deployed = of_type(run, "cairn.model.deployed.v1")
    assert deployed, [e.type for e in run]
    evaluated = of_type(run, "cairn.model.evaluated.v1")[0]
    assert evaluated.context.task.value == "classification"
    assert {"accuracy", "f1", "roc_auc", "log_loss"} <= set(evaluated.metrics)
    assert evaluated.metrics["accuracy"] > 0.8
    await served_version(runtime["serve_url"], "cancer", deployed[0].version)
    row = frame.drop(columns=["target"]).iloc[0].to_dict()
    response = httpx.post(f"{runtime['serve_url']}/v1/models/cancer/predict", json=row)
    prediction = response.json()["predictions"][0]
    assert prediction["label"] in {"malignant", "benign"}
    assert sum(prediction["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def nonlinear_csv(path: Path, rows: int = 1500) -> Path:
    rng = np.random.default_rng(3)
    x = rng.uniform(-3, 3, size=(rows, 4))
    y = np.sin(x[:, 0]) * 3 + (x[:, 1] > 0) * x[:, 2] ** 2 + 0.1 * rng.normal(size=rows)
    pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "d": x[:, 3], "y": y}).to_csv(path, index=False)
    return path


async def test_better_model_takes_over_and_worse_one_fails_the_gate(system):
    settings, runtime = system
    csv = nonlinear_csv(data_dir(settings) / "curve.csv")
    first = await run_pipeline(
        settings,
        DataArrived(
            uri=csv.as_uri(), target="y", model_name="curve", tuning=quick(2, "linear", strategy="random")
        ),
    )
    v1 = of_type(first, "cairn.model.deployed.v1")[0]
    await served_version(runtime["serve_url"], "curve", v1.version)

    second = await run_pipeline(
        settings,
        DataArrived(
            uri=csv.as_uri(),
            target="y",
            model_name="curve",
            seed=1,
            tuning=quick(4, "xgboost", strategy="random", budget=150),
        ),
    )
    v2 = of_type(second, "cairn.model.deployed.v1")[0]
    evaluated = of_type(second, "cairn.model.evaluated.v1")[0]
    assert evaluated.champion is not None and evaluated.champion.version == v1.version
    assert evaluated.metrics["rmse"] < evaluated.champion_metrics_on_holdout["rmse"]
    assert v2.version > v1.version and v2.previous_version == v1.version
    await served_version(runtime["serve_url"], "curve", v2.version)

    third = await run_pipeline(
        settings,
        DataArrived(
            uri=csv.as_uri(),
            target="y",
            model_name="curve",
            seed=2,
            tuning=quick(2, "linear", strategy="random"),
        ),
    )
    failed = of_type(third, "cairn.model.evaluated.v1")[0]
    assert not failed.passed and "not better" in " ".join(failed.reasons)
    assert not of_type(third, "cairn.model.deployed.v1")
    served = (httpx.get(runtime["serve_url"] + "/v1/models")).json()["curve"]
    assert served["version"] == v2.version and served["sha256"] == v2.model.sha256


async def test_rejected_dataset_never_reaches_training(system):
    settings, _ = system
    csv = data_dir(settings) / "no_target.csv"
    csv.write_text("a,b\n" + "".join(f"{i},{i * 2}\n" for i in range(50)))
    run = await run_pipeline(settings, DataArrived(uri=csv.as_uri(), target="y"))
    assert [e.type for e in run] == ["cairn.data.arrived.v1", "cairn.data.rejected.v1"]
    assert "target column 'y' not found" in run[-1].data.reason
    nc = await connect(settings, "test")
    try:
        js = nc.jetstream()
        sub = await js.subscribe(stream_filter(), ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
        last = (await js.stream_info("CAIRN")).state.last_seq
        later = []
        while True:
            msg = await sub.next_msg(timeout=5)
            if not is_dead_letter(msg.subject) and decode(msg.data).correlationid == run[0].id:
                later.append(msg.subject)
            if msg.metadata.sequence.stream >= last:
                break
    finally:
        await nc.close()
    assert "cairn.trial.requested.v1" not in later and "cairn.dataset.ingested.v1" not in later


def stdlib_corpus(folder: Path) -> Path:
    """A real corpus every machine has: the standard library's json package sources."""
    import json as json_module

    corpus = folder / "corpus"
    corpus.mkdir(exist_ok=True)
    source = Path(json_module.__file__).parent
    for name in ("__init__.py", "decoder.py", "encoder.py", "scanner.py"):
        (corpus / name).write_bytes((source / name).read_bytes())
    return corpus


async def test_text_generation_from_corpus_to_generate_and_bit_identical_replay(system):
    from services.tools.replay import replay

    settings, runtime = system
    corpus = stdlib_corpus(data_dir(settings))
    spec = TuningSpec(trials=2, strategy=SearchStrategy.random, max_budget=40, vocab_size=320)
    arrived = DataArrived(uri=corpus.as_uri(), task="text_generation", model_name="pytext", tuning=spec)
    run = await run_pipeline(settings, arrived)
    types = [e.type for e in run]
    assert types[-1] == "cairn.model.deployed.v1", types
    features = of_type(run, "cairn.features.built.v1")[0]
    assert features.splits.train > features.splits.test > 0
    trials = of_type(run, "cairn.trial.completed.v1")
    assert {t.family.value for t in trials} == {"transformer"} and all(t.score > 1 for t in trials)
    evaluated = of_type(run, "cairn.model.evaluated.v1")[0]
    assert evaluated.metric.value == "perplexity" and evaluated.metrics["perplexity"] < 320
    await served_version(runtime["serve_url"], "pytext", of_type(run, "cairn.model.deployed.v1")[0].version)

    body = {"prompt": "def ", "max_tokens": 12, "temperature": 0.8, "top_k": 20, "seed": 7}
    url = f"{runtime['serve_url']}/v1/models/pytext/generate"
    first, again = httpx.post(url, json=body, timeout=60), httpx.post(url, json=body, timeout=60)
    assert first.status_code == 200, first.text
    assert first.json()["text"] == again.json()["text"], "same seed, same text"
    assert first.json()["tokens"] <= 12
    other = httpx.post(url, json={**body, "seed": 8}, timeout=60).json()["text"]
    greedy = httpx.post(url, json={**body, "temperature": 0}, timeout=60).json()["text"]
    assert isinstance(other, str) and isinstance(greedy, str)
    too_many = httpx.post(url, json={**body, "max_tokens": 100_000}, timeout=60)
    assert too_many.status_code == 422

    reports = await replay(settings, correlation=run[0].correlationid, timeout=300)
    assert reports[0].identical, [(c.step, c.what) for c in reports[0].comparisons if not c.same]
    assert any(c.what == "model sha256" for c in reports[0].comparisons)


async def test_mlp_family_inside_a_tabular_tuning_run(system):
    settings, runtime = system
    csv = nonlinear_csv(data_dir(settings) / "mlp.csv", rows=800)
    spec = quick(4, "mlp", "linear", strategy="random", budget=30)
    arrived = DataArrived(uri=csv.as_uri(), target="y", model_name="mlpcurve", tuning=spec)
    run = await run_pipeline(settings, arrived)
    trials = of_type(run, "cairn.trial.completed.v1")
    mlp = [t for t in trials if t.family.value == "mlp"]
    assert len(mlp) == 2 and all(t.status.value == "ok" for t in mlp), trials
    deployed = of_type(run, "cairn.model.deployed.v1")
    assert deployed, [e.type for e in run]
    await served_version(runtime["serve_url"], "mlpcurve", deployed[0].version)
    row = {"a": 0.1, "b": 1, "c": 2, "d": 0}
    response = httpx.post(f"{runtime['serve_url']}/v1/models/mlpcurve/predict", json=row)
    assert response.status_code == 200 and isinstance(response.json()["predictions"][0], float)
