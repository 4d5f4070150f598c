"""The 80-trial diamonds study, cairn against Optuna in one process: arrival to a served champion
against study, refit and holdout score, on the same file with the same split.

cairn runs as `cairn up` runs it (every service its own process, two Dask workers, MLflow, the
endpoint); a DataArrived for the table is published and the run followed until the endpoint
serves the new champion. The peer is bench/peers/optuna_study.py in its own venv (.venv-optuna,
made on first use): the same space, rungs and families, two trials at a time, the same split and
holdout, in one process. Its wall is counted from reading the file, after its imports (cairn's
services have long finished theirs); the process's whole life is reported too. One small run
through cairn, not reported, goes first (its workers' first imports). Rounds are interleaved (the
side that goes first alternates); every figure is a median with [min-max], the ratio a median of
the rounds' own ratios (bench/repeat.py). cairn's phases come from the times its events reach
the follower; the peer's from its own clock.

The table is bench/cache.py's generated diamonds (53,940 rows, price from carat, cut, colour,
clarity); each round gives cairn a new model name, so nothing is served from its step cache.

    .venv/bin/python bench/study_peers.py [--rows 53940] [--trials 80] [--budget 300] [--repeats 3]
        [--strategy asha] [--sampler random|tpe|plan]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cache import diamonds  # noqa: E402
from bench.peers.optuna_study import optuna_python  # noqa: E402
from bench.repeat import ratio_spread, rounded, spread  # noqa: E402
from contracts import (  # noqa: E402
    DataArrived,
    FeaturesBuilt,
    ModelEvaluated,
    ModelFamily,
    SearchStrategy,
    TrialCompleted,
    TrialRequested,
    TuningSpec,
    new_event,
)
from harness.system import System, start_system  # noqa: E402
from services.tools.client import DEPLOYED, Client, wait_until_served  # noqa: E402

OPTUNA_STUDY = Path(__file__).resolve().parent / "peers" / "optuna_study.py"

# cairn's phases: (name, from, to), each a time the follower saw an event ("served": the endpoint
# answered with the new version). The trial phase runs from the first trial requested to the last
# completed; the phases add up to arrival-to-served.
PHASES = (
    ("ingestion", "arrived", "cairn.dataset.ingested.v1"),
    ("features", "cairn.dataset.ingested.v1", "cairn.features.built.v1"),
    ("plan", "cairn.features.built.v1", "cairn.tuning.requested.v1"),
    ("to first trial", "cairn.tuning.requested.v1", "first:cairn.trial.requested.v1"),
    ("trials", "first:cairn.trial.requested.v1", "last:cairn.trial.completed.v1"),
    ("study end", "last:cairn.trial.completed.v1", "cairn.tuning.completed.v1"),
    ("final fit", "cairn.tuning.completed.v1", "cairn.model.trained.v1"),
    ("evaluation", "cairn.model.trained.v1", "cairn.model.evaluated.v1"),
    ("deployment", "cairn.model.evaluated.v1", "cairn.model.deployed.v1"),
    ("endpoint swap", "cairn.model.deployed.v1", "served"),
)


def marks_of(seen: list[tuple[float, Any]]) -> dict[str, float]:
    """Each event type's first time (and the trial events' first and last), seconds from arrival."""
    marks: dict[str, float] = {"arrived": 0.0}
    for at, event in seen:
        marks.setdefault(event.type, at)
        marks.setdefault(f"first:{event.type}", at)
        marks[f"last:{event.type}"] = at
    return marks


def rung_walls(seen: list[tuple[float, Any]]) -> dict[str, float]:
    """Per rung: first trial requested to last completed (the barrier included)."""
    start: dict[int, float] = {}
    end: dict[int, float] = {}
    for at, event in seen:
        if isinstance(event.data, TrialRequested):
            start.setdefault(event.data.rung, at)
        elif isinstance(event.data, TrialCompleted):
            end[event.data.rung] = at
    return {str(r): end[r] - start[r] for r in sorted(start) if r in end}


async def cairn_round(system: System, csv: Path, spec: TuningSpec, model: str) -> dict[str, Any]:
    """Publish the arrival, follow the run to model.deployed, then wait for the endpoint to serve it."""
    seen: list[tuple[float, Any]] = []
    arrival = new_event(
        DataArrived(uri=csv.as_uri(), target="price", model_name=model, tuning=spec),
        source="/bench/study-peers",
    )
    started = time.perf_counter()
    async with Client(system.settings, "bench") as client:
        end = await client.run(
            arrival, timeout=900, on_event=lambda e: seen.append((time.perf_counter() - started, e))
        )
    if end.code != DEPLOYED:
        raise SystemExit(f"cairn's run ended {end.event.type}: {end.event.data}")
    problem = await asyncio.to_thread(
        wait_until_served, system.runtime["serve_url"], model, end.event.data.version, 60.0
    )
    if problem is not None:
        raise SystemExit(f"deployed but not served: {problem}")
    served = time.perf_counter() - started
    marks = {**marks_of(seen), "served": served}
    trials = [e.data for _, e in seen if isinstance(e.data, TrialCompleted)]
    evaluated = next(e.data for _, e in seen if isinstance(e.data, ModelEvaluated))
    features = next(e.data for _, e in seen if isinstance(e.data, FeaturesBuilt))
    return {
        "wall_s": served,
        "phases_s": {name: marks[b] - marks[a] for name, a, b in PHASES},
        "rung_walls_s": rung_walls(seen),
        "fits_per_rung": dict(
            sorted(Counter(str(t.budget) for t in trials).items(), key=lambda kv: int(kv[0]))
        ),
        "trial_compute_s": sum(t.duration_s for t in trials),
        "rung_compute_s": {
            str(r): round(sum(t.duration_s for t in trials if t.rung == r), 3)
            for r in sorted({t.rung for t in trials})
        },
        "holdout": evaluated.metrics,
        "best_family": evaluated.family.value,
        "splits": features.splits.model_dump(),
    }


def optuna_round(python: Path, csv: Path, spec: TuningSpec, sampler: str) -> dict[str, Any]:
    """The peer's study in its own process; its JSON, with the process's whole wall added."""
    command = [
        str(python),
        str(OPTUNA_STUDY),
        str(csv),
        "--target=price",
        f"--trials={spec.trials}",
        f"--budget={spec.max_budget}",
        f"--eta={spec.eta}",
        f"--strategy={spec.strategy.value}",
        f"--sampler={sampler}",
        "--n-jobs=2",
        "--families",
        *[f.value for f in spec.families],
    ]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the Optuna study failed:\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout), "process_s": time.perf_counter() - started}


def summary(cairn: list[dict[str, Any]], peer: list[dict[str, Any]]) -> dict[str, Any]:
    walls = [r["wall_s"] for r in cairn]
    peer_walls = [r["wall_s"] for r in peer]
    return {
        "cairn_arrival_to_served_s": spread(walls),
        "optuna_study_refit_holdout_s": spread(peer_walls),
        "optuna_process_s": spread([r["process_s"] for r in peer]),
        "ratio_cairn_over_optuna": ratio_spread(walls, peer_walls),
        "cairn_holdout_r2": spread([r["holdout"]["r2"] for r in cairn]),
        "optuna_holdout_r2": spread([r["holdout"]["r2"] for r in peer]),
        "cairn_holdout_rmse": spread([r["holdout"]["rmse"] for r in cairn]),
        "optuna_holdout_rmse": spread([r["holdout"]["rmse"] for r in peer]),
        "cairn_phases_s": {name: spread([r["phases_s"][name] for r in cairn]) for name, _, _ in PHASES},
        "optuna_phases_s": {k: spread([r["phases_s"][k] for r in peer]) for k in peer[0]["phases_s"]},
        # The fits' own time (run_trial's clock), summed: more fits, or the same fits slower.
        "cairn_trial_compute_s": spread([r["trial_compute_s"] for r in cairn]),
        "optuna_trial_compute_s": spread([r["trial_compute_s"] for r in peer]),
    }


def line(name: str, s: dict[str, float], unit: str = "s", digits: int = 2) -> str:
    return f"{name:<34} {s['median']:.{digits}f} {unit} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=53_940)
    parser.add_argument("--trials", type=int, default=80)
    parser.add_argument("--budget", type=int, default=300, help="full budget: boosting rounds")
    parser.add_argument("--eta", type=int, default=3)
    parser.add_argument("--strategy", choices=[s.value for s in SearchStrategy], default="asha")
    parser.add_argument("--families", nargs="+", default=["xgboost", "random_forest"])
    parser.add_argument(
        "--sampler", choices=["random", "tpe", "plan"], default="random", help="the peer's sampler"
    )
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "study_peers.json"))
    args = parser.parse_args()
    spec = TuningSpec(
        trials=args.trials,
        strategy=SearchStrategy(args.strategy),
        families=[ModelFamily(f) for f in args.families],
        max_budget=args.budget,
        eta=args.eta,
    )
    python = optuna_python()
    rows: dict[str, list[dict[str, Any]]] = {"cairn": [], "optuna": []}
    load = {"before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="cairn-bench-peers-") as tmp:
        csv = diamonds(Path(tmp) / "diamonds.csv", args.rows)
        system = start_system(Path(tmp))
        try:
            # Warm-up, not counted: the workers import XGBoost and MLflow makes its tables once in
            # a system's life, as the peer's imports happen before its clock starts.
            small = diamonds(Path(tmp) / "warm-up.csv", 2000)
            warm_spec = spec.model_copy(update={"trials": 4, "max_budget": 30})
            asyncio.run(cairn_round(system, small, warm_spec, "warm-up"))
            for round_ in range(args.repeats):
                sides = {
                    "cairn": lambda r=round_: asyncio.run(cairn_round(system, csv, spec, f"diamonds-{r}")),
                    "optuna": lambda: optuna_round(python, csv, spec, args.sampler),
                }
                for name in sorted(sides, reverse=round_ % 2 == 1):  # the first side alternates
                    rows[name].append(sides[name]())
                    print(f"round {round_} {name}: {rows[name][-1]['wall_s']:.2f} s", file=sys.stderr)
        finally:
            system.stop()
    load["after"] = os.getloadavg()
    if any(c["splits"] != p["splits"] for c in rows["cairn"] for p in rows["optuna"]):
        raise SystemExit("cairn and the peer split the table differently: the holdouts are not comparable")
    result = rounded(
        {
            "machine": f"{os.cpu_count()} cores",
            "rows": args.rows,
            "spec": spec.model_dump(mode="json"),
            "peer": {k: rows["optuna"][0][k] for k in ("optuna", "sampler", "pruner", "n_jobs", "rungs")},
            "repeats": args.repeats,
            "load_average_1_5_15": load,
            **summary(rows["cairn"], rows["optuna"]),
            "rounds": rows,
        },
        4,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=2))
    print(line("cairn arrival -> served", result["cairn_arrival_to_served_s"]))
    print(line("optuna study + refit + holdout", result["optuna_study_refit_holdout_s"]))
    print(line("optuna process (with imports)", result["optuna_process_s"]))
    print(line("wall ratio cairn / optuna", result["ratio_cairn_over_optuna"], "x"))
    print(line("holdout R2 cairn", result["cairn_holdout_r2"], "", 4))
    print(line("holdout R2 optuna", result["optuna_holdout_r2"], "", 4))
    print(line("trial compute cairn (fits' clock)", result["cairn_trial_compute_s"]))
    print(line("trial compute optuna (fits' clock)", result["optuna_trial_compute_s"]))
    for name, s in result["cairn_phases_s"].items():
        print(line(f"  cairn {name}", s))
    for name, s in result["optuna_phases_s"].items():
        print(line(f"  optuna {name}", s))


if __name__ == "__main__":
    main()
