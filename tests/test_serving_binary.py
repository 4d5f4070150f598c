"""Triton's binary tensor data extension on the v2 endpoint, as tritonclient.http speaks it by default.

- services.serving.binary_tensors reads what tritonclient's own encoder writes, and tritonclient's
  own decoder reads what it writes; every malformed body is a BinaryProblem that names the fault.
- One real endpoint (the endpoint's own HTTP server, a real socket, two hand-built linear champions): the
  client in its default binary mode gets the predictions JSON mode gets, for a regression with
  numeric, categorical (BYTES) and boolean columns and for a classifier with probabilities;
  malformed binary bodies get a 400 naming the problem, never a 500.
"""

from __future__ import annotations

import asyncio
import json
import struct

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as httpclient

from contracts import ArtifactRef, Task
from services.platform.ml.bundle import LoadedModel
from services.platform.ml.families import LinearPredictor
from services.serving.binary_tensors import (
    DTYPES,
    HEADER,
    BinaryProblem,
    binary_outputs,
    response_body,
    split_body,
    with_binary_inputs,
)
from services.serving.logic import V2_DATATYPES
from tests.conftest import make_settings

Client = httpclient.InferenceServerClient


def _input(name: str, values: np.ndarray, datatype: str, binary: bool) -> httpclient.InferInput:
    tensor = httpclient.InferInput(name, list(values.shape), datatype)
    tensor.set_data_from_numpy(values, binary_data=binary)
    return tensor


def _read(body: bytes, json_size: int | None) -> dict:
    """What the endpoint's intake makes of a request body: JSON tensors, binary ones read in."""
    head, tensors = split_body(body, None if json_size is None else str(json_size))
    return with_binary_inputs(orjson.loads(head), tensors)


TENSORS = [
    ("x64", np.array([0.25, -1e300, 3.5], dtype=np.float64), "FP64"),
    ("x32", np.array([[0.5], [-2.25]], dtype=np.float32), "FP32"),
    ("i64", np.array([2**40, -7], dtype=np.int64), "INT64"),
    ("i32", np.array([-(2**31), 5], dtype=np.int32), "INT32"),
    ("flag", np.array([True, False, True]), "BOOL"),
    ("cut", np.array(["Ideal", "", "café ☕"], dtype=object), "BYTES"),
]


@pytest.mark.parametrize(("name", "values", "datatype"), TENSORS, ids=[t[0] for t in TENSORS])
def test_tritonclient_binary_request_reads_as_its_json_request(name, values, datatype):
    """Each datatype cairn's models take, encoded by tritonclient in binary, reads back as the very
    `data` tritonclient writes in JSON mode for the same values."""
    outputs = [httpclient.InferRequestedOutput("predict")]
    binary, size = Client.generate_request_body([_input(name, values, datatype, True)], outputs)
    plain, no_size = Client.generate_request_body([_input(name, values, datatype, False)], outputs)
    assert size is not None and no_size is None  # the first really is a binary body
    got, expected = _read(binary, size)["inputs"][0], _read(plain, None)["inputs"][0]
    assert got["data"] == expected["data"] and got["shape"] == expected["shape"] == list(values.shape)


def test_mixed_request_keeps_json_inputs_and_reads_binary_ones_in_order():
    a = _input("a", np.array([1.0, 2.0]), "FP64", True)
    c = _input("c", np.array(["red", "blue"], dtype=object), "BYTES", False)
    f = _input("f", np.array([False, True]), "BOOL", True)
    body, size = Client.generate_request_body([a, c, f])
    doc = _read(body, size)
    assert [t["data"] for t in doc["inputs"]] == [[1.0, 2.0], ["red", "blue"], [False, True]]
    assert doc["parameters"] == {"binary_data_output": True}  # tritonclient's default: no outputs named


