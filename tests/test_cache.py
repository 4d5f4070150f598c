"""The step cache as a user meets it: `cairn up` on a fresh home, `cairn submit` in subprocesses.

Resubmitting identical data runs no trial and ends with the same champion; one changed row, or
`--no-cache`, computes again; keys move with the library versions of the steps they touch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from contracts import (
    DataArrived,
    DatasetIngested,
    FeaturesBuilt,
    PipelineContext,
    Task,
    TuningSpec,
    new_event,
)
from services.platform.cache import (
    CACHED_FROM,
    NO_CACHE,
    StepVersion,
    carry_no_cache,
    entry_of,
    served,
    wants_cache,
)
from services.platform.settings import CairnSettings
from tests.test_journeys import cairn, write_table

TINY = ["--trials", "2", "--max-budget", "6", "--strategy", "random", "--families", "xgboost"]
TRIAL = "cairn.trial.requested.v1"
PLAN = "cairn.tuning.requested.v1"
DEPLOYED = "cairn.model.deployed.v1"


# Keys: pure functions ----------------------------------------------------------------------------
def test_a_library_upgrade_moves_the_keys_of_the_steps_it_touches_only() -> None:
    from services.ingestion import app as ingestion
    from services.tuning import app as tuning

    arrived = DataArrived(uri="file:///data/houses.csv", target="price", sha256="a" * 64)
    now, upgraded = CairnSettings(), CairnSettings(cache_libraries={"xgboost": "99.0"})

    def key(
        settings: CairnSettings, step: str, code: tuple[str, ...], libs: tuple[str, ...], inputs: Any
    ) -> str:
        return StepVersion.of(step, code, libs, settings).key(inputs)

    ingest = ("ingestion", ("ingestion",), ingestion.LIBRARIES, arrived.model_dump(mode="json"))
    tune = ("tuning", tuning.CODE, tuning.LIBRARIES, {"features": "f" * 64})
    assert key(now, *ingest) == key(upgraded, *ingest), "xgboost does not compute ingestion"
    assert key(now, *tune) != key(upgraded, *tune), "an xgboost upgrade must recompute tuning"
    changed = arrived.model_copy(update={"sha256": "b" * 64}).model_dump(mode="json")
    assert key(now, *ingest) != key(now, "ingestion", ("ingestion",), ingestion.LIBRARIES, changed)
    seeded = arrived.model_copy(update={"seed": 1}).model_dump(mode="json")
    assert key(now, *ingest) != key(now, "ingestion", ("ingestion",), ingestion.LIBRARIES, seeded)


def test_imports_are_found_in_every_form_the_source_writes_them() -> None:
    from services.platform.cache import module_imports

    source = """
import services.platform.ml.transform as t
from contracts import DataArrived
from . import logic
from ..platform import settings
from ..platform.ml.textgen import tokenizer

def later():
    from services.ingestion.text import ingest_text
    import importlib
    return importlib.import_module("services.platform.tracking")
