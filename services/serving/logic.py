"""The endpoint's decisions, apart from HTTP and NATS: which rows a request may carry, and when a
deployment replaces what is served."""

from __future__ import annotations

import math
from typing import Any, Protocol

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

MAX_ROWS = 10_000
MAX_TEXT = 10_000


class Versioned(Protocol):
    version: int


def newer(current: Versioned | None, version: int) -> bool:
    """A deployment replaces what is served only with a higher version (redeliveries, out-of-order)."""
    return current is None or version > current.version


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(max_length=20_000)
    max_tokens: int = Field(64, ge=1, le=2048)
    temperature: float = Field(0.8, ge=0.0, le=5.0)
    top_k: int | None = Field(40, ge=1)
    seed: int = Field(0, ge=0, lt=2**32)


class RequestProblem(ValueError):
    pass


def parse_rows(body: Any, schema: dict[str, str]) -> pd.DataFrame:
    """Accept one object, a list of objects, or {"rows": [...]}; refuse unknown columns and bad types."""
    rows = body.get("rows") if isinstance(body, dict) and "rows" in body else body
    if isinstance(rows, dict):
        rows = [rows]
    if not isinstance(rows, list) or not rows:
        raise RequestProblem('send a JSON object, a non-empty list of objects, or {"rows": [...]}')
    if len(rows) > MAX_ROWS:
        raise RequestProblem(f"{len(rows)} rows; at most {MAX_ROWS} per request")
    problems = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            problems.append(f"row {i}: not an object")
            continue
        for key, value in row.items():
            kind = schema.get(key)
            if kind is None:
                problems.append(f"row {i}: unknown column {key!r}")
            elif (
                value is not None
                and kind != "categorical"
                and (isinstance(value, str) or not isinstance(value, int | float))
            ):
                problems.append(f"row {i}: column {key!r} must be a number or null")
            elif isinstance(value, list | dict):
                problems.append(f"row {i}: column {key!r} must be a scalar")
            elif isinstance(value, float) and not math.isfinite(value):
                # json.loads accepts NaN and Infinity; a prediction from them is not JSON either.
                problems.append(f"row {i}: column {key!r} must be a finite number")
            elif isinstance(value, str) and len(value) > MAX_TEXT:
                problems.append(f"row {i}: column {key!r} is longer than {MAX_TEXT} characters")
        if len(problems) > 20:
            break
    if problems:
        raise RequestProblem("; ".join(problems[:20]))
    return pd.DataFrame.from_records(rows, columns=list(schema))
