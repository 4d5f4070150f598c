"""`make demo`: the whole pipeline on scikit-learn's bundled diabetes data (no download).

Starts cairn (embedded NATS, every service, the inference endpoint), submits the data, follows
the run, then prints the leaderboard, the deployed model's holdout metrics, its lineage one line
per step, and a prediction from the endpoint.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
from sklearn.datasets import load_diabetes

from contracts import (
    DatasetIngested,
    Envelope,
    FeaturesBuilt,
    ModelDeployed,
    ModelEvaluated,
    ModelTrained,
    TuningCompleted,
)
from services.platform.settings import CairnSettings
from services.tools import supervisor
from services.tools.client import Client


def _cairn(home: Path, *args: str) -> int:
    env = {**os.environ, "CAIRN_HOME": str(home), "CAIRN_ALLOWED_ROOTS": json.dumps([str(home)])}
    return subprocess.call([sys.executable, "-m", "services.tools.cli", *args], env=env)


async def run_events(s: CairnSettings) -> list[Envelope[Any]]:
    """Every event of the log (the demo's home has one run)."""
    async with Client(s, "demo") as client:
        return [event async for event in client.events()]


def lineage_lines(events: list, correlation: str) -> list[str]:
    run = [e for e in events if e.correlationid == correlation]
    lines = []
    for e in run:
        d = e.data
        if isinstance(d, DatasetIngested):
            lines.append(
                f"data      {d.source_uri} sha256={d.source_sha256[:16]} -> snapshot {d.dataset.sha256[:16]}"
            )
        elif isinstance(d, FeaturesBuilt):
            lines.append(
                f"features  featureset {d.featureset.sha256[:16]} transform {d.transform.sha256[:16]} "
                f"split {d.splits.train}/{d.splits.validation}/{d.splits.test}"
            )
        elif isinstance(d, TuningCompleted):
            lines.append(
                f"tuning    {d.study_id}: {d.trials_completed} trials ({d.strategy.value}), "
                f"best trial {d.leaderboard[0].trial_id}"
            )
        elif isinstance(d, ModelTrained):
            lines.append(
                f"training  model {d.model.sha256[:16]} {d.family.value} mlflow run {d.mlflow_run_id} "
                f"xgboost {d.versions.get('xgboost')}"
            )
        elif isinstance(d, ModelEvaluated):
            lines.append(f"gate      passed={d.passed}: {'; '.join(d.reasons)}")
        elif isinstance(d, ModelDeployed):
            lines.append(
                f"deployed  {d.model_name} v{d.version} (champion) evidence {d.evidence_event_id[:8]}"
            )
    return lines


def main() -> int:
    home = CairnSettings().home_dir / "demo"
    if (home / "runtime.json").exists():
        supervisor.down(CairnSettings(home=home))
    shutil.rmtree(home, ignore_errors=True)  # a fresh event log and registry each time
    home.mkdir(parents=True)
    s = CairnSettings(home=home, allowed_roots=[str(home)])
    csv = home / "diabetes.csv"
    load_diabetes(as_frame=True, scaled=False).frame.to_csv(csv, index=False)
    print(f"== data: scikit-learn diabetes, 442 rows -> {csv}")
    if _cairn(home, "up", "--detach") != 0:
        return 1
    try:
        print("== submit (default search: successive halving over xgboost, random forest, linear)")
        code = _cairn(home, "submit", str(csv), "--target", "target", "--wait", "--timeout", "600")
        if code != 0:
            print(f"the run did not deploy (exit {code})")
            return code
        settings = s.with_home_credentials("reader")  # `cairn up`'s server admits its users only
        events = asyncio.run(run_events(settings))
        deployed = [e for e in events if isinstance(e.data, ModelDeployed)][-1]
        correlation = deployed.correlationid
        tuned = next(
            e.data for e in events if isinstance(e.data, TuningCompleted) and e.correlationid == correlation
        )
        print(
            f"\n== leaderboard ({tuned.metric.value}, validation split, top 10 of {tuned.trials_completed})"
        )
        for i, row in enumerate(tuned.leaderboard[:10], 1):
            params = ", ".join(f"{k}={v}" for k, v in row.params.items())
            print(f"{i:>3}. {row.family.value:<14} {row.score:10.4f}  budget {row.budget:<4} {params}")
        evaluated = next(
            e.data for e in events if isinstance(e.data, ModelEvaluated) and e.correlationid == correlation
        )
        print("\n== deployed model, holdout (test split) metrics")
        print("    " + json.dumps({k: round(v, 4) for k, v in evaluated.metrics.items()}))
        print("\n== lineage")
        for line in lineage_lines(events, correlation):
            print("    " + line)
        row = load_diabetes(as_frame=True, scaled=False).frame.drop(columns=["target"]).iloc[0].to_dict()
        url = s.runtime()["serve_url"]  # `submit --wait` returned once it served the champion
        response = httpx.post(f"{url}/v1/models/{deployed.data.model_name}/predict", json=row, timeout=30)
        print(f"\n== prediction for {json.dumps(row)}")
        print("    " + response.text)
        print(
            f"\nThe event log stays in {home}: `CAIRN_HOME={home} .venv/bin/cairn up`, then `cairn events`."
        )
        return 0 if response.status_code == 200 else 1
    finally:
        supervisor.down(s)


if __name__ == "__main__":
    raise SystemExit(main())
