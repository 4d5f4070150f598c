"""The registry side of reliability, on real processes: a real `mlflow server` (SQLite, and
PostgreSQL with its own artifact store), a real nats-server, evaluation and two deployment
replicas as in-process runners (each its own NATS connection), models trained for real.

- An MLflow outage during evaluation is waited out (retried), never taken for "no champion".
- Two decisions in flight for one model: the champion moves by compare-and-set; a stale pass is
  re-evaluated, and the final champion is the one that beats the other.
- Every artifact opened is in the artifact store: a registry champion, a manifest's estimator.
- Registering with a real tracking server (PostgreSQL backend) works, and the registered model is
  loaded back through MLflow when cairn's store no longer has it, hash-checked.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from contracts import (
    ArtifactRef,
    DataArrived,
    FeaturesBuilt,
    Metric,
    ModelFamily,
    ModelTrained,
    SearchStrategy,
    TuningSpec,
    new_event,
)
from harness.stream import Record, StreamLog
from services.deployment.app import Deployment
from services.deployment.logic import ChampionRecord
from services.evaluation.app import Challenger, Evaluation, evaluate
from services.features import logic as features
from services.ingestion.app import ingest
from services.platform.artifacts import ArtifactStore, read_verified, sha256_bytes
from services.platform.bus.connection import connect
from services.platform.bus.provision import champion_bucket
from services.platform.ml.bundle import save_bundle
from services.platform.ml.holdout import holdout_frame
from services.platform.ml.trial import TrialSpec, fit_final
from services.platform.runtime import ServiceRunner
from services.platform.settings import CairnSettings
from services.platform.tracking import Tracker
from services.serving.champion import Champions
from services.serving.metrics import EndpointMetrics
from services.tools.supervisor import free_port
from tests.conftest import wait_for

pytestmark = pytest.mark.slow
MLFLOW = Path(sys.executable).parent / "mlflow"
WAIT = 180.0  # generous: two shared cores; nothing here is a timed assertion

# learning rate, rounds: each clearly better than the one before on the holdout (checked below)
BAD, MID, GOOD, BEST = (0.05, 1), (0.1, 5), (0.1, 10), (0.3, 80)
TWO = ("good", "best")
TRAINED = "cairn.model.trained.v1"


# Real processes ------------------------------------------------------------------------------


class MlflowServer:
    """`mlflow server` as a process group, on a fixed port so a restart is found again."""

    def __init__(self, home: Path, backend: str):
        self.home = home
        self.backend = backend
        self.artifacts = home / "mlflow-artifacts"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home / "mlflow-server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(MLFLOW),
                    "server",
                    "--backend-store-uri",
                    self.backend,
                    "--artifacts-destination",
                    str(self.artifacts),
                    "--default-artifact-root",
                    "mlflow-artifacts:/",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--workers",
                    "1",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.2)
        raise AssertionError("mlflow server did not come up: " + self.log.read_text()[-3000:])

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def mlflow_env(monkeypatch):
    """Tracker.from_settings writes MLflow's client variables; restore them after the test."""
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def data(tmp_path_factory) -> Path:
    """Where test data sets live: outside cairn's home (the `settings` fixture's tmp_path)."""
    return tmp_path_factory.mktemp("data")


@contextlib.asynccontextmanager
async def running(*services: Any) -> AsyncIterator[list[ServiceRunner]]:
    runners = [ServiceRunner(s) for s in services]
    started: list[ServiceRunner] = []
    try:
        for runner in runners:
            await runner.start()
            started.append(runner)
        yield runners
    finally:
        for runner in reversed(started):
            await runner.stop()


