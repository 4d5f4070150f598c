"""The study cairn runs, in one process with Optuna: the peer bench/study_peers.py times cairn against.

Everything but the scheduling is cairn's own code, imported: the table is ingested and its
features built by the ingestion and features steps called as functions (so the split, the
transform and the test rows are the ones cairn's run gets from the same file and seed); tuning's
`plan_study` gives the rungs (33/100/300 rounds at the defaults: Optuna's SuccessiveHalvingPruner
gets the first as min_resource, and eta as reduction factor), the metric and each trial's family;
the search space is `sample_params`, its draws turned into Optuna suggestions (`OptunaDraws`), or,
with `--sampler plan`, the plan's own configurations. Each rung of a trial is `run_trial`, the
function cairn's Dask workers run, from scratch at that budget as cairn does. Then the best trial
is refitted at the full budget (`fit_final`, cairn's final fit) and scored on the test split
(`score_all`, evaluation's metrics). Optuna runs `n_jobs` trials at a time in threads (XGBoost
fits release the GIL).

Optuna is never a dependency of cairn: it lives in .venv-optuna at the repository root
(git-ignored), made by `optuna_python()` on first use. That venv sees the project's .venv through
a .pth line, so cairn's pinned libraries are the ones imported; only optuna, colorlog and tqdm
are installed into it, without dependencies, by the project's pip (pin with CAIRN_BENCH_OPTUNA_SPEC).

    .venv-optuna/bin/python bench/peers/optuna_study.py TABLE.csv --target price [--trials 80]

prints one JSON document: the phases' wall times, the trials per rung, the best trial and the
holdout metrics. The timed wall starts when the file is read, after the imports (cairn's services
are running, their imports long done, when an arrival comes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
OPTUNA_VENV = ROOT / ".venv-optuna"
sys.path.insert(0, str(ROOT))

from contracts import DataArrived, Metric, ModelFamily, SearchStrategy, TuningRequested, TuningSpec  # noqa: E402
from services.features.logic import build  # noqa: E402
from services.ingestion.app import ingest  # noqa: E402
from services.platform.artifacts import ArtifactStore  # noqa: E402
from services.platform.ml import registry  # noqa: E402
from services.platform.ml.featureset import load_featureset  # noqa: E402
from services.platform.ml.metrics import score_all  # noqa: E402
from services.platform.ml.transform import TEST  # noqa: E402
from services.platform.ml.trial import TrialSpec, fit_final, run_trial  # noqa: E402
from services.platform.settings import CairnSettings  # noqa: E402
from services.tuning.logic import plan_study, sample_params  # noqa: E402


def optuna_python(venv: Path = OPTUNA_VENV) -> Path:
    """The python of a venv of its own with Optuna, created and filled on first use; it imports
    everything else from the project's .venv (the interpreter running this), never changing it."""
    exe = venv / "bin" / "python"
    if exe.exists():
        return exe
    spec = os.environ.get("CAIRN_BENCH_OPTUNA_SPEC", "optuna colorlog tqdm").split()
    print(f"creating {venv} for Optuna ({' '.join(spec)}): once", file=sys.stderr)
    # No pip or setuptools of its own: they would shadow the project's; its pip installs here.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    own = subprocess.run(
        [str(exe), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    project = sysconfig.get_paths()["purelib"]
    # addsitedir, not a bare path: the project's own .pth files (cairn's editable install) apply too.
    Path(own, "cairn-project.pth").write_text(f"import site; site.addsitedir({project!r})\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", own, *spec], check=True
    )
    return exe


class OptunaDraws:
    """Stands in for the numpy Generator `sample_params` draws from: each draw is an Optuna
    suggestion over the same range, so the space is cairn's, not a copy. A log-uniform draw is a
    uniform draw of the logarithm there, and stays one here."""

    def __init__(self, trial: Any, family: ModelFamily):
        self.trial, self.family, self.count = trial, family, 0

    def _name(self) -> str:
        self.count += 1
        return f"{self.family.value}.{self.count - 1}"

    def integers(self, low: int, high: int) -> int:
        return self.trial.suggest_int(self._name(), int(low), int(high) - 1)

    def uniform(self, low: float, high: float) -> float:
        return self.trial.suggest_float(self._name(), float(low), float(high))

    def choice(self, options: Any) -> Any:
        return self.trial.suggest_categorical(self._name(), list(options))


def prepare(csv: Path, target: str, spec: TuningSpec, store_dir: Path) -> Any:
    """Ingestion and features as cairn runs them, as functions: the same snapshot, split and arrays."""
    settings = CairnSettings(home=store_dir / "home", allowed_roots=[str(csv.parent)])
    store = ArtifactStore(settings.artifacts)
    ingested = ingest(DataArrived(uri=csv.as_uri(), target=target, tuning=spec), store, settings)
    return build(ingested, store)


def trial_spec(features: Any, family: str, params: dict[str, Any], budget: int, metric: Metric) -> TrialSpec:
    """One fit on the feature set, as cairn's tuning asks its workers for one."""
    fs, ctx = features.featureset, features.context
    return TrialSpec(fs.uri, fs.sha256, family, params, budget, ctx.task.value, metric.value, ctx.seed)