def test_binary_answer_reads_back_in_tritonclient():
    """response_body's bytes, parsed by tritonclient's own decoder, give the data and parameters."""
    answer = {
        "model_name": "m",
        "id": "q",
        "outputs": [
            {"name": "predict", "shape": [2], "datatype": "BYTES", "data": ["cat", "ünï"]},
            {
                "name": "probabilities",
                "shape": [2, 2],
                "datatype": "FP64",
                "data": [0.25, 0.75, 1.0, 0.0],
                "parameters": {"classes": ["cat", "ünï"]},
            },
            {"name": "flags", "shape": [2], "datatype": "BOOL", "data": [True, False]},
        ],
    }
    body, header_length = response_body(answer, {"predict", "probabilities"})
    result = Client.parse_response_body(body, header_length=header_length)
    assert result.as_numpy("predict").tolist() == [b"cat", "ünï".encode()]
    np.testing.assert_array_equal(result.as_numpy("probabilities"), [[0.25, 0.75], [1.0, 0.0]])
    assert result.get_output("probabilities")["parameters"]["classes"] == ["cat", "ünï"]
    assert result.get_output("probabilities")["parameters"]["binary_data_size"] == 32
    assert result.get_output("flags")["data"] == [True, False]  # not asked for in binary: JSON
    assert response_body(answer, set()) == (orjson.dumps(answer), None)


@pytest.mark.parametrize(
    ("request_doc", "binary"),
    [
        ({}, set()),
        ({"parameters": {"binary_data_output": True}}, {"predict", "probabilities"}),
        ({"outputs": [{"name": "predict", "parameters": {"binary_data": True}}]}, {"predict"}),
        (
            {
                "outputs": [{"name": "predict", "parameters": {"binary_data": False}}],
                "parameters": {"binary_data_output": True},
            },
            {"probabilities"},
        ),
        ({"outputs": "not a list", "parameters": {"binary_data_output": "yes"}}, set()),
    ],
)
def test_which_outputs_are_binary(request_doc, binary):
    assert binary_outputs(request_doc, ["predict", "probabilities"]) == binary


def _tensor(name: str, n: int, size: int | None = None, datatype: str = "FP64", shape=None) -> dict:
    return {
        "name": name,
        "shape": shape if shape is not None else [n],
        "datatype": datatype,
        "parameters": {"binary_data_size": 8 * n if size is None else size},
    }


def _framed(inputs: list[dict], tensors: bytes) -> tuple[bytes, str]:
    head = orjson.dumps({"inputs": inputs})
    return head + tensors, str(len(head))


def _strings(*parts: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(p)) + p for p in parts)


TWO = struct.pack("<2d", 1.0, 2.0)
MALFORMED = {
    "header beyond the body": (b'{"inputs": []}', "9999", "beyond the 14-byte body"),
    "header not a count": (b'{"inputs": []}', "12abc", "must be a byte count"),
    "header not JSON": (b"\x00\x01garbage", "2", "is not JSON"),
    "sizes short of the body": (*_framed([_tensor("a", 2)], TWO + b"\x00" * 8), "add up to 16"),
    "size beyond the body": (*_framed([_tensor("a", 2, size=24)], TWO), "binary_data_size 24, but 16"),
    "binary inputs but no header": (orjson.dumps({"inputs": [_tensor("a", 2)]}), None, "0 bytes are left"),
    "size not the shape's": (*_framed([_tensor("a", 3, size=16)], TWO), "which takes 24"),
    "unknown datatype": (*_framed([_tensor("a", 2, datatype="FP16")], TWO), "'FP16' has no binary form"),
    "negative size": (*_framed([_tensor("a", 2, size=-16)], TWO), "must be a byte count"),
    "bad shape": (*_framed([_tensor("a", 2, shape=[2, "x"])], TWO), "shape must be"),
    "data and binary": (*_framed([{**_tensor("a", 2), "data": [1, 2]}], TWO), "both data and"),
    "BYTES length cut": (*_framed([_tensor("c", 2, 7, "BYTES")], _strings(b"a") + b"\x00\x00"), "cut 4-byte"),
    "BYTES element overruns": (
        *_framed([_tensor("c", 1, 7, "BYTES")], _strings(b"abcdefghi")[:7]),
        "9 bytes",
    ),
    "BYTES too many": (*_framed([_tensor("c", 1, 10, "BYTES")], _strings(b"a", b"b")), "after its 1 BYTES"),
    "BYTES too few": (*_framed([_tensor("c", 2, 5, "BYTES")], _strings(b"a")), "1 BYTES elements for 2"),
    "BYTES not UTF-8": (*_framed([_tensor("c", 1, 6, "BYTES")], _strings(b"\xff\xfe")), "not UTF-8"),
    "BOOL not 0 or 1": (*_framed([_tensor("f", 2, 2, "BOOL")], b"\x01\x07"), "0 or 1"),
}