# Models trained for real ---------------------------------------------------------------------
@dataclass
class Lab:
    """One data set and its feature set, and a factory of models of chosen quality."""

    settings: CairnSettings
    tracker: Tracker
    built: FeaturesBuilt
    store: ArtifactStore

    def train(self, name: str, quality: tuple[float, int]) -> ModelTrained:
        lr, rounds = quality
        params = {"learning_rate": lr, "max_depth": 3}
        fs = self.built
        fs_uri, fs_sha = fs.featureset.uri, fs.featureset.sha256
        fitted = fit_final(TrialSpec(fs_uri, fs_sha, "xgboost", params, rounds, "regression", "rmse", 0))
        spec = json.loads(read_verified(fs.transform.uri, fs.transform.sha256))
        bundle = save_bundle(
            self.store,
            estimator=fitted["estimator"],
            estimator_format=fitted["format"],
            spec=spec,
            family=ModelFamily.xgboost,
            params=params,
            budget=rounds,
        )
        run_id = self.tracker.log_run(
            experiment=name,
            run_name=f"final-{rounds}",
            event_id=f"test-{uuid.uuid4().hex}",
            params=params,
            metrics={"validation_rmse": fitted["validation_score"]},
            tags={"cairn.kind": "model", "cairn.model_sha256": bundle.sha256},
        )
        return ModelTrained(
            context=fs.context.model_copy(update={"model_name": name}),
            study_id="test",
            model=bundle,
            family=ModelFamily.xgboost,
            params=params,
            budget=rounds,
            metric=Metric.rmse,
            validation_score=fitted["validation_score"],
            featureset=fs.featureset,
            transform=fs.transform,
            dataset=fs.dataset,
            mlflow_run_id=run_id,
            versions={"cairn": "test"},
        )

    def rmse(self, trained: ModelTrained) -> float:
        from services.evaluation.app import holdout_metrics
        from services.platform.model_loading import load_from_store

        holdout = holdout_frame(self.built.dataset, self.built.context.seed)
        return holdout_metrics(load_from_store(trained.model, self.settings), holdout)["rmse"]


