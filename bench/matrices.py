"""The study's fits with XGBoost matrices kept per worker thread against matrices built per fit.

The first 20 trials of the 80-trial diamonds plan (bench/cache.py's table, 53,940 rows), each at
rungs 0 and 1 (33 and 100 rounds), through `run_trial` on a two-worker LocalCluster configured as
cairn's: 40 fits a round. The "per fit" side drops its worker's kept matrices before each fit (as
every fit was before services.platform.ml.matrices). Rounds alternate which side goes first; each
figure is the median of the rounds with [min-max], the ratio the median of the rounds' own ratios.
Reported: the fits' own clocks added up (what the study's trial compute counts) and the wall.

    .venv/bin/python bench/matrices.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cache import diamonds  # noqa: E402
from bench.peers.optuna_study import prepare, trial_spec  # noqa: E402
from bench.repeat import ratio_spread, rounded, spread  # noqa: E402
from contracts import ModelFamily, SearchStrategy, TuningSpec  # noqa: E402
from services.platform.ml.trial import TrialSpec, run_trial  # noqa: E402
from services.tuning.logic import plan_study  # noqa: E402


def run_trial_building_matrices(spec: TrialSpec) -> dict[str, Any]:
    """`run_trial` as before the kept matrices: the worker's pair is dropped first."""
    from services.platform.ml import matrices

    matrices._KEPT.matrices = None
    return run_trial(spec)


def fits(client: Any, fn: Any, specs: list[TrialSpec]) -> dict[str, float]:
    client.gather(client.map(fn, specs[:2], pure=False))  # both workers warm, their feature set loaded
    started = time.perf_counter()
    results = client.gather(client.map(fn, specs, pure=False))
    return {"wall_s": time.perf_counter() - started, "fits_clock_s": sum(r["duration_s"] for r in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import dask
    from dask.distributed import Client, LocalCluster

    from services.platform.compute import LOCAL_CLUSTER_CONFIG

    with tempfile.TemporaryDirectory(prefix="cairn-matrices-") as tmp:
        spec = TuningSpec(
            trials=80,
            strategy=SearchStrategy.asha,
            families=[ModelFamily.xgboost, ModelFamily.random_forest],
            max_budget=300,
            eta=3,
        )
        features = prepare(diamonds(Path(tmp) / "diamonds.csv", 53_940), "price", spec, Path(tmp))
        plan = plan_study("bench-matrices", features)
        specs = [
            trial_spec(features, c.family.value, c.params, rung.budget, plan.metric)
            for c in plan.configurations[:20]
            for rung in plan.rungs[:2]
        ]
        sides = {"kept": run_trial, "per_fit": run_trial_building_matrices}
        rows: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
        with (
            dask.config.set(LOCAL_CLUSTER_CONFIG),
            LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster,
            Client(cluster) as client,
        ):
            for i in range(args.repeats):
                for name in sorted(sides, reverse=bool(i % 2)):
                    rows[name].append(fits(client, sides[name], specs))
                    print(f"round {i} {name}: {rows[name][-1]['fits_clock_s']:.2f} s", file=sys.stderr)

    def column(name: str, key: str) -> list[float]:
        return [r[key] for r in rows[name]]

    report = {"fits_per_round": len(specs), "repeats": args.repeats}
    for key in ("fits_clock_s", "wall_s"):
        report[key] = {name: spread(column(name, key)) for name in sides}
        report[f"{key}_kept_over_per_fit"] = ratio_spread(column("kept", key), column("per_fit", key))
    print(json.dumps(rounded(report), indent=2))


if __name__ == "__main__":
    main()