@pytest.mark.parametrize(("body", "header_length", "says"), MALFORMED.values(), ids=list(MALFORMED))
def test_malformed_binary_bodies_name_the_problem(body, header_length, says):
    """Each is a BinaryProblem saying what is wrong (a header that is not JSON: the parser's error)."""
    refusal = json.JSONDecodeError if says == "is not JSON" else BinaryProblem
    with pytest.raises(refusal, match=None if refusal is json.JSONDecodeError else says):
        head, tensors = split_body(body, header_length)
        with_binary_inputs(orjson.loads(head), tensors)


def test_every_v2_datatype_has_a_binary_form():
    assert set(DTYPES) | {"BYTES"} == V2_DATATYPES


# --- One real endpoint --------------------------------------------------------------------------

REGRESSION = {
    "task": "regression",
    "classes": [],
    "columns": [
        {"name": "a", "kind": "numeric", "fill": 0.5},
        {"name": "c", "kind": "categorical", "categories": ["red", "blue", "green"]},
        {"name": "f", "kind": "boolean", "fill": 0.0},
    ],
}
CLASSIFIER = {
    "task": "classification",
    "classes": ["cat", "dog", "eel"],
    "columns": [{"name": "a", "kind": "numeric", "fill": 0.0}, {"name": "b", "kind": "numeric", "fill": 0.0}],
}


def _linear(spec: dict, coef: list[list[float]], intercept: list[float]) -> LoadedModel:
    """A linear champion from its coefficients: the endpoint's real predict path, no training."""
    k = len(spec["columns"])
    classes = list(range(len(spec["classes"]))) or [0]
    weights = {"mean": [0.0] * k, "std": [1.0] * k, "coef": coef, "intercept": intercept, "classes": classes}
    task = Task(spec["task"])
    ref = ArtifactRef(uri="file:///tmp/m.json", sha256="2" * 64, size=1, media_type="application/json")
    predictor = LinearPredictor(json.dumps(weights).encode(), task, len(classes))
    return LoadedModel(ref, {"family": "linear", "transform": spec}, predictor)


MODELS = {
    "reg": _linear(REGRESSION, [[1.5, -0.75, 2.0]], [0.25]),
    "cls": _linear(CLASSIFIER, [[1.0, -1.0], [-0.5, 2.0], [0.0, 0.5]], [0.1, 0.0, -0.2]),
}


@pytest.fixture(scope="module")
async def endpoint_url(tmp_path_factory):
    """The inference app on the endpoint's own HTTP server (services.serving.wire) on a real port,
    its champions set by hand (no NATS, no MLflow: the v2 routes under test read only the champions)."""
    from services.serving.app import InferenceServer
    from services.serving.launch import listening_socket
    from services.serving.wire import WireServer

    settings = make_settings("nats://127.0.0.1:4222", tmp_path_factory.mktemp("binary"))
    server = InferenceServer(settings)
    server.champions.models = {name: server.champions.prepare(name, 1, m) for name, m in MODELS.items()}
    sock = listening_socket("127.0.0.1", 0)
    wire = WireServer(server.app(), server.inference_handlers(), max_body=settings.max_request_bytes)
    stop = asyncio.Event()
    serving = asyncio.create_task(wire.serve(sock, stop))
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    await serving
    await server.champions.close()


def _triton(url: str, model: str, columns: dict, binary: bool, outputs: list[str] | None):
    """One tritonclient.http inference: `binary` for inputs and outputs both (its default: True)."""
    client = Client(url=url)
    try:
        inputs = [_input(name, values, datatype, binary) for name, (values, datatype) in columns.items()]
        asked = [httpclient.InferRequestedOutput(o, binary_data=binary) for o in outputs or []]
        result = client.infer(model, inputs, outputs=asked or None)
        return result, client.get_server_metadata()
    finally:
        client.close()