def study(plan: TuningRequested, sampler: str, n_jobs: int) -> Any:
    """Optuna's study over cairn's plan: its rungs, metric and families (trial i's family is plan
    trial i's), the parameters drawn by Optuna from the same space (`plan`: plan trial i's own, so
    both sides try the same configurations). Successive halving as Optuna does it: asynchronous, a
    trial goes on if it is in the top 1/eta of those that reached its rung so far."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rungs, metric = plan.rungs, plan.metric

    def objective(trial: Any) -> float:
        planned = plan.configurations[trial.number]
        family = planned.family
        params = (
            dict(planned.params) if sampler == "plan" else sample_params(family, OptunaDraws(trial, family))
        )
        trial.set_user_attr("family", family.value)
        trial.set_user_attr("params", params)
        value, compute = float("nan"), 0.0
        for i, rung in enumerate(rungs):
            result = run_trial(trial_spec(plan.features, family.value, params, rung.budget, metric))
            value, compute = result["score"], compute + result["duration_s"]
            trial.set_user_attr("compute_s", compute)
            trial.report(value, rung.budget)
            # Not after the last rung: a trial pruned there would have done all its work for nothing.
            if i + 1 < len(rungs) and trial.should_prune():
                raise optuna.TrialPruned()
        return value

    pruner = (
        optuna.pruners.SuccessiveHalvingPruner(
            min_resource=rungs[0].budget, reduction_factor=plan.context.tuning.eta
        )
        if len(rungs) > 1
        else optuna.pruners.NopPruner()
    )
    seed = plan.context.seed
    chosen = (
        optuna.samplers.TPESampler(seed=seed)
        if sampler == "tpe"
        else optuna.samplers.RandomSampler(seed=seed)
    )
    direction = "maximize" if metric.higher_is_better else "minimize"
    done = optuna.create_study(direction=direction, sampler=chosen, pruner=pruner)
    # A trial whose model cannot fit is a failed trial, as in cairn, not the end of the study.
    done.optimize(objective, n_trials=len(plan.configurations), n_jobs=n_jobs, catch=(Exception,))
    return done


def refit_and_score(plan: TuningRequested, best: Any) -> tuple[dict[str, float], float]:
    """The best configuration at the full budget (cairn's final fit), scored on the test split."""
    features, task = plan.features, plan.context.task
    attrs = best.user_attrs
    final = fit_final(
        trial_spec(features, attrs["family"], attrs["params"], plan.context.tuning.max_budget, plan.metric)
    )
    started = time.perf_counter()
    model = registry.predictor(final["format"], final["estimator"], task, final["n_classes"])
    x_test, y_test = load_featureset(features.featureset.uri, features.featureset.sha256).split(TEST)
    return score_all(task, y_test, model.predict(x_test)), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", type=Path)
    parser.add_argument("--target", required=True)
    parser.add_argument("--trials", type=int, default=80)
    parser.add_argument("--budget", type=int, default=300, help="full budget (boosting rounds)")
    parser.add_argument("--eta", type=int, default=3)
    parser.add_argument("--strategy", choices=[s.value for s in SearchStrategy], default="asha")
    parser.add_argument("--families", nargs="+", default=["xgboost", "random_forest"])
    parser.add_argument(
        "--sampler",
        choices=["random", "tpe", "plan"],
        default="random",
        help="Optuna's RandomSampler or TPESampler over cairn's space; plan: cairn's own draws",
    )
    parser.add_argument("--n-jobs", type=int, default=2, help="trials at a time (cairn: one per Dask worker)")
    args = parser.parse_args()
    # Before the clock, like the rest of the imports: what a fit and its score import on first use.
    import optuna
    import sklearn.metrics  # noqa: F401
    import xgboost  # noqa: F401

    spec = TuningSpec(
        trials=args.trials,
        strategy=SearchStrategy(args.strategy),
        families=[ModelFamily(f) for f in args.families],
        max_budget=args.budget,
        eta=args.eta,
    )
    marks = {"start": time.perf_counter()}
    with tempfile.TemporaryDirectory(prefix="cairn-optuna-") as tmp:
        features = prepare(args.csv.resolve(), args.target, spec, Path(tmp))
        load_featureset(features.featureset.uri, features.featureset.sha256)  # once, before two threads ask
        plan = plan_study("optuna-peer", features)
        marks["prepared"] = time.perf_counter()
        done = study(plan, args.sampler, args.n_jobs)
        marks["studied"] = time.perf_counter()
        holdout, scoring_s = refit_and_score(plan, done.best_trial)
        marks["scored"] = time.perf_counter()
    rungs = plan.rungs
    halving = f"SuccessiveHalvingPruner(min_resource={rungs[0].budget}, reduction_factor={args.eta})"
    states = Counter(t.state.name.lower() for t in done.trials)
    fits = Counter(step for t in done.trials for step in t.intermediate_values)
    best = done.best_trial
    print(
        json.dumps(
            {
                "optuna": optuna.__version__,
                "sampler": args.sampler,
                "pruner": halving if len(rungs) > 1 else "none",
                "n_jobs": args.n_jobs,
                "rungs": [r.budget for r in rungs],
                "fits_per_rung": {str(b): fits.get(b, 0) for b in (r.budget for r in rungs)},
                "trials": dict(states),
                "trial_compute_s": sum(t.user_attrs.get("compute_s", 0.0) for t in done.trials),
                "best": {
                    "family": best.user_attrs["family"],
                    "params": best.user_attrs["params"],
                    "validation": best.value,
                },
                "holdout": holdout,
                "splits": features.splits.model_dump(),
                "phases_s": {
                    "prepare": marks["prepared"] - marks["start"],
                    "study": marks["studied"] - marks["prepared"],
                    "refit": marks["scored"] - marks["studied"] - scoring_s,
                    "holdout": scoring_s,
                },
                "wall_s": marks["scored"] - marks["start"],
            }
        )
    )


if __name__ == "__main__":
    main()
