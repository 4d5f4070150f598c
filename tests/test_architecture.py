"""docs/ARCHITECTURE.md cannot drift: its layers are the import-linter contracts, its arrows the
declared events and their producers."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from contracts.schemas import PRODUCERS

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "ARCHITECTURE.md").read_text()


def mermaid_blocks() -> list[str]:
    return re.findall(r"```mermaid\n(.*?)```", DOC, flags=re.S)


def test_every_layer_of_the_contracts_is_drawn() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in config if c["type"] == "layers")["layers"]
    drawn = mermaid_blocks()[0]
    modules = [m.strip() for layer in layers for m in layer.split("|")]
    assert modules, "the layers contract lists modules"
    missing = [m for m in modules if f'"{m}"' not in drawn and f'"{m} ' not in drawn]
    assert missing == [], f"layers in pyproject.toml but not in docs/ARCHITECTURE.md: {missing}"


def test_every_event_is_an_arrow_from_its_producer() -> None:
    flow = mermaid_blocks()[1]
    arrows = re.findall(r"^\s*(\w+)(?:\[[^\]]*\])? -- (cairn\.[\w.]+) -->", flow, flags=re.M)
    drawn = {event: producer for producer, event in arrows}
    assert set(drawn) == set(PRODUCERS), set(drawn) ^ set(PRODUCERS)
    for event, producer in PRODUCERS.items():
        expected = "anyservice" if producer == "any service" else producer
        assert drawn[event] == expected, f"{event} is drawn from {drawn[event]}, produced by {producer}"


def test_the_import_contracts_hold() -> None:
    """The same check as `make lint`, so `make test` (and CI) fails when a layer is crossed."""
    import subprocess
    import sys

    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-4000:]
