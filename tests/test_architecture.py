"""docs/ARCHITECTURE.md cannot drift: its layers and its table of imports are the import graph
(grimp, as import-linter reads it), both ways; its event arrows are the declared events and their
producers."""

from __future__ import annotations

import re
import tomllib
from collections import defaultdict
from pathlib import Path

import grimp
import pytest

from contracts.schemas import PRODUCERS

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
# Packages that only group units into a layer: each one's __init__ is a unit of its own, not a prefix
# that would swallow every module beneath it.
GROUPS = ("services", "services.platform", "services.tools")


def mermaid_blocks() -> list[str]:
    return re.findall(r"```mermaid\n(.*?)```", DOC, flags=re.S)


def section(title: str) -> str:
    return DOC.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def full(name: str) -> str:
    """The table names units below `services.` (`tools.cli`, `platform.bus`, `lineage`)."""
    return name if name in ("contracts", "services") else f"services.{name}"


def drawn_units() -> dict[str, set[str]]:
    """The table under "Imports, unit by unit": unit -> the units it imports ("-" for none)."""
    rows = re.findall(r"^\| `([\w.]+)` \| (.*?) \|", section("Imports, unit by unit"), flags=re.M)
    assert rows, "docs/ARCHITECTURE.md has a table of units and their imports"
    return {full(unit): {full(u) for u in re.findall(r"`([\w.]+)`", imports)} for unit, imports in rows}


def unit_of(module: str, units: set[str]) -> str | None:
    if module in GROUPS:
        return module if module in units else None
    owners = [u for u in units if u not in GROUPS and (module == u or module.startswith(u + "."))]
    return max(owners, key=len) if owners else None


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("services", "contracts")


def imports_between(graph: grimp.ImportGraph, units: set[str]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for module in graph.modules:
        source = unit_of(module, units)
        for imported in graph.find_modules_directly_imported_by(module):
            target = unit_of(imported, units)
            if source and target and source != target:
                edges[source].add(target)
    return edges


def test_every_module_belongs_to_a_drawn_unit(graph: grimp.ImportGraph) -> None:
    units = set(drawn_units())
    homeless = sorted(m for m in graph.modules if unit_of(m, units) is None)
    assert homeless == [], f"modules in no unit of docs/ARCHITECTURE.md: {homeless}"
    empty = sorted(u for u in units if not any(unit_of(m, units) == u for m in graph.modules))
    assert empty == [], f"units drawn that are no module: {empty}"


def test_each_drawn_import_exists_and_each_import_is_drawn(graph: grimp.ImportGraph) -> None:
    drawn = drawn_units()
    real = imports_between(graph, set(drawn))
    absent = sorted((a, b) for a, targets in drawn.items() for b in targets if b not in real.get(a, set()))
    undrawn = sorted((a, b) for a, targets in real.items() for b in targets if b not in drawn.get(a, set()))
    assert absent == [], f"arrows drawn in docs/ARCHITECTURE.md but not imported: {absent}"
    assert undrawn == [], f"imports not drawn in docs/ARCHITECTURE.md: {undrawn}"


def layer_of(unit: str) -> str:
    if unit == "contracts":
        return "contracts"
    if unit.startswith("services.tools"):
        return "tools"
    if unit.startswith("services.platform") or unit == "services":
        return "platform"
    return "services"


def test_the_layer_picture_is_the_import_graph(graph: grimp.ImportGraph) -> None:
    """The picture's arrows between layers are exactly the layers the units import across."""
    picture = mermaid_blocks()[0]
    drawn = {(a, b) for a, b in re.findall(r"^\s*(\w+) --> (\w+)\s*$", picture, flags=re.M)}
    real = {
        (layer_of(a), layer_of(b))
        for a, targets in imports_between(graph, set(drawn_units())).items()
        for b in targets
        if layer_of(a) != layer_of(b)
    }
    assert drawn == real, f"drawn only: {drawn - real}; imported only: {real - drawn}"
    for layer in ("tools", "services", "platform", "contracts"):
        assert re.search(rf"^\s*subgraph {layer}\b", picture, flags=re.M), f"no subgraph {layer}"


def test_every_layer_of_the_contracts_is_drawn() -> None:
    """The import-linter layers (`make lint`) name the same layers as the picture."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in config if c["type"] == "layers")["layers"]
    modules = [m.strip() for layer in layers for m in layer.split("|")]
    assert modules, "the layers contract lists modules"
    units = set(drawn_units())
    missing = [m for m in modules if m not in units and m not in GROUPS]
    assert missing == [], f"layers in pyproject.toml but no unit of docs/ARCHITECTURE.md: {missing}"


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
