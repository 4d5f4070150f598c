"""Large v2 JSON bodies read without a Python object per value.

orjson makes a Python float or str of every value, and the feature matrix is then made from those:
for 1,000 rows of 9 columns, about 0.85 ms of a request's 3 (docs/SERVING.md, "Where the time
goes"). Here simdjson parses the body and each numeric tensor's values come out as one float64
array (`as_buffer`); only text columns become Python lists. This is a shortcut, not a second
reading of the protocol: it takes only bodies whose shape is plain (one flat tensor per column, or
one 2-D tensor; no key twice; no array where none belongs) and returns None for anything else,
which then takes the orjson path, the reference. tests/test_serving.py gives both paths the same
bodies and compares the matrices and the refusals.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import simdjson

from services.serving.logic import MAX_ROWS, V2_DATATYPES, column_rows, matrix_shape

FAST_BYTES = 4096  # below this, orjson's parse costs less than simdjson's per-field crossings
TENSOR_KEYS = frozenset({"name", "datatype", "shape", "data"})
Columns = tuple[dict[str, Any], int, dict[str, Any]]  # (other top-level fields, rows, {column: values})


def read_columns(body: bytes, schema: dict[str, str]) -> Columns | None:
    """(the request's other top-level fields as Python values, its row count, {column: values}),
    numeric columns as float64 arrays; None when the body is not plainly shaped."""
    try:
        doc = simdjson.Parser().parse(body)  # a parser per body: one may not be reused while its objects live
        return _columns(body, doc, schema)
    except Exception:  # noqa: BLE001 - invalid JSON, NaN, big integers, types: the reference path says which
        return None


def _columns(body: bytes, doc: Any, schema: dict[str, str]) -> Columns | None:
    if not isinstance(doc, simdjson.Object) or not _distinct(keys := list(doc.keys())):
        return None
    inputs = doc.get("inputs")
    if not isinstance(inputs, simdjson.Array) or not len(inputs):
        return None
    meta = {k: _python(doc[k]) for k in keys if k != "inputs"}  # id, outputs, parameters: small
    arrays = 1 + sum(_arrays(v) for v in meta.values())  # every '[' the body may hold, inputs' included
    names = list(schema)
    columns: dict[str, Any] = {}
    n = None
    for tensor in inputs:
        if not isinstance(tensor, simdjson.Object):
            return None
        tensor_keys = list(tensor.keys())
        if not _distinct(tensor_keys) or not TENSOR_KEYS.issuperset(tensor_keys):
            return None  # parameters (binary_data_size...) and the like: the reference path
        name, datatype, shape, data = (tensor.get(k) for k in ("name", "datatype", "shape", "data"))
        if type(name) is not str or datatype not in V2_DATATYPES:
            return None
        if not isinstance(shape, simdjson.Array) or not isinstance(data, simdjson.Array):
            return None
        shape = shape.as_list()
        if not all(type(d) is int for d in shape):
            return None
        arrays += 2
        if (matrix := matrix_shape(len(inputs), name, shape, schema)) is not None:
            n, k = matrix
            if n * k != len(data):
                return None
            if all(schema[c] != "categorical" for c in names):
                matrix = _numbers(data).reshape(n, k)
                columns = {c: matrix[:, j] for j, c in enumerate(names)}
            else:
                values = data.as_list()
                columns = {c: values[j::k] for j, c in enumerate(names)}
            break
        if (n := column_rows(name, shape, len(data), schema, n)) is None:
            return None
        columns[name] = data.as_list() if schema[name] == "categorical" else _numbers(data)
    # An array nested in the data (as_buffer flattens them) shows as a '[' more than the shape has.
    if not n or n > MAX_ROWS or body.count(b"[") != arrays:
        return None
    return meta, n, columns


def _numbers(data: Any) -> np.ndarray:
    """Every value a JSON number, as float64 (TypeError for null, true, text: the reference path)."""
    return np.frombuffer(data.as_buffer(of_type="d"), dtype=np.float64)


def _distinct(keys: list[str]) -> bool:
    return len(set(keys)) == len(keys)  # a key twice: orjson keeps the last, simdjson finds the first


def _python(value: Any) -> Any:
    if isinstance(value, simdjson.Object):
        return value.as_dict()
    if isinstance(value, simdjson.Array):
        return value.as_list()
    return value


def _arrays(value: Any) -> int:
    """How many JSON arrays a Python value holds."""
    if isinstance(value, list):
        return 1 + sum(_arrays(v) for v in value)
    if isinstance(value, dict):
        return sum(_arrays(v) for v in value.values())
    return 0
