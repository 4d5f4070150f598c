"""Next builds of the contracts package, for the tests that run old and new code side by side.

A build is today's ``contracts/`` copied into a folder with one change applied to its text; a process
started with that folder first on PYTHONPATH imports it instead of the installed package, the way a
Deployment rolled to a new image would (services and everything else are today's).

- ``optional-field``: DatasetIngested gains an optional field with a value, so it is on the wire.
- ``required-field``: DatasetIngested gains a required field: a breaking change, for the check.
- ``v2-rename``: DatasetIngested becomes v2, its ``rows`` written as ``row_count`` (the Python name
  stays, so services need no change), with the v1 -> v2 upcaster that reads the old log.
"""

from __future__ import annotations

import shutil
from pathlib import Path

CONTRACTS = Path(__file__).resolve().parents[2] / "contracts"
NEW_FIELD = "profiled_by"
NEW_VALUE = "ingestion 2.0"

_ANCHOR = """    rows: int = Field(ge=1)
    columns: list[ColumnInfo]
"""
_CHANGES = {
    "optional-field": [
        (
            _ANCHOR,
            _ANCHOR + f'    {NEW_FIELD}: str | None = Field("{NEW_VALUE}", description="Profiler.")\n',
        )
    ],
    "required-field": [(_ANCHOR, _ANCHOR + "    profiler: str\n")],
    "v2-rename": [
        (
            """    EVENT_TYPE: ClassVar[str] = "cairn.dataset.ingested.v1"
    PRODUCER: ClassVar[str] = "ingestion"
""",
            """    EVENT_TYPE: ClassVar[str] = "cairn.dataset.ingested.v2"
    PRODUCER: ClassVar[str] = "ingestion"
    UPCASTERS: ClassVar[dict] = {1: lambda d: {**{k: v for k, v in d.items() if k != "rows"},
                                               "row_count": d.get("rows")}}
    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)
""",
        ),
        (_ANCHOR, _ANCHOR.replace("Field(ge=1)", 'Field(ge=1, alias="row_count")')),
    ],
}


def next_build(kind: str, into: Path) -> Path:
    """Write the build; returns the folder to put first on PYTHONPATH."""
    target = into / kind / "contracts"
    if target.exists():
        return target.parent
    shutil.copytree(CONTRACTS, target, ignore=shutil.ignore_patterns("__pycache__"))
    events = target / "events.py"
    text = events.read_text()
    for old, new in _CHANGES[kind]:
        assert text.count(old) == 1, f"the {kind} build no longer applies to contracts/events.py: update it"
        text = text.replace(old, new)
    events.write_text(text)
    return target.parent