"""
    found = module_imports("services.ingestion.app", source)
    for name in (
        "services.platform.ml.transform",
        "contracts",
        "contracts.DataArrived",
        "services.ingestion.logic",
        "services.platform.settings",
        "services.platform.ml.textgen.tokenizer",
        "services.ingestion.text",
        "services.platform.tracking",
    ):
        assert name in found, name
    # In a package's __init__, `.` is the package itself.
    imported = module_imports("services.platform.ml", "from .transform import x", True)
    assert "services.platform.ml.transform" in imported


def test_a_step_key_covers_every_project_module_it_imports_transitively() -> None:
    """Ingestion imports `services.platform.ml.transform` and the tokenizer only through its own modules:
    a change there is a new key (a miss), while a module no step imports moves no key."""
    from services.features import app as features
    from services.ingestion import app as ingestion
    from services.platform.cache import PROJECT_ROOT, code_hash, project_sources
    from services.tuning import app as tuning

    sources = project_sources(PROJECT_ROOT)
    steps = {"ingestion": ingestion.CODE, "features": features.CODE, "tuning": tuning.CODE}

    def edited(module: str) -> dict[str, tuple[str, bytes]]:
        path, source = sources[module]
        return {**sources, module: (path, source.replace(b"\n", b"\n# one line changed\n", 1))}

    before = {step: code_hash(code, sources) for step, code in steps.items()}
    modules = ("services.platform.ml.transform", "services.platform.ml.textgen.tokenizer", "contracts.types")
    for module in modules:
        assert code_hash(ingestion.CODE, edited(module)) != before["ingestion"], module
    unrelated = edited("services.tools.cli.render")
    assert {step: code_hash(code, unrelated) for step, code in steps.items()} == before


def test_a_service_started_from_changed_code_misses_the_cache(tmp_path: Path) -> None:
    """The real ingestion service, imported from a copy of the project (the checkout is never
    touched): one line changed in `services/platform/ml/transform.py` gives its route a new cache key for
    the same arrival, so a resubmission computes; a change to the CLI leaves the key as it was."""
    import shutil
    import subprocess
    import sys

    project = Path(__file__).resolve().parents[1]
    for package in ("services", "contracts"):
        shutil.copytree(project / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    probe = (
        "import services, sys; from pathlib import Path\n"
        "assert Path(services.__file__).is_relative_to(Path.cwd()), services.__file__\n"
        "from contracts import DataArrived\n"
        "from services.ingestion.app import Ingestion\n"
        "from services.platform.settings import CairnSettings\n"
        "arrived = DataArrived(uri='file:///data/houses.csv', target='price', sha256='a' * 64)\n"
        "[route] = Ingestion(CairnSettings()).routes()\n"
        "print(route.cache_version.key(arrived.model_dump(mode='json')))\n"
    )

    def key() -> str:
        run = subprocess.run(
            [sys.executable, "-c", probe],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert run.returncode == 0, run.stderr
        return run.stdout.strip().splitlines()[-1]

    def change(relative: str) -> None:
        path = tmp_path / relative
        path.write_text(path.read_text().replace("\n", "\n# one line changed\n", 1))

    first = key()
    change("services/tools/cli/render.py")
    assert key() == first, "a module ingestion never imports moved its key"
    change("services/platform/ml/transform.py")
    assert key() != first, "ingestion's key ignored a change to code it computes with"


def test_without_a_checksum_an_arrival_is_not_cacheable() -> None:
    from services.ingestion.app import cache_inputs

    event = new_event(DataArrived(uri="file:///data/houses.csv", target="price"), source="/test")
    assert cache_inputs(event) is None


def test_served_outputs_are_new_events_of_this_run_marked_with_their_origin() -> None:
    ctx = PipelineContext(
        model_name="houses-price", target="price", task=Task.regression, seed=0, tuning=TuningSpec()
    )
    ref = {"uri": "file:///s/a.parquet", "sha256": "c" * 64, "size": 1, "media_type": "x"}
    first_cause = new_event(DataArrived(uri="file:///d.csv", target="price"), source="/cli")
    produced = new_event(
        DatasetIngested(
            context=ctx, source_uri="file:///d.csv", source_sha256="d" * 64, dataset=ref, rows=40, columns=[]
        ),
        source="/cairn/ingestion",
        cause=first_cause,
    )
    again = new_event(DataArrived(uri="file:///d.csv", target="price"), source="/cli")
    again = again.model_copy(update={NO_CACHE: "true"})
    [out] = carry_no_cache(again, served(entry_of([produced]), again, "/cairn/ingestion"))
    assert out.data == produced.data
    assert out.id != produced.id and out.correlationid == again.id and out.causationid == again.id
    assert out.model_extra[CACHED_FROM] == produced.id
    assert not wants_cache(out), "--no-cache travels with the run"
    # Served again from a served copy, the origin stays the event that computed it.
    [twice] = served(entry_of([out]), first_cause, "/cairn/ingestion")
    assert twice.model_extra[CACHED_FROM] == produced.id
    assert served(entry_of([out]), again, "/x")[0].id == out.id, "a redelivery gets the same ids"


def test_a_replay_namespace_never_uses_the_cache() -> None:
    from services.platform.cache import StepCache

    assert StepCache(None, CairnSettings()).enabled
    assert not StepCache(None, CairnSettings(namespace="cairn.replay.abc")).enabled
    assert not StepCache(None, CairnSettings(cache=False)).enabled


# The user's path ---------------------------------------------------------------------------------
@pytest.fixture
def system(retention_system: dict) -> dict:
    return retention_system


def submit(system: dict, path: Path, *extra: str) -> tuple[int, list[dict[str, Any]]]:
    """Submit, follow to the end, and return the exit code and the run's events as JSON."""
    run = cairn(
        "submit",
        str(path),
        "--target",
        "price",
        *TINY,
        *extra,
        "--wait",
        "--timeout",
        "240",
        env=system["env"],
        cwd=system["root"],
        timeout=270,
    )
    found = re.search(r"correlation ([0-9a-f-]{36})", run.stdout)
    assert found, run.stdout + run.stderr
    listing = cairn(
        "events", "--json", "--correlation", found.group(1), env=system["env"], cwd=system["root"]
    )
    assert listing.returncode == 0, listing.stderr
    return run.returncode, [json.loads(line) for line in listing.stdout.splitlines() if line.startswith("{")]


