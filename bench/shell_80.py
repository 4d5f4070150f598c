"""80 hyperparameter trials (XGBoost and random forest) through the whole event pipeline, against
the same 80 trials submitted straight to Dask without the bus, in the same run.

Shell's reference: 80 trials in about 90 s on Kubeflow. Here: a generated 50,000 x 10 table, every
trial at full budget (strategy random), on this machine's cores; then 1 vs 2 Dask workers, and the
default successive-halving search against the full random search.

    .venv/bin/python bench/shell_80.py [--rows 50000] [--budget 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
from distributed import Client, LocalCluster

from contracts import FeaturesBuilt, ModelEvaluated, TrialCompleted, TuningCompleted, TuningRequested  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contracts import DataArrived, SearchStrategy, TuningSpec, new_event  # noqa: E402
from services import supervisor  # noqa: E402
from services.bus.embedded import EmbeddedNats  # noqa: E402
from services.client import Client as CairnClient  # noqa: E402
from services.ml.trial import TrialSpec, run_trial  # noqa: E402
from services.settings import CairnSettings  # noqa: E402


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU time per cairn process (Dask workers, children of training, counted apart)."""
    out: dict[str, float] = {}
    for name, pid in pids.items():
        try:
            proc = psutil.Process(pid)
            out[name] = sum(proc.cpu_times()[:2])
            if name == "training":
                out["dask-workers"] = sum(sum(c.cpu_times()[:2]) for c in proc.children(recursive=True))
        except psutil.NoSuchProcess:
            continue
    return out


def make_table(path: Path, rows: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 9))
    cat = rng.choice(list("abcdefgh"), rows)
    y = (
        2 * x[:, 0]
        + np.sin(2 * x[:, 1])
        + x[:, 2] * x[:, 3]
        + (cat == "a") * 1.5
        + rng.normal(scale=0.5, size=rows)
    )
    frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(9)])
    frame["segment"] = cat
    frame["y"] = y
    frame.to_csv(path, index=False)
    return path


async def pipeline_run(settings: CairnSettings, arrived: DataArrived) -> dict:
    marks: dict[str, float] = {}
    started = time.perf_counter()

    def mark(ev: Any) -> None:
        now = time.perf_counter() - started
        marks.setdefault(f"first:{ev.type}", now)
        marks[f"last:{ev.type}"] = now

    async with CairnClient(settings, "bench") as client:
        run = (await client.run(new_event(arrived, source="/bench"), timeout=600, on_event=mark)).events
    plan = next(e.data for e in run if e.type == TuningRequested.EVENT_TYPE)
    tuned = next(e.data for e in run if e.type == TuningCompleted.EVENT_TYPE)
    evaluated = next(e.data for e in run if e.type == ModelEvaluated.EVENT_TYPE)
    features = next(e.data for e in run if e.type == FeaturesBuilt.EVENT_TYPE)
    trials = [e.data for e in run if e.type == TrialCompleted.EVENT_TYPE]
    return {
        "end_to_end_s": marks[f"last:{run[-1].type}"],
        "terminal": run[-1].type,
        "trial_phase_s": marks["last:cairn.trial.completed.v1"] - marks["first:cairn.trial.requested.v1"],
        "trials_run": len(trials),
        "trial_compute_s": sum(t.duration_s for t in trials),
        "best_validation": tuned.leaderboard[0].score,
        "holdout": evaluated.metrics,
        "plan": plan,
        "features": features,
        "marks": {k: round(v, 3) for k, v in marks.items()},
    }


async def direct_dask(plan, features, workers: int) -> float:
    """The same configurations, straight to a LocalCluster: no bus, no MLflow."""
    cluster = await LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        asynchronous=True,
        silence_logs=40,
    )
    client = await Client(cluster, asynchronous=True)
    try:
        fs = features.featureset
        me = psutil.Process()
        cpu0 = sum(sum(c.cpu_times()[:2]) for c in me.children(recursive=True))
        started = time.perf_counter()
        futures = [
            client.submit(
                run_trial,
                TrialSpec(
                    fs.uri, fs.sha256, c.family.value, dict(c.params), plan.rungs[0].budget,
                    plan.context.task.value, plan.metric.value, plan.context.seed,
                ),
                pure=False,
            )
            for c in plan.configurations
        ]
        await client.gather(futures)
        wall = time.perf_counter() - started
        cpu = sum(sum(c.cpu_times()[:2]) for c in me.children(recursive=True)) - cpu0
        return wall, cpu
    finally:
        await client.close()
        await cluster.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--trials", type=int, default=80)
    parser.add_argument("--budget", type=int, default=100, help="boosting rounds (forest: budget/3 trees)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "shell_80.json"))
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="cairn-bench-"))
    csv = make_table(home / "table.csv", args.rows)
    server = EmbeddedNats(home / "nats")
    server.start()
    settings = CairnSettings(
        home=home, nats_url=server.url, allowed_roots=[str(home)], serve_port=0, dask_workers=os.cpu_count()
    )
    try:
        runtime = supervisor.up(settings)
        assert not supervisor.wait_ready(runtime, 180), "system not ready"
        spec = dict(trials=args.trials, families=["xgboost", "random_forest"], max_budget=args.budget)
        pids = {**runtime["pids"], "nats-server": server.process.pid}
        cpu_before = cpu_seconds(pids)
        full = asyncio.run(
            pipeline_run(
                settings,
                DataArrived(
                    uri=csv.as_uri(),
                    target="y",
                    model_name="shell-random",
                    tuning=TuningSpec(strategy=SearchStrategy.random, **spec),
                ),
            )
        )
        cpu_after = cpu_seconds(pids)
        asha = asyncio.run(
            pipeline_run(
                settings,
                DataArrived(
                    uri=csv.as_uri(),
                    target="y",
                    model_name="shell-asha",
                    tuning=TuningSpec(strategy=SearchStrategy.asha, **spec),
                ),
            )
        )
        supervisor.down(settings)
        two, two_cpu = asyncio.run(direct_dask(full["plan"], full["features"], 2))
        one, _ = asyncio.run(direct_dask(full["plan"], full["features"], 1))
    finally:
        supervisor.down(settings)
        server.stop()
    result = {
        "machine": f"{os.cpu_count()} cores",
        "rows": args.rows,
        "trials": args.trials,
        "budget": args.budget,
        "pipeline_end_to_end_s": round(full["end_to_end_s"], 2),
        "pipeline_trial_phase_s": round(full["trial_phase_s"], 2),
        "direct_dask_2_workers_s": round(two, 2),
        "direct_dask_1_worker_s": round(one, 2),
        "direct_dask_2_workers_cpu_s": round(two_cpu, 2),
        "trial_phase_overhead_vs_direct": round(full["trial_phase_s"] / two - 1, 4),
        "end_to_end_vs_direct": round(full["end_to_end_s"] / two - 1, 4),
        "speedup_1_to_2_workers": round(one / two, 3),
        "random_best_validation_rmse": round(full["best_validation"], 4),
        "random_holdout": {k: round(v, 4) for k, v in full["holdout"].items()},
        "asha_end_to_end_s": round(asha["end_to_end_s"], 2),
        "asha_trials_run": asha["trials_run"],
        "asha_best_validation_rmse": round(asha["best_validation"], 4),
        "asha_holdout": {k: round(v, 4) for k, v in asha["holdout"].items()},
        "cpu_s_during_random_run": {k: round(cpu_after[k] - cpu_before.get(k, 0.0), 2) for k in cpu_after},
        "marks": full["marks"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "marks"}, indent=2))


if __name__ == "__main__":
    main()