def make_lab(settings: CairnSettings, data: Path) -> Lab:
    """Ingests a smooth curve from `data` (outside cairn's home, which ingestion never reads)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 2))
    y = 3 * np.sin(x[:, 0]) + x[:, 1] ** 2 + rng.normal(scale=0.1, size=400)
    csv = data / "curve.csv"
    csv.write_text("a,b,y\n" + "\n".join(f"{a:.5f},{b:.5f},{t:.5f}" for (a, b), t in zip(x, y, strict=True)))
    store = ArtifactStore(settings.artifacts)
    spec = TuningSpec(trials=1, families=[ModelFamily.xgboost], strategy=SearchStrategy.random, max_budget=10)
    readable = settings.model_copy(update={"allowed_roots": [str(data)]})
    ingested = ingest(DataArrived(uri=csv.as_uri(), target="y", tuning=spec), store, readable)
    return Lab(settings, Tracker.from_settings(settings), features.build(ingested, store), store)


# The event log -------------------------------------------------------------------------------
async def publish(settings: CairnSettings, payload: Any) -> str:
    event = new_event(payload, source="/test/registry", subject=payload.context.model_name)
    nc = await connect(settings, "test")
    try:
        await nc.jetstream().publish(event.type, event.encode(), headers={"Nats-Msg-Id": event.id})
    finally:
        await nc.close()
    return event.id


def of(log: StreamLog, event_type: str, model: str | None = None) -> list[Record]:
    def name(r: Record) -> str | None:
        d = r.data
        return (
            d.get("model_name")
            or (d.get("context") or {}).get("model_name")
            or (((d.get("evaluated") or {}).get("context") or {}).get("model_name"))
        )

    return [r for r in log.of_type(event_type) if model is None or name(r) == model]


def deployed_sha(log: StreamLog, model: str, sha: str) -> Record | None:
    found = [r for r in of(log, "cairn.model.deployed.v1", model) if r.data["model"]["sha256"] == sha]
    return found[0] if found else None


def judged_model(log: StreamLog, model: str, sha: str) -> list[Record]:
    """Decisions evaluation made about one bundle (not passes a test published itself)."""
    return [
        r
        for r in of(log, "cairn.model.evaluated.v1", model)
        if r.data["model"]["sha256"] == sha and r.doc.get("source") == "/cairn/evaluation"
    ]


def caused(log: StreamLog) -> set[str]:
    """Ids of the events something in the log answered."""
    return {r.doc["causationid"] for r in log.records if r.doc and r.doc.get("causationid")}


def refusals(log: StreamLog) -> list[Record]:
    return of(log, "cairn.event.rejected.v1") + of(log, "cairn.deployment.failed.v1")


async def until(log: StreamLog, done: Any, what: str) -> Any:
    """Wait for `done`, but stop at the first refusal: a run that was refused will not get there."""
    await log.wait(lambda lg: done(lg) or refusals(lg), WAIT, what)
    assert not refusals(log), (what, [r.data for r in refusals(log)])
    return done(log)


async def consumers_idle(settings: CairnSettings, durables: list[str]) -> bool:
    nc = await connect(settings, "test")
    try:
        js = nc.jetstream()
        for durable in durables:
            info = await js.consumer_info(settings.stream, durable)
            if info.num_pending or info.num_ack_pending:
                return False
        return True
    finally:
        await nc.close()


def retried(runner: ServiceRunner, event_type: str) -> float:
    value = runner.service.metrics.registry.get_sample_value(
        "cairn_events_handled_total",
        {"service": runner.service.name, "type": event_type, "outcome": "retried"},
    )
    return value or 0.0


# 1. An outage is not "no champion" -----------------------------------------------------------
async def test_registry_outage_is_waited_out_not_taken_for_no_champion(
    settings, js, tmp_path, data, mlflow_env
):
    """MLflow (a real server on SQLite) is stopped while a worse challenger is evaluated and a better
    one's pass is deployed: both handlers retry with backoff; once the server is back the worse one
    is NOT promoted (compared with the existing champion) and the better one replaces it."""
    server = MlflowServer(tmp_path, f"sqlite:///{tmp_path / 'mlflow-server.db'}")
    server.start()
    try:
        s = settings.model_copy(
            update={"mlflow_uri": server.url, "max_deliver": 60, "retry_backoff_s": [0.5, 1.0, 2.0]}
        )
        lab = make_lab(s, data)
        champion, worse, better = (lab.train("outage", q) for q in (GOOD, BAD, BEST))
        worse_sha = worse.model.sha256
        assert lab.rmse(worse) > lab.rmse(champion) > lab.rmse(better)  # the premise
        log = StreamLog(s)
        async with running(Evaluation(s), Deployment(s)) as (evaluation, deployment):
            await publish(s, champion)
            await until(log, lambda lg: deployed_sha(lg, "outage", champion.model.sha256), "the champion")
            better_pass = evaluate(Challenger.trained(better), lab.tracker, s)
            assert better_pass.passed and better_pass.champion and better_pass.champion.version == 1

            server.stop()
            await publish(s, worse)
            better_id = await publish(s, better_pass)
            await log.wait(
                lambda lg: (
                    retried(deployment, "cairn.model.evaluated.v1") >= 2
                    and (retried(evaluation, TRAINED) >= 2 or judged_model(lg, "outage", worse_sha))
                ),
                WAIT,
                "evaluation and deployment retrying while MLflow is down",
            )
            assert not judged_model(log, "outage", worse_sha), "decided while the registry was down"
            assert not deployed_sha(log, "outage", better.model.sha256), "deployed while MLflow was down"
            assert not refusals(log), [r.data for r in refusals(log)]

            server.start()
            better_sha = better.model.sha256
            judged = await until(log, lambda lg: judged_model(lg, "outage", worse_sha), "worse judged")
            promoted = await until(log, lambda lg: deployed_sha(lg, "outage", better_sha), "better deployed")
        verdict = judged[0].data
        assert verdict["passed"] is False, verdict["reasons"]
        assert (verdict.get("champion") or {}).get("version") in (1, 2), verdict
        assert any("vs champion" in r for r in verdict["reasons"]), verdict["reasons"]
        assert promoted.data["previous_version"] == 1 and promoted.data["evidence_event_id"] == better_id
        assert not refusals(log), [r.data for r in refusals(log)]
        current = Tracker.from_settings(s).champion("outage")
        assert current is not None and current.model_sha256 == better.model.sha256
    finally:
        server.stop()


# 2. Two deployment replicas cannot let stale evidence win ------------------------------------
async def test_two_deployment_replicas_never_let_a_stale_decision_win(settings, js, data, mlflow_env):
    """For each model a champion C, then two passes both made against C: `good` (beats C) and `best`
    (beats both). Sequenced both ways, and at once on two deployment replicas: the final champion is
    always `best`; a pass found stale is re-evaluated against the new champion, never deployed."""
    settings = settings.model_copy(update={"max_deliver": 10})  # SQLite may say "locked" under load
    lab = make_lab(settings, data)
    names = ["seq-good-first", "seq-best-first", "race-1", "race-2", "race-3"]
    quality = {"mid": MID, "good": GOOD, "best": BEST}
    models = {n: {k: lab.train(n, quality[k]) for k in quality} for n in names}
    m0 = models[names[0]]
    assert lab.rmse(m0["mid"]) > lab.rmse(m0["good"]) > lab.rmse(m0["best"])  # the premise
    log = StreamLog(settings)
    durables = [
        "evaluation-model-trained-v1",
        "evaluation-evaluation-requested-v1",
        "deployment-model-evaluated-v1",
    ]
    async with running(Evaluation(settings), Deployment(settings), Deployment(settings)):
        for n in names:
            await publish(settings, models[n]["mid"])
        mids = {n: models[n]["mid"].model.sha256 for n in names}
        await until(log, lambda lg: all(deployed_sha(lg, n, mids[n]) for n in names), "the champions C")
        passes = {  # both made against the champion C = `mid`
            n: {k: evaluate(Challenger.trained(models[n][k]), lab.tracker, settings) for k in TWO}
            for n in names
        }
        for n in names:
            for k in TWO:
                assert passes[n][k].passed and passes[n][k].champion.version == 1, passes[n][k].reasons

        def settled(n: str):
            def check(lg: StreamLog) -> bool:
                good = models[n]["good"].model.sha256
                good_done = deployed_sha(lg, n, good) or any(
                    r.data["model"]["sha256"] == good and not r.data["passed"]
                    for r in of(lg, "cairn.model.evaluated.v1", n)
                )
                return bool(deployed_sha(lg, n, models[n]["best"].model.sha256) and good_done)

            return check

        # One after the other: the second pass is stale when it arrives.
        first, second = ("good", "best"), ("best", "good")
        for n, order in zip(names[:2], (first, second), strict=True):
            await publish(settings, passes[n][order[0]])
            sha = models[n][order[0]].model.sha256
            await until(log, lambda lg, n=n, sha=sha: deployed_sha(lg, n, sha), n)
            await publish(settings, passes[n][order[1]])
        # At once, on two replicas.
        for n in names[2:]:
            await publish(settings, passes[n]["good"])
            await publish(settings, passes[n]["best"])
        await until(log, lambda lg: all(settled(n)(lg) for n in names), "every model settled")
        await wait_for(lambda: consumers_idle(settings, durables), WAIT, "nothing left in flight")
        await log.poll()

    assert not refusals(log), [r.data for r in refusals(log)]
    nc = await connect(settings, "test")
    kv = await nc.jetstream().key_value(champion_bucket(settings.namespace))
    for n in names:
        best = models[n]["best"].model.sha256
        current = lab.tracker.champion(n)
        assert current is not None and current.model_sha256 == best, (n, current)
        record = ChampionRecord.decode((await kv.get(n)).value)
        assert record.model_sha256 == best and record.version == current.version, (n, record)
    await nc.close()
    # The deterministic stale cases went back to evaluation, and were judged against the new champion.
    for n, stale in zip(names[:2], ("best", "good"), strict=True):
        requests = of(log, "cairn.evaluation.requested.v1", n)
        assert [r.data["evaluated"]["model"]["sha256"] for r in requests] == [models[n][stale].model.sha256]
        cause = requests[0].doc["id"]
        again = [r for r in of(log, "cairn.model.evaluated.v1", n) if r.doc.get("causationid") == cause]
        assert len(again) == 1 and again[0].data["champion"]["version"] == 2, again
        assert again[0].data["passed"] is (stale == "best"), again[0].data["reasons"]
    # No stale pass was ever deployed: each deployment replaced the very champion its evidence compared.
    evidence = {e.doc["id"]: e.data for e in of(log, "cairn.model.evaluated.v1")}
    for r in of(log, "cairn.model.deployed.v1"):
        compared = evidence[r.data["evidence_event_id"]].get("champion")
        assert (compared and compared["version"]) == r.data.get("previous_version"), r.data


# 3. Every artifact fetch is checked ----------------------------------------------------------
def outside_copy(lab: Lab, trained: ModelTrained, folder: Path, *, move_manifest: bool) -> ArtifactRef:
    """The same model with its estimator (and, if asked, its manifest) outside the artifact store."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = json.loads(read_verified(trained.model.uri, trained.model.sha256))
    estimator = folder / "estimator.ubj"
    estimator.write_bytes(read_verified(manifest["estimator"]["uri"], manifest["estimator"]["sha256"]))
    manifest["estimator"]["uri"] = estimator.as_uri()
    data = json.dumps(manifest, sort_keys=True).encode()
    if not move_manifest:
        return lab.store.put_bytes(data, trained.model.media_type, ".json")
    (folder / "bundle.json").write_bytes(data)
    return ArtifactRef(
        uri=(folder / "bundle.json").as_uri(),
        sha256=sha256_bytes(data),
        size=len(data),
        media_type=trained.model.media_type,
    )


