"""Longest modules first: `make test` hands whole modules to two workers (`--dist loadfile`), and a
long module dealt last keeps one worker busy while the other has nothing left to do.

The order comes from `tests/module_seconds.json`, each module's wall seconds (setup, call and
teardown of its tests) as a full run measured them; a module it does not name goes first, as if it
were the longest. Refresh it with `make test-durations`, which runs the suite with
CAIRN_TEST_DURATIONS set to a folder where each worker writes what it measured.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import pytest

TABLE = Path(__file__).with_name("module_seconds.json")


def module_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    seconds: dict[str, float] = json.loads(TABLE.read_text()) if TABLE.exists() else {}
    unknown = max(seconds.values(), default=0.0) + 1.0
    position = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (-seconds.get(module_of(item.nodeid), unknown), position[id(item)]))


class Durations:
    """Each module's wall seconds on this worker, written at the end of the session."""

    def __init__(self, folder: Path, worker: str):
        self.folder = folder
        self.worker = worker
        self.seconds: dict[str, float] = defaultdict(float)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.seconds[module_of(report.nodeid)] += report.duration

    def pytest_sessionfinish(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        rounded = {module: round(s, 1) for module, s in sorted(self.seconds.items())}
        (self.folder / f"{self.worker}.json").write_text(json.dumps(rounded, indent=1) + "\n")


def pytest_configure(config: pytest.Config) -> None:
    if folder := os.environ.get("CAIRN_TEST_DURATIONS"):
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        config.pluginmanager.register(Durations(Path(folder), worker), "cairn-durations")
