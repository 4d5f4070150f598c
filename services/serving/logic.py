"""The endpoint's decisions, apart from HTTP and NATS: which rows a request may carry, when a
deployment replaces what is served, which version a v2 path may be answered by, and the event
that says a champion was refused."""

from __future__ import annotations

import math
from itertools import repeat
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from contracts import ArtifactRef, Envelope, ModelRefused, derive_id, new_event
from services.platform.ml.transform import input_schema

MAX_ROWS = 10_000
NUMBER_TYPES = frozenset({float, int, bool})
SMALL = 16  # up to this many rows, a column's numbers are checked in Python: numpy's calls cost more
MAX_TEXT = 10_000


class Versioned(Protocol):
    version: int


def newer(current: Versioned | None, version: int) -> bool:
    """A deployment replaces what is served only with a higher version (redeliveries, out-of-order)."""
    return current is None or version > current.version


def version_problem(name: str, asked: str | None, served: int) -> str | None:
    """`/v2/models/NAME/versions/V/...` is answered by version V or not at all: a client that pins a
    version must never get another one's predictions. None when the path names no version."""
    if asked is None or asked == str(served):
        return None
    return f"model {name!r} version {asked!r} is not served (this endpoint serves version {served})"


def refusal(
    name: str,
    version: int,
    *,
    model: ArtifactRef | None,
    signature: ArtifactRef | None,
    reason: str,
    served_version: int | None,
    cause: Envelope[Any] | None,
    source: str,
) -> Envelope[ModelRefused]:
    """The event saying a champion was not served. Its id follows from the deployment refused (or,
    at start, from the model version and hash), so every worker and replica refusing the same
    deployment publishes one event: the stream's duplicate window drops the rest."""
    payload = ModelRefused(
        model_name=name,
        version=version,
        model=model,
        signature=signature,
        reason=reason[:2000],
        served_version=served_version,
        deployed_event_id=cause.id if cause else None,
    )
    if cause is not None:
        return new_event(payload, source=source, cause=cause, subject=name)
    key = f"{name}@{version}:{model.sha256 if model else ''}"
    event_id = derive_id(key, ModelRefused.EVENT_TYPE, "start")
    return new_event(payload, source=source, event_id=event_id, subject=name)


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(max_length=20_000)
    max_tokens: int = Field(64, ge=1, le=2048)
    temperature: float = Field(0.8, ge=0.0, le=5.0)
    top_k: int | None = Field(40, ge=1)
    seed: int = Field(0, ge=0, lt=2**32)
    stream: bool = Field(False, description="Answer with server-sent events, one per token.")


class RequestProblem(ValueError):
    pass


def checked_rows(body: Any, schema: dict[str, str]) -> list[dict[str, Any]]:
    """The rows of a request body, validated against the input schema (no pandas: the hot path).

    Accepts one object, a list of objects, or {"rows": [...]}; refuses unknown columns and bad types."""
    rows = body.get("rows") if isinstance(body, dict) and "rows" in body else body
    if isinstance(rows, dict):
        rows = [rows]
    if not isinstance(rows, list) or not rows:
        raise RequestProblem('send a JSON object, a non-empty list of objects, or {"rows": [...]}')
    if len(rows) > MAX_ROWS:
        raise RequestProblem(f"{len(rows)} rows; at most {MAX_ROWS} per request")
    if _plainly_valid(rows, schema):
        return rows
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
    return rows


def _plainly_valid(rows: list[Any], schema: dict[str, str]) -> bool:
    """The common case in one tight pass: known columns, finite numbers, short strings where the
    column is categorical. Anything else takes the detailed pass, which says what is wrong."""
    numeric = {k for k, kind in schema.items() if kind != "categorical"}
    for row in rows:
        if type(row) is not dict:
            return False
        for key, value in row.items():
            t = type(value)
            if t is float:
                if value - value != 0.0 or key not in schema:  # NaN and infinities fail the first test
                    return False
            elif t is int or t is bool or value is None:
                if key not in schema:
                    return False
            elif t is str:
                if key in numeric or key not in schema or len(value) > MAX_TEXT:
                    return False
            else:
                return False
    return True