def _binary_sizes(result) -> dict[str, int | None]:
    outputs = result.get_response()["outputs"]
    return {o["name"]: (o.get("parameters") or {}).get("binary_data_size") for o in outputs}


async def test_triton_default_binary_mode_predicts_as_json_mode(endpoint_url):
    """Regression with numeric, categorical (BYTES, one category unknown) and boolean columns:
    tritonclient's default binary request and answer give JSON mode's numbers, and the model's own
    pandas path's; the server metadata lists the extension."""
    columns = {
        "a": (np.array([0.3, -1.2, 4.0]), "FP64"),
        "c": (np.array(["blue", "purple", "green"], dtype=object), "BYTES"),
        "f": (np.array([True, False, True]), "BOOL"),
    }
    plain, meta = await asyncio.to_thread(_triton, endpoint_url, "reg", columns, False, ["predict"])
    binary, _ = await asyncio.to_thread(_triton, endpoint_url, "reg", columns, True, None)
    asked, _ = await asyncio.to_thread(_triton, endpoint_url, "reg", columns, True, ["predict"])
    assert "binary_tensor_data" in meta["extensions"]
    assert _binary_sizes(plain) == {"predict": None}
    assert _binary_sizes(binary) == _binary_sizes(asked) == {"predict": 24}  # answered in binary
    expected = plain.as_numpy("predict")
    np.testing.assert_array_equal(binary.as_numpy("predict"), expected)
    np.testing.assert_array_equal(asked.as_numpy("predict"), expected)

    import pandas as pd

    frame = pd.DataFrame({name: values for name, (values, _) in columns.items()})
    np.testing.assert_allclose(expected, MODELS["reg"].predict_raw(frame), rtol=1e-6)


async def test_triton_default_binary_mode_classifies_as_json_mode(endpoint_url):
    """A classifier's labels (BYTES) and probabilities ([n, classes] FP64), both binary by default,
    from one 2-D FP32 tensor: the same as JSON mode's."""
    x = np.array([[0.3, -1.2], [2.0, 0.1], [-1.0, 3.0], [-3.0, -1.5]], dtype=np.float32)
    columns = {"x": (x, "FP32")}
    both = ["predict", "probabilities"]
    plain, _ = await asyncio.to_thread(_triton, endpoint_url, "cls", columns, False, both)
    binary, _ = await asyncio.to_thread(_triton, endpoint_url, "cls", columns, True, None)
    assert _binary_sizes(binary) == {"predict": 4 * 4 + 3 * 4, "probabilities": 4 * 3 * 8}
    assert [v.decode() for v in binary.as_numpy("predict")] == plain.as_numpy("predict").tolist()
    np.testing.assert_array_equal(binary.as_numpy("probabilities"), plain.as_numpy("probabilities"))
    assert binary.get_output("probabilities")["parameters"]["classes"] == CLASSIFIER["classes"]
    assert set(plain.as_numpy("predict").tolist()) == {"cat", "dog", "eel"}  # the rows reach every class


async def test_malformed_binary_bodies_are_400s_naming_the_problem(endpoint_url):
    async with httpx.AsyncClient(base_url=f"http://{endpoint_url}", timeout=30) as client:
        for case, (body, header_length, says) in MALFORMED.items():
            headers = {} if header_length is None else {HEADER: header_length}
            response = await client.post("/v2/models/reg/infer", content=body, headers=headers)
            assert response.status_code == 400, (case, response.status_code, response.text)
            assert says is None or says in response.json()["error"], (case, response.json())
        # A well-framed body whose values are wrong is still the 422 JSON mode gives.
        body, header_length = _framed([_tensor("zz", 2)], TWO)
        response = await client.post("/v2/models/reg/infer", content=body, headers={HEADER: header_length})
        assert response.status_code == 422 and "unknown inputs" in response.json()["error"]