async def test_every_artifact_outside_the_store_is_refused(settings, js, tmp_path, data, mlflow_env):
    """A registry champion whose source is outside the artifact store, a challenger whose manifest
    names an estimator outside it, a pass whose estimator is outside it: each is refused on its
    first delivery with a reason naming the problem (hashes all right: only the location is wrong)."""
    lab = make_lab(settings, data)  # MLflow on SQLite: it registers any source, so a forgery sticks
    forged = lab.train("forged-champion", GOOD)
    ref = outside_copy(lab, forged, tmp_path / "outside" / "champion", move_manifest=True)
    version = lab.tracker.register(
        "forged-champion",
        source=ref.uri,
        run_id=forged.mlflow_run_id,
        sha256=ref.sha256,
        evidence_event_id="forged",
        size=ref.size,
    )
    lab.tracker.set_champion("forged-champion", version)
    challenger = lab.train("forged-champion", BEST)
    sneaky = lab.train("sneaky-estimator", BEST)
    sneaky_ref = outside_copy(lab, sneaky, tmp_path / "outside" / "est", move_manifest=False)
    sneaky = sneaky.model_copy(update={"model": sneaky_ref})
    passing = lab.train("sneaky-pass", BEST)
    passing_pass = evaluate(Challenger.trained(passing), lab.tracker, settings).model_copy(
        update={"model": outside_copy(lab, passing, tmp_path / "outside" / "pass", move_manifest=False)}
    )
    log = StreamLog(settings)
    async with running(Evaluation(settings), Deployment(settings)):
        ids = [await publish(settings, e) for e in (challenger, sneaky, passing_pass)]
        await log.wait(lambda lg: set(ids) <= caused(lg), WAIT, "an answer to each")
        idle = ["evaluation-model-trained-v1", "deployment-model-evaluated-v1"]
        await wait_for(lambda: consumers_idle(settings, idle), WAIT, "nothing left in flight")
        await log.poll()

    by_cause = {r.doc.get("causationid"): r for r in refusals(log)}
    answers = {r.doc.get("causationid"): r.type for r in log.records if r.doc}
    assert set(ids) <= set(by_cause), f"not refused: {[answers[i] for i in ids if i not in by_cause]}"
    champion_refusal = by_cause[ids[0]].data
    assert "champion v1 of forged-champion cannot be loaded" in champion_refusal["reason"], champion_refusal
    assert "outside the artifact store" in champion_refusal["reason"], champion_refusal
    assert champion_refusal["deliveries"] == 1, champion_refusal  # refused at once, not a retry loop
    estimator_refusal = by_cause[ids[1]].data
    assert "challenger unusable" in estimator_refusal["reason"], estimator_refusal
    assert "outside the artifact store" in estimator_refusal["reason"], estimator_refusal
    assert estimator_refusal["deliveries"] == 1, estimator_refusal
    deploy_refusal = by_cause[ids[2]]
    assert deploy_refusal.type == "cairn.deployment.failed.v1", deploy_refusal.data
    assert "outside the artifact store" in deploy_refusal.data["reason"], deploy_refusal.data
    assert not [r for r in of(log, "cairn.model.evaluated.v1") if r.doc.get("causationid") in ids[:2]]
    assert not of(log, "cairn.model.deployed.v1")
    assert lab.tracker.champion("sneaky-pass") is None