def features(spec: dict[str, Any], rows: list[dict[str, Any]]) -> np.ndarray:
    """Checked rows -> the float32 feature matrix, as services.platform.ml.transform.apply builds it from a
    DataFrame (missing numerics: the training mean; unknown or missing categories: -1), without one.
    The endpoint calls its loaded model's TableReader.from_rows, which keeps the category codes."""
    return TableReader(spec).from_rows(rows)


TOO_LARGE = "a number is too large for a 64-bit float"


def _floats(values: list[Any]) -> np.ndarray:
    try:
        return np.array(values, dtype=np.float64)
    except OverflowError:
        raise RequestProblem(TOO_LARGE) from None


V2_DATATYPES = {"FP32", "FP64", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64",
                "BOOL", "BYTES"}


def v2_rows(body: Any, schema: dict[str, str]) -> list[dict[str, Any]]:
    """An Open Inference Protocol (v2) request's tensors as checked rows.

    Either one tensor per column (its name is the column, shape [n] or [n, 1]), or one 2-D tensor
    of shape [n, len(columns)] whose columns are in the order the model's metadata lists them.
    """
    inputs = body.get("inputs") if isinstance(body, dict) else None
    if not isinstance(inputs, list) or not inputs:
        raise RequestProblem('a v2 request is {"inputs": [{"name", "shape", "datatype", "data"}, ...]}')
    tensors = []
    for t in inputs:
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not isinstance(t.get("shape"), list):  # noqa: E501
            raise RequestProblem("each input needs a name, a shape and data")
        if t.get("datatype") not in V2_DATATYPES:
            raise RequestProblem(f"input {t.get('name')!r}: datatype must be one of {sorted(V2_DATATYPES)}")
        shape = t["shape"]
        if not shape or len(shape) > 2 or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise RequestProblem(f"input {t['name']!r}: shape must be [n] or [n, k]")
        data = _flat(t.get("data"))
        if math.prod(shape) != len(data):
            raise RequestProblem(f"input {t['name']!r}: {len(data)} values for shape {shape}")
        tensors.append((t["name"], shape, data))
    columns = list(schema)
    if len(tensors) == 1 and len(tensors[0][1]) == 2 and tensors[0][0] not in schema:
        name, (n, k), data = tensors[0]
        if k != len(columns):
            raise RequestProblem(f"input {name!r}: {k} columns; the model takes {len(columns)}: {columns}")
        rows = [dict(zip(columns, data[i * k : (i + 1) * k], strict=True)) for i in range(n)]
    else:
        lengths = {shape[0] for _, shape, _ in tensors}
        if len(lengths) != 1:
            raise RequestProblem("every input tensor must have the same number of rows")
        unknown = [name for name, _, _ in tensors if name not in schema]
        if unknown:
            raise RequestProblem(f"unknown inputs {unknown}; the model takes {columns}")
        if any(len(shape) == 2 and shape[1] != 1 for _, shape, _ in tensors):
            raise RequestProblem("a per-column input has shape [n] or [n, 1]")
        n = lengths.pop()
        rows = [{name: data[i] for name, _, data in tensors} for i in range(n)]
    return checked_rows(rows, schema) if rows else rows


