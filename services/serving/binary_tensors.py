"""Triton's binary tensor data extension to the Open Inference Protocol over HTTP, which
tritonclient.http speaks by default: a JSON header of `Inference-Header-Content-Length` bytes, then
the raw bytes of each tensor whose `parameters.binary_data_size` says so, in the header's order
(little-endian, row-major, no padding; BOOL one byte; BYTES each element a 4-byte little-endian
length, then its bytes). Answers go back the same way for the outputs a client asks to have so.

Pure (bytes and dicts in and out) so every malformed body is tested without a server: a body whose
parts do not add up is a BinaryProblem, answered 400 with what is wrong.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np
import orjson

HEADER = "Inference-Header-Content-Length"
MEDIA_TYPE = "application/octet-stream"

# The fixed-size datatypes services.serving.logic.V2_DATATYPES takes, as little-endian numpy dtypes.
DTYPES = {
    "BOOL": "u1",
    "INT8": "i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "UINT8": "u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "FP32": "<f4",
    "FP64": "<f8",
}
LENGTH = struct.Struct("<I")  # a BYTES element's length prefix


class BinaryProblem(ValueError):
    """A binary body that does not add up: the client's framing is wrong, not a value (400)."""


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON header, the tensor bytes after it); a body without the header is all JSON."""
    if header_length is None:
        return body, b""
    if not (header_length.isascii() and header_length.isdigit()):
        raise BinaryProblem(f"{HEADER} must be a byte count, not {header_length[:40]!r}")
    n = int(header_length)
    if n > len(body):
        raise BinaryProblem(f"{HEADER} is {n}, beyond the {len(body)}-byte body")
    return body[:n], body[n:]


def with_binary_inputs(doc: Any, binary: bytes) -> Any:
    """The request with each binary input's `data` read from `binary`, as if it had come as JSON.

    The sizes must account for every byte after the header; anything else about the request (a
    missing name, an unknown column) is left for services.serving.logic.v2_rows to refuse."""
    inputs = doc.get("inputs") if isinstance(doc, dict) else None
    at, out, binary_inputs = 0, [], 0
    for tensor in inputs if isinstance(inputs, list) else []:
        size = _binary_size(tensor)
        if size is None:
            out.append(tensor)
            continue
        binary_inputs += 1
        name = tensor.get("name")
        if "data" in tensor:
            raise BinaryProblem(f"input {name!r} has both data and parameters.binary_data_size")
        left = len(binary) - at
        if size > left:
            raise BinaryProblem(
                f"input {name!r}: binary_data_size {size}, but {left} bytes are left after the JSON"
                f" header and the inputs before it (is {HEADER} sent?)"
            )
        data = decode(name, tensor.get("datatype"), tensor.get("shape"), binary[at : at + size])
        out.append({**tensor, "data": data})
        at += size
    if at != len(binary):
        raise BinaryProblem(
            f"{len(binary)} bytes follow the JSON header, but the inputs' binary_data_size add up to {at}"
        )
    return {**doc, "inputs": out} if binary_inputs else doc


def _binary_size(tensor: Any) -> int | None:
    params = tensor.get("parameters") if isinstance(tensor, dict) else None
    if not isinstance(params, dict) or "binary_data_size" not in params:
        return None
    size = params["binary_data_size"]
    if type(size) is not int or size < 0:
        raise BinaryProblem(
            f"input {tensor.get('name')!r}: binary_data_size must be a byte count, not {size!r}"
        )
    return size


def decode(name: Any, datatype: Any, shape: Any, raw: bytes) -> list[Any]:
    """One tensor's bytes as the flat list its JSON `data` would be (BYTES as UTF-8 text)."""
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise BinaryProblem(f"input {name!r}: shape must be a list of non-negative integers, not {shape!r}")
    count = math.prod(shape)
    if datatype == "BYTES":
        return _strings(name, raw, count)
    dtype = DTYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        known = sorted([*DTYPES, "BYTES"])
        raise BinaryProblem(f"input {name!r}: datatype {datatype!r} has no binary form here; one of {known}")
    need = count * np.dtype(dtype).itemsize
    if len(raw) != need:
        raise BinaryProblem(
            f"input {name!r}: {len(raw)} bytes for {datatype} of shape {shape}, which takes {need}"
        )
    values = np.frombuffer(raw, dtype=dtype)
    if datatype == "BOOL":
        if count and values.max() > 1:
            raise BinaryProblem(f"input {name!r}: a BOOL byte is 0 or 1")
        return values.astype(bool).tolist()
    return values.tolist()


def _strings(name: Any, raw: bytes, count: int) -> list[str]:
    out: list[str] = []
    at = 0
    while at < len(raw):
        if len(out) == count:
            raise BinaryProblem(f"input {name!r}: {len(raw) - at} bytes after its {count} BYTES elements")
        if at + LENGTH.size > len(raw):
            raise BinaryProblem(f"input {name!r}: BYTES element {len(out)} has a cut 4-byte length")
        (n,) = LENGTH.unpack_from(raw, at)
        at += LENGTH.size
        if at + n > len(raw):
            raise BinaryProblem(
                f"input {name!r}: BYTES element {len(out)} is {n} bytes; {len(raw) - at} are left"
            )
        try:
            out.append(raw[at : at + n].decode())
        except UnicodeDecodeError:
            raise BinaryProblem(f"input {name!r}: BYTES element {len(out)} is not UTF-8 text") from None
        at += n
    if len(out) != count:
        raise BinaryProblem(f"input {name!r}: {len(out)} BYTES elements for {count} values in its shape")
    return out


def requested_outputs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's `outputs` (the ones it names, each a dict); [] for all."""
    outputs = doc.get("outputs")
    return [o for o in outputs if isinstance(o, dict)] if isinstance(outputs, list) else []


def binary_outputs(doc: dict[str, Any], names: list[str]) -> set[str]:
    """Which of `names` to answer in binary: an output requested with `parameters.binary_data`
    says so itself; the others follow the request's `parameters.binary_data_output` (what
    tritonclient sends when it names no outputs), JSON when neither is given."""
    params = doc.get("parameters")
    default = isinstance(params, dict) and params.get("binary_data_output") is True
    asked = {}
    for o in requested_outputs(doc):
        p = o.get("parameters")
        if isinstance(p, dict) and "binary_data" in p:
            asked[o.get("name")] = p["binary_data"] is True
    return {n for n in names if asked.get(n, default)}


def encode(datatype: str, data: list[Any]) -> bytes:
    """A flat JSON `data` list as the extension's bytes."""
    if datatype == "BYTES":
        parts = [v if isinstance(v, bytes) else str(v).encode() for v in data]
        return b"".join(LENGTH.pack(len(p)) + p for p in parts)
    return np.asarray(data, dtype=bool if datatype == "BOOL" else None).astype(DTYPES[datatype]).tobytes()


def response_body(doc: dict[str, Any], binary: set[str]) -> tuple[bytes, int | None]:
    """The answer: plain JSON when no output is binary; else the JSON header (binary outputs
    carry `binary_data_size` instead of `data`) then their bytes, and the header's length."""
    if not binary:
        return orjson.dumps(doc), None
    outputs, blobs = [], []
    for output in doc["outputs"]:
        if output["name"] in binary:
            raw = encode(output["datatype"], output["data"])
            params = {**(output.get("parameters") or {}), "binary_data_size": len(raw)}
            output = {**{k: v for k, v in output.items() if k != "data"}, "parameters": params}
            blobs.append(raw)
        outputs.append(output)
    head = orjson.dumps({**doc, "outputs": outputs})
    return b"".join([head, *blobs]), len(head)
