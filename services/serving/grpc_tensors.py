"""Open Inference Protocol tensors over gRPC <-> the JSON-shaped documents the HTTP v2 route reads
and writes, so that both protocols share one reading of a request (services.serving.logic.v2_rows)
and one answer (v2_outputs).

A tensor's values come either typed, in its `contents` field for its datatype, or as bytes in
`raw_input_contents` (what tritonclient.grpc sends), laid out as Triton's binary tensor data
(services.serving.binary_tensors decodes and encodes both). An answer comes back the way the
request came: raw for raw, `contents` for `contents`, as KServe's server does; Triton answers raw
always, and every client reads either.
"""

from __future__ import annotations

from typing import Any

import orjson

from services.serving import binary_tensors
from services.serving.grpc_v2 import predict_v2_pb2 as pb
from services.serving.logic import RequestProblem

# Which InferTensorContents field holds a datatype's values (the protocol's table).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def request_doc(request: pb.ModelInferRequest) -> dict[str, Any]:
    """The request as the HTTP route's JSON: {"id", "inputs": [{name, datatype, shape, data}],
    "outputs": [{"name"}]}. Framing problems (raw bytes that do not add up, text that is not UTF-8)
    raise binary_tensors.BinaryProblem or RequestProblem; the values are v2_rows's to check."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise RequestProblem(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs: one per input")
    inputs = []
    for i, tensor in enumerate(request.inputs):
        name, datatype, shape = tensor.name, tensor.datatype, list(tensor.shape)
        field = CONTENTS_FIELD.get(datatype)
        if field is None:
            raise RequestProblem(f"input {name!r}: datatype must be one of {sorted(CONTENTS_FIELD)}")
        if raw:
            if tensor.HasField("contents"):
                raise RequestProblem(f"input {name!r}: contents and raw_input_contents both given")
            data = binary_tensors.decode(name, datatype, shape, raw[i])
        else:
            data = list(getattr(tensor.contents, field))
            if datatype == "BYTES":
                data = [_text(name, v) for v in data]
        inputs.append({"name": name, "datatype": datatype, "shape": shape, "data": data})
    return {"id": request.id, "inputs": inputs, "outputs": [{"name": o.name} for o in request.outputs]}


def _text(name: str, value: bytes) -> str:
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise RequestProblem(f"input {name!r}: a BYTES element is not UTF-8 text") from None


def response(answer: dict[str, Any], raw: bool) -> pb.ModelInferResponse:
    """The HTTP route's JSON answer ({model_name, model_version, id, outputs, parameters}) as a
    ModelInferResponse, its outputs' values raw or typed."""
    out = pb.ModelInferResponse(
        model_name=answer["model_name"], model_version=answer["model_version"], id=answer["id"]
    )
    set_parameters(out.parameters, answer.get("parameters") or {})
    for o in answer["outputs"]:
        tensor = out.outputs.add(name=o["name"], datatype=o["datatype"], shape=o["shape"])
        set_parameters(tensor.parameters, o.get("parameters") or {})
        if raw:
            out.raw_output_contents.append(binary_tensors.encode(o["datatype"], o["data"]))
        elif o["datatype"] == "BYTES":
            tensor.contents.bytes_contents.extend(
                v if isinstance(v, bytes) else str(v).encode() for v in o["data"]
            )
        else:
            getattr(tensor.contents, CONTENTS_FIELD[o["datatype"]]).extend(o["data"])
    return out


def set_parameters(target: Any, params: dict[str, Any]) -> None:
    """A JSON `parameters` object into a map<string, InferParameter>; a list or an object (a
    classifier's `classes`) as its JSON text, the protocol having no list parameter."""
    for key, value in params.items():
        p = target[key]
        if isinstance(value, bool):
            p.bool_param = value
        elif isinstance(value, int):
            p.int64_param = value
        elif isinstance(value, float):
            p.double_param = value
        elif isinstance(value, str):
            p.string_param = value
        else:
            p.string_param = orjson.dumps(value).decode()
