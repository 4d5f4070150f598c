"""Compatibility is judged against a release, not the working tree (docs/CONTRACTS.md).

Each test copies ``contracts/`` into a temp folder, changes it the way a developer would, and drives
`cairn schemas` and `python -m contracts.schemas` with that copy first on PYTHONPATH, so the repo's
own files and release snapshots are never touched.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from contracts.schemas import RELEASES_DIR, edited_release, latest_release
from tests.rolling.builds import NEW_FIELD, NEW_VALUE, next_build

ROOT = Path(__file__).resolve().parents[1]
CAIRN = str(Path(sys.executable).with_name("cairn"))
TRIAL = "cairn.trial.completed.v1"
REMOVED = "    mlflow_run_id: RunId | None = None\n"  # TrialCompleted's; the other events' are required


def _run(args: list[str], build: Path, home: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "PYTHONPATH": str(build)}
    return subprocess.run(args, env=env, cwd=home, capture_output=True, text=True, check=False)


def _cairn(build: Path, home: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return _run([CAIRN, "schemas", *flags], build, home)


def _copy(into: Path) -> Path:
    shutil.copytree(ROOT / "contracts", into / "contracts", ignore=shutil.ignore_patterns("__pycache__"))
    return into


def _edit(build: Path, old: str, new: str) -> None:
    events = build / "contracts" / "events.py"
    text = events.read_text()
    assert text.count(old) == 1, "the edit no longer applies to contracts/events.py: update the test"
    events.write_text(text.replace(old, new))


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _regenerate_without_the_guard(build: Path, home: Path) -> None:
    """What a developer could always do: make the working tree agree with a breaking model."""
    script = (
        "from contracts.schemas import ASYNCAPI_PATH, SCHEMA_DIR, asyncapi_text, schema_files\n"
        "for name, text in schema_files().items(): (SCHEMA_DIR / name).write_text(text)\n"
        "ASYNCAPI_PATH.write_text(asyncapi_text())\n"
    )
    assert _run([sys.executable, "-c", script], build, home).returncode == 0


def test_the_committed_releases_are_intact_and_not_ahead_of_the_project() -> None:
    latest = latest_release()
    assert latest is not None, "no release snapshot in contracts/releases/: `cairn schemas --release`"
    for manifest in RELEASES_DIR.glob("*/manifest.json"):
        assert edited_release(manifest.parent) == [], "a release snapshot is never edited"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert tuple(map(int, latest.name.split("."))) <= tuple(map(int, project.split(".")))
    assert json.loads((latest / "manifest.json").read_text())["version"] == latest.name


def test_a_removed_field_is_refused_against_the_release_even_with_a_regenerated_working_tree(
    tmp_path: Path,
) -> None:
    build = _copy(tmp_path / "build")
    _edit(build, REMOVED, "")
    contracts = build / "contracts"
    before, release_before = _digest(contracts / "schemas"), _digest(contracts / "releases")
    named = f"{TRIAL}: data.mlflow_run_id: field removed"

    module = _run([sys.executable, "-m", "contracts.schemas"], build, tmp_path)
    assert module.returncode == 1
    assert named in module.stderr
    assert "1 backward-incompatible change(s) against release 0.1.0" in module.stderr
    cli = _cairn(build, tmp_path)
    assert cli.returncode == 1
    assert named in cli.stderr
    assert _digest(contracts / "schemas") == before, "a refused write writes nothing"

    _regenerate_without_the_guard(build, tmp_path)
    assert _digest(contracts / "schemas") != before
    check = _cairn(build, tmp_path, "--check")
    assert check.returncode == 1, "the working tree agrees with the model, the release does not"
    assert named in check.stderr
    assert "generated file" not in check.stderr
    assert _digest(contracts / "releases") == release_before


def test_an_edited_release_snapshot_is_named(tmp_path: Path) -> None:
    build = _copy(tmp_path / "build")
    _edit(build, REMOVED, "")
    _regenerate_without_the_guard(build, tmp_path)
    released = build / "contracts" / "releases" / "0.1.0" / "schemas" / f"{TRIAL}.json"
    shutil.copyfile(build / "contracts" / "schemas" / f"{TRIAL}.json", released)  # "regenerate" it too

    check = _cairn(build, tmp_path, "--check")
    assert check.returncode == 1
    assert f"release 0.1.0: schemas/{TRIAL}.json changed since the release was cut" in check.stderr


def test_a_release_is_cut_once_and_then_judges_the_next_change(tmp_path: Path) -> None:
    build = next_build("optional-field", tmp_path)  # DatasetIngested gained NEW_FIELD
    releases = build / "contracts" / "releases"
    original = _digest(releases)
    (build / "pyproject.toml").write_text('[project]\nversion = "0.1.0"\n')
    again = _cairn(build, tmp_path, "--release")
    assert again.returncode == 1
    assert "release 0.1.0 already has a snapshot" in again.stderr
    assert _digest(releases) == original

    (build / "pyproject.toml").write_text('[project]\nversion = "0.2.0"\n')
    early = _cairn(build, tmp_path, "--release")
    assert early.returncode == 1, "a release is what is committed: the generated files must be current"
    assert "contracts/schemas/cairn.dataset.ingested.v1.json: not what the models generate" in early.stderr
    assert not (releases / "0.2.0").exists()

    assert _cairn(build, tmp_path).returncode == 0
    cut = _cairn(build, tmp_path, "--release")
    assert cut.returncode == 0, cut.stderr
    assert cut.stdout.strip().endswith(str(releases / "0.2.0"))
    assert json.loads((releases / "0.2.0" / "manifest.json").read_text())["version"] == "0.2.0"
    assert _digest(releases / "0.1.0") == {k.removeprefix("0.1.0/"): v for k, v in original.items()}
    check = _cairn(build, tmp_path, "--check")
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip().endswith("compatible with release 0.2.0; the generated files are current")

    field = f'    {NEW_FIELD}: str | None = Field("{NEW_VALUE}", description="Profiler.")\n'
    _edit(build, field, "")  # compatible with 0.1.0, but 0.2.0 released the field
    dropped = _cairn(build, tmp_path)
    assert dropped.returncode == 1
    assert f"cairn.dataset.ingested.v1: data.{NEW_FIELD}: field removed" in dropped.stderr
    assert "against release 0.2.0" in dropped.stderr


def test_without_a_release_the_check_refuses_and_the_first_one_can_be_cut(tmp_path: Path) -> None:
    build = _copy(tmp_path / "build")
    shutil.rmtree(build / "contracts" / "releases")
    check = _cairn(build, tmp_path, "--check")
    assert check.returncode == 1, "with nothing to judge against, anything would pass"
    assert "no release snapshot in" in check.stderr
    (build / "pyproject.toml").write_text('[project]\nversion = "0.1.0"\n')
    first = _cairn(build, tmp_path, "--release")
    assert first.returncode == 0, first.stderr
    snapshot = build / "contracts" / "releases" / "0.1.0"
    assert _digest(snapshot / "schemas") == _digest(build / "contracts" / "schemas"), "what is committed"
    assert json.loads((snapshot / "manifest.json").read_text())["version"] == "0.1.0"
    assert _cairn(build, tmp_path, "--check").returncode == 0