def of_type(events: list[dict[str, Any]], event_type: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == event_type]


@pytest.mark.slow
def test_resubmission_is_served_from_cache_and_changes_recompute(system: dict, tmp_path: Path) -> None:
    data = write_table(tmp_path / "data", rows=100)
    code, first = submit(system, data)
    assert code == 0, first
    assert of_type(first, TRIAL), "the first run computes its trials"
    assert not any(CACHED_FROM in e for e in first)
    [champion] = of_type(first, DEPLOYED)

    # Identical data: every cached step is served, no trial runs, the champion stays as it was.
    code, again = submit(system, data)
    assert code == 0, again
    assert not of_type(again, TRIAL) and not of_type(again, PLAN), "a resubmission runs no trial"
    first_ids = {e["type"]: e["id"] for e in first}
    for step in (DatasetIngested, FeaturesBuilt):
        [served_event] = of_type(again, step.EVENT_TYPE)
        assert served_event[CACHED_FROM] == first_ids[step.EVENT_TYPE]
    [completed] = of_type(again, "cairn.tuning.completed.v1")
    assert completed[CACHED_FROM] == first_ids["cairn.tuning.completed.v1"]
    [same] = of_type(again, DEPLOYED)
    assert same["data"]["version"] == champion["data"]["version"], (
        "no new registry version for the same model"
    )
    assert same["data"]["model"]["sha256"] == champion["data"]["model"]["sha256"]

    for service, step in (("ingestion", "ingestion"), ("tuning", "tuning")):
        metrics = httpx.get(system["health"][service] + "/metrics").text
        assert f'cairn_cache_hits_total{{service="{service}",step="{step}"}} 1.0' in metrics, metrics

    # --no-cache: computed again, and the flag travels with every event of the run.
    code, forced = submit(system, data, "--no-cache")
    assert code in (0, 3), forced
    assert of_type(forced, TRIAL)
    assert all(e.get(NO_CACHE) for e in forced), "every event of the run carries nocache"
    assert not any(CACHED_FROM in e for e in forced)

    # One changed row: a new file hash, so everything from ingestion on is computed again.
    lines = data.read_text().splitlines()
    lines[5] = lines[5].replace(lines[5].split(",")[0], "1.23456", 1)
    changed = tmp_path / "changed" / "houses.csv"
    changed.parent.mkdir()
    changed.write_text("\n".join(lines) + "\n")
    code, recomputed = submit(system, changed)
    assert code in (0, 3), recomputed
    assert of_type(recomputed, TRIAL)
    [ingested] = of_type(recomputed, DatasetIngested.EVENT_TYPE)
    assert CACHED_FROM not in ingested
    assert (
        ingested["data"]["dataset"]["sha256"]
        != of_type(first, DatasetIngested.EVENT_TYPE)[0]["data"]["dataset"]["sha256"]
    )


def test_an_entry_the_contracts_no_longer_read_is_a_miss() -> None:
    cause = new_event(DataArrived(uri="file:///d.csv", target="price"), source="/cli")
    retired = {"outputs": [{"type": "cairn.retired.v0", "subject": None, "data": {}, "id": "x"}]}
    changed = {
        "outputs": [{"type": DatasetIngested.EVENT_TYPE, "subject": None, "data": {"rows": 0}, "id": "x"}]
    }
    assert served(retired, cause, "/cairn/ingestion") == []
    assert served(changed, cause, "/cairn/ingestion") == []
    assert served(None, cause, "/cairn/ingestion") == []