# 4. A real MLflow server, PostgreSQL backend -------------------------------------------------
async def test_registry_on_a_real_mlflow_server_with_postgresql(
    settings, js, tmp_path, postgresql_url, data, mlflow_env
):
    """Deployment registers through a tracking server on PostgreSQL with its own artifact store; the
    version's source is the run's artifacts (`runs:/<run>/cairn-model`). With cairn's store emptied
    of the champion, evaluation and the inference endpoint load it through MLflow, hash-checked, and
    a tampered copy in MLflow's store is refused."""
    server = MlflowServer(tmp_path, postgresql_url)
    server.start()
    try:
        s = settings.model_copy(update={"mlflow_uri": server.url})
        lab = make_lab(s, data)
        first, second = lab.train("pg", GOOD), lab.train("pg", BEST)
        log = StreamLog(s)
        async with running(Evaluation(s), Deployment(s)):
            await publish(s, first)
            await until(log, lambda lg: deployed_sha(lg, "pg", first.model.sha256), "first one deployed")
            champion = lab.tracker.champion("pg")
            assert champion is not None and champion.version == 1
            assert champion.source == f"runs:/{first.mlflow_run_id}/cairn-model", champion
            assert champion.model_uri == first.model.uri and champion.model_sha256 == first.model.sha256
            kept = sorted(p.name for p in server.artifacts.rglob("cairn-model/*"))
            assert {"bundle.json", "estimator", "MLmodel"} <= set(kept), kept

            first_rmse = lab.rmse(first)
            forget(first.model)  # cairn's store no longer has it: only MLflow does
            await publish(s, second)
            judged = await until(log, lambda lg: judged_model(lg, "pg", second.model.sha256), "second judged")
            assert judged[0].data["champion"]["version"] == 1 and judged[0].data["passed"], judged[0].data
            assert judged[0].data["champion_metrics_on_holdout"]["rmse"] == pytest.approx(first_rmse)
            await until(log, lambda lg: deployed_sha(lg, "pg", second.model.sha256), "second deployed")
        assert not refusals(log), [r.data for r in refusals(log)]

        expected = lab.rmse(second)
        forget(second.model)
        endpoint = Champions(s, EndpointMetrics())
        await endpoint.load_champions()
        served = endpoint.models["pg"]
        assert served.version == 2 and served.model.ref.sha256 == second.model.sha256
        holdout = holdout_frame(lab.built.dataset, lab.built.context.seed)
        from services.evaluation.app import holdout_metrics

        assert holdout_metrics(served.model, holdout)["rmse"] == pytest.approx(expected)

        for path in server.artifacts.rglob("cairn-model/bundle.json"):
            path.write_bytes(path.read_bytes().replace(b'"budget"', b'"budgeT"'))
        tampered = Champions(s, EndpointMetrics())
        await tampered.load_champions()
        assert "pg" not in tampered.models
        assert tampered.metrics.refused.labels("pg")._value.get() == 1
    finally:
        server.stop()


def forget(ref: ArtifactRef) -> None:
    """Remove a bundle and its estimator from cairn's artifact store."""
    manifest = json.loads(read_verified(ref.uri, ref.sha256))
    for uri in (manifest["estimator"]["uri"], ref.uri):
        Path(uri.removeprefix("file://")).unlink()