class TableReader:
    """A table model's requests (v1 rows, v2 tensors) read into its feature matrix, with what that
    needs of the spec (the schema, each category's code) computed once per loaded model."""

    def __init__(self, spec: dict[str, Any]):
        self.columns = spec["columns"]
        self.schema = input_schema(spec)
        self.lookups = {c["name"]: {v: i for i, v in enumerate(c["categories"])}
                        for c in self.columns if c["kind"] == "categorical"}
        # A value found among these categories is plainly valid text, so only the values not found
        # need their type and length checked (the fast path); true when every category is such text.
        self.plain_categories = {name: all(type(c) is str and len(c) <= MAX_TEXT for c in lookup)
                                 for name, lookup in self.lookups.items()}

    def from_rows(self, rows: list[dict[str, Any]]) -> np.ndarray:
        """Checked rows (v1, or a v2 request the column path left) -> the feature matrix.

        A DataFrame costs ~1 ms per request before any model runs; a column at a time in numpy does not.
        """
        out = np.empty((len(rows), len(self.columns)), dtype=np.float32)
        for j, col in enumerate(self.columns):
            name = col["name"]
            values = [row.get(name) for row in rows]
            if col["kind"] == "categorical":
                lookup = self.lookups[name]
                out[:, j] = [-1 if v is None else lookup.get(str(v), -1) for v in values]
            else:
                numeric = _floats(values)  # None -> NaN
                out[:, j] = np.where(np.isnan(numeric), col["fill"], numeric)
        return out

    def v2(self, body: Any) -> tuple[np.ndarray, int]:
        """The feature matrix and row count. Read column by column when every value is plainly
        valid, the common case (no row objects built: a 1,000-row request's reading goes from about
        2 ms to 0.3); anything else goes through v2_rows, which says what is wrong. Both give the
        same matrix (tests/test_serving.py)."""
        shaped = _shaped_columns(body, self.schema)
        if shaped is not None and (x := self.matrix(*shaped)) is not None:
            return x, shaped[0]
        rows = v2_rows(body, self.schema)
        if not rows:
            return np.empty((0, len(self.columns)), np.float32), 0
        return self.from_rows(rows), len(rows)

    def matrix(self, n: int, columns: dict[str, Any]) -> np.ndarray | None:
        """The feature matrix of `n` rows given as {column: values}, or None when a value is not
        plainly valid (the caller then takes the row path, which says what is wrong)."""
        try:
            return self._few(n, columns) if n <= SMALL else self._many(n, columns)
        except OverflowError:  # an integer beyond any float (JSON allows it)
            raise RequestProblem(TOO_LARGE) from None

    def _few(self, n: int, columns: dict[str, list[Any]]) -> np.ndarray | None:
        """A few rows: values checked in Python, the matrix made in one conversion (numpy's calls per
        column cost more here). None when a value is not plainly valid."""
        values = []
        for col in self.columns:
            given = columns.get(col["name"])
            if col["kind"] == "categorical":
                if given is None:
                    values.append([-1] * n)
                    continue
                if not all(type(v) is str and len(v) <= MAX_TEXT for v in given):
                    return None
                lookup = self.lookups[col["name"]]
                values.append([lookup.get(v, -1) for v in given])
            elif given is None:
                values.append([col["fill"]] * n)
            elif all(type(v) in NUMBER_TYPES and v - v == 0 for v in given):  # NaN, infinities fail v-v == 0
                values.append(given)
            else:
                return None
        return np.array(list(zip(*values, strict=True)), dtype=np.float32)

    def _many(self, n: int, columns: dict[str, list[Any]]) -> np.ndarray | None:
        """Many rows: each column converted by numpy and checked on the array. None when a value is
        not plainly valid."""
        out = np.empty((n, len(self.columns)), dtype=np.float32)
        for j, col in enumerate(self.columns):
            name, given = col["name"], columns.get(col["name"])
            if given is None:
                out[:, j] = -1 if col["kind"] == "categorical" else col["fill"]
            elif col["kind"] == "categorical":
                if not self.plain_categories[name]:
                    return None
                try:
                    codes = np.fromiter(map(self.lookups[name].get, given, repeat(-1, n)), np.float32, n)
                except TypeError:  # a list or an object is no dict key, and no category
                    return None
                unknown = [given[i] for i in np.flatnonzero(codes < 0).tolist()]  # no category: check these
                if not all(type(v) is str and len(v) <= MAX_TEXT for v in unknown):
                    return None
                out[:, j] = codes
            else:
                try:
                    numbers = np.asarray(given)  # its dtype says what the values were (an array: as it is)
                except (ValueError, TypeError):
                    return None
                kind = numbers.dtype.kind
                if numbers.ndim != 1 or kind not in "fib" or (kind == "f" and not np.isfinite(numbers).all()):
                    return None  # text, None, nested lists, NaN or infinities: the detailed path says which
                out[:, j] = numbers
        return out


