"""requirements.lock against pyproject.toml and the environment the tests run in.

`make install` installs the lock with `--require-hashes`, then cairn without its dependencies: a
dependency added to pyproject.toml but not locked would be missing, a bound changed but not
re-locked would not hold. `make lock` brings the lock back in line (docs/DEPENDENCIES.md).
"""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


def locked() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) for every pin of the lock that applies to this machine."""
    pins: dict[str, tuple[str, list[str]]] = {}
    current: list[str] | None = None
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if match := PIN.match(line):
            name, pinned, marker = match.groups()
            current = []
            if marker is None or Marker(marker).evaluate():
                pins[canonicalize_name(name)] = (pinned, current)
        elif current is not None and (hash_ := re.search(r"--hash=(sha256:[0-9a-f]{64})", line)):
            current.append(hash_.group(1))
    return pins


def declared() -> list[tuple[Requirement, str]]:
    """pyproject's runtime and dev requirements that apply here, each with its extra ('' for runtime)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = [("", project["dependencies"]), ("dev", project["optional-dependencies"]["dev"])]
    out = []
    for extra, lines in groups:
        for line in lines:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                out.append((req, extra))
    return out


def test_the_lock_pins_every_declared_dependency_within_its_bounds() -> None:
    pins = locked()
    wrong = []
    for req, extra in declared():
        pin = pins.get(canonicalize_name(req.name))
        if pin is None:
            wrong.append(f"{req} ({extra or 'runtime'}) is not in the lock")
        elif not req.specifier.contains(pin[0], prereleases=True):
            wrong.append(f"{req} ({extra or 'runtime'}) but the lock pins {pin[0]}")
    assert not wrong, "requirements.lock is out of date, run `make lock`:\n" + "\n".join(wrong)


def test_every_pin_carries_its_hashes() -> None:
    bare = [name for name, (_, hashes) in locked().items() if not hashes]
    assert not bare, f"pins without --hash (pip --require-hashes refuses them): {bare}"


def test_the_environment_holds_the_locked_versions() -> None:
    """The tests run against what the lock pins (`make install` installs it), nothing newer or older."""
    differ = []
    for name, (pinned, _) in locked().items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = "nothing"
        if installed != pinned:
            differ.append(f"{name}: locked {pinned}, installed {installed}")
    assert not differ, "the environment is not the locked one, run `make install`:\n" + "\n".join(differ)