def _shaped_columns(body: Any, schema: dict[str, str]) -> tuple[int, dict[str, list[Any]]] | None:
    """(rows, {column: values}) when the request's tensors are well formed (per column, or one 2-D
    tensor); None to take the detailed path. The values are not checked here."""
    inputs = body.get("inputs") if type(body) is dict else None
    if type(inputs) is not list or not inputs:
        return None
    columns: dict[str, Any] = {}
    n = None
    names = list(schema)
    for t in inputs:
        if type(t) is not dict or t.get("datatype") not in V2_DATATYPES:
            return None
        name, shape, data = t.get("name"), t.get("shape"), t.get("data")
        if type(shape) is not list or type(data) is not list or (data and type(data[0]) is list):
            return None
        if (matrix := matrix_shape(len(inputs), name, shape, schema)) is not None:
            n, k = matrix
            if n * k != len(data):
                return None
            columns = {c: data[j::k] for j, c in enumerate(names)}
            break
        if (n := column_rows(name, shape, len(data), schema, n)) is None:
            return None
        columns[name] = data
    if not n or n > MAX_ROWS:
        return None
    return n, columns


def matrix_shape(count: int, name: Any, shape: list[Any], schema: dict[str, str]) -> tuple[int, int] | None:
    """(rows, columns) when the request's one tensor is 2-D and holds every column, in the order the
    model's metadata lists them; None otherwise."""
    if count != 1 or name in schema or len(shape) != 2 or shape[1] != len(schema):
        return None
    return (shape[0], shape[1]) if type(shape[0]) is int else None


def column_rows(name: Any, shape: list[Any], length: int, schema: dict[str, str], n: int | None
                ) -> int | None:
    """The rows a per-column tensor of `length` values gives: its name a column, its shape [n] or
    [n, 1], and as many rows as the tensors before it (`n`, None for the first); else None."""
    if name not in schema or not (shape == [length] or shape == [length, 1]):
        return None
    return length if n is None or n == length else None


def _flat(data: Any) -> list[Any]:
    """v2 data may be flat or nested row-major lists."""
    if not isinstance(data, list):
        raise RequestProblem("input data must be a list")
    if data and isinstance(data[0], list):
        return [v for part in data for v in _flat(part)]
    return data


def v2_outputs(task: str, classes: list[Any], out: np.ndarray) -> list[dict[str, Any]]:
    """Named output tensors: `predict` (values, or class labels) and, for classifiers, `probabilities`."""
    n = len(out)
    if task == "regression":
        return [{"name": "predict", "shape": [n], "datatype": "FP64", "data": out.astype(float).tolist()}]
    labels = [classes[i] for i in out.argmax(axis=1).tolist()]
    kind = "BYTES" if any(isinstance(c, str) for c in classes) else "FP64"
    return [
        {"name": "predict", "shape": [n], "datatype": kind, "data": labels},
        {"name": "probabilities", "shape": [n, len(classes)], "datatype": "FP64",
         "data": out.astype(float).ravel().tolist(), "parameters": {"classes": classes}},
    ]


def present(task: str, classes: list[Any], out: np.ndarray) -> list[Any]:
    """Predictions as the v1 routes return them: numbers, or {label, probabilities}."""
    if task == "regression":
        return out.astype(float).tolist()
    return [
        {"label": classes[int(max(range(len(row)), key=row.__getitem__))],
         "probabilities": dict(zip(classes, row, strict=True))}
        for row in out.astype(float).tolist()
    ]


TENSOR_TYPES = {"numeric": "FP64", "boolean": "BOOL", "categorical": "BYTES"}  # a column kind's v2 datatype


def model_tensors(task: str, schema: dict[str, str], classes: list[Any]) -> tuple[list[dict], list[dict]]:
    """A model's v2 metadata tensors (inputs, outputs): one input per column, in the order a 2-D
    tensor uses; `predict`, and `probabilities` for classifiers (as v2_outputs answers)."""
    if task == "text_generation":
        return ([{"name": "prompt", "datatype": "BYTES", "shape": [1]}],
                [{"name": "text", "datatype": "BYTES", "shape": [1]}])
    inputs = [{"name": c, "datatype": TENSOR_TYPES.get(k, "FP64"), "shape": [-1]} for c, k in schema.items()]
    if task != "classification":
        return inputs, [{"name": "predict", "datatype": "FP64", "shape": [-1]}]
    kind = "BYTES" if any(isinstance(c, str) for c in classes) else "FP64"
    return inputs, [{"name": "predict", "datatype": kind, "shape": [-1]},
                    {"name": "probabilities", "datatype": "FP64", "shape": [-1, len(classes)]}]
