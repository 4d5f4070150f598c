"""The Open Inference Protocol over gRPC, on real parts: the messages agree with tritonclient's on
the wire; tensors read the same from `contents` and from raw bytes; and one endpoint
(`cairn serving start`, two worker processes sharing the gRPC port as the Helm chart runs them,
a real nats-server, MLflow on SQLite, models trained for real) answers tritonclient.grpc with the
HTTP route's predictions, refuses with the protocol's status codes, counts both in /metrics,
records them, answers gRPC health checks, and swaps its champion for gRPC callers too.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from services.platform.bus.connection import connect
from services.platform.bus.embedded import EmbeddedNats
from services.platform.bus.provision import provision_all
from services.serving.binary_tensors import BinaryProblem
from services.serving.grpc_tensors import request_doc, response
from services.serving.grpc_v2 import predict_v2_pb2 as pb
from services.serving.logic import RequestProblem, v2_rows
from services.tools.supervisor import free_port
from tests.conftest import data_dir, make_settings
from tests.test_registry import BEST, GOOD, make_lab
from tests.test_serving import _publish_deployed, _register, _wait, endpoint, endpoint_ready

ROWS = [{"a": 0.3, "b": -1.2}, {"a": 1.5, "b": 0.2}, {"a": -0.7, "b": 2.0}]
SERVICE = "/inference.GRPCInferenceService/"
HEALTH = "/grpc.health.v1.Health/Check"


# The messages -----------------------------------------------------------------------------------
def _fields(message: Any) -> dict[str, tuple]:
    """A message's wire shape: each field's number, type, repetition and the name of its message."""
    return {
        f.name: (f.number, f.type, f.is_repeated, f.message_type.name if f.message_type else None)
        for f in message.fields
    }


def test_messages_are_the_protocols_on_the_wire():
    """Every message in predict_v2.proto, nested and map entries included, has the fields of
    tritonclient's compiled protocol, number for number; and the service's calls use them."""
    from tritonclient.grpc import service_pb2

    def compare(ours: Any, theirs: Any) -> int:
        assert _fields(ours) == _fields(theirs), ours.full_name
        for nested in ours.nested_types:
            compare(nested, theirs.nested_types_by_name[nested.name])
        return 1 + sum(1 for _ in ours.nested_types)

    compared = sum(
        compare(message, service_pb2.DESCRIPTOR.message_types_by_name[name])
        for name, message in pb.DESCRIPTOR.message_types_by_name.items()
    )
    assert compared >= 20, compared
    calls = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
    for call in ("ServerLive", "ServerReady", "ServerMetadata", "ModelReady", "ModelMetadata", "ModelInfer"):
        assert calls[call].input_type.name in pb.DESCRIPTOR.message_types_by_name, call
        assert calls[call].output_type.name in pb.DESCRIPTOR.message_types_by_name, call


# Tensors ----------------------------------------------------------------------------------------
SCHEMA = {"x": "numeric", "n": "numeric", "f": "boolean", "c": "categorical"}
TENSORS = {  # name: (datatype, numpy values)
    "x": ("FP32", np.array([0.5, -2.25, 3.0], dtype=np.float32)),
    "n": ("INT64", np.array([7, -1, 2**40], dtype=np.int64)),
    "f": ("BOOL", np.array([True, False, True])),
    "c": ("BYTES", np.array(["red", "blåu", ""], dtype=object)),
}
CONTENTS = {
    "FP32": "fp32_contents",
    "INT64": "int64_contents",
    "BOOL": "bool_contents",
    "BYTES": "bytes_contents",
}


def _triton_request(raw: bool) -> Any:
    """The request as tritonclient's own messages build it, raw (its default) or typed."""
    from tritonclient.grpc import service_pb2
    from tritonclient.utils import serialize_byte_tensor

    request = service_pb2.ModelInferRequest(model_name="m", id="r1")
    for name, (datatype, values) in TENSORS.items():
        tensor = request.inputs.add(name=name, datatype=datatype, shape=[len(values)])
        if raw:
            blob = serialize_byte_tensor(values).item() if datatype == "BYTES" else values.tobytes()
            request.raw_input_contents.append(blob)
        else:
            data = [v.encode() for v in values] if datatype == "BYTES" else values.tolist()
            getattr(tensor.contents, CONTENTS[datatype]).extend(data)
    return request


def test_tensors_read_alike_from_contents_and_raw_bytes_and_answer_back_as_they_came():
    """A request read from tritonclient's bytes gives the rows its JSON form gives, raw or typed;
    an answer goes back raw or typed as the request came, and tritonclient's InferResult reads it."""
    from tritonclient.grpc import InferResult, service_pb2

    as_json = {
        "inputs": [
            {"name": n, "datatype": d, "shape": [len(v)], "data": v.tolist()} for n, (d, v) in TENSORS.items()
        ]
    }
    expected = v2_rows(as_json, SCHEMA)
    assert expected[1] == {"x": -2.25, "n": -1, "f": False, "c": "blåu"}
    for raw in (True, False):
        request = pb.ModelInferRequest.FromString(_triton_request(raw).SerializeToString())
        doc = request_doc(request)
        assert doc["id"] == "r1" and v2_rows(doc, SCHEMA) == expected, raw

        answer = {
            "model_name": "m", "model_version": "3", "id": "r1", "parameters": {"sha256": "ab" * 32},
            "outputs": [
                {"name": "predict", "datatype": "BYTES", "shape": [2], "data": ["yes", "no"]},
                {"name": "probabilities", "datatype": "FP64", "shape": [2, 2], "data": [0.9, 0.1, 0.2, 0.8],
                 "parameters": {"classes": ["no", "yes"]}},
            ],
        }  # fmt: skip
        got = service_pb2.ModelInferResponse.FromString(response(answer, raw=raw).SerializeToString())
        assert got.parameters["sha256"].string_param == "ab" * 32 and got.model_version == "3"
        assert got.outputs[1].parameters["classes"].string_param == '["no","yes"]'
        assert [list(o.shape) for o in got.outputs] == [[2], [2, 2]]
        if raw:  # tritonclient reads numbers only from raw bytes (Triton answers nothing else)
            result = InferResult(got)
            assert result.as_numpy("predict").tolist() == [b"yes", b"no"]
            assert result.as_numpy("probabilities").tolist() == [[0.9, 0.1], [0.2, 0.8]]
        else:
            assert not got.raw_output_contents
            assert list(got.outputs[0].contents.bytes_contents) == [b"yes", b"no"]
            assert list(got.outputs[1].contents.fp64_contents) == [0.9, 0.1, 0.2, 0.8]

    def request_with(change) -> pb.ModelInferRequest:
        request = pb.ModelInferRequest.FromString(_triton_request(True).SerializeToString())
        change(request)
        return request

    refused = {
        "one per input": lambda r: r.raw_input_contents.pop(),
        "both given": lambda r: r.inputs[0].contents.fp32_contents.append(1.0),
        "datatype must be one of": lambda r: setattr(r.inputs[0], "datatype", "FP8"),
        "bytes for FP32": lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 5),
        "not UTF-8": lambda r: r.raw_input_contents.__setitem__(3, b"\1\0\0\0\xff" * 3),
    }
    for reason, change in refused.items():
        with pytest.raises((RequestProblem, BinaryProblem), match=reason):
            request_doc(request_with(change))
    typed = pb.ModelInferRequest.FromString(_triton_request(False).SerializeToString())
    typed.inputs[3].contents.bytes_contents[0] = b"\xff"
    with pytest.raises(RequestProblem, match="not UTF-8"):
        request_doc(typed)


def test_a_taken_grpc_port_stops_the_start_naming_the_setting():
    """Before any worker starts: a worker that cannot bind would be restarted by the keeper forever."""
    import socket

    from services.serving.launch import check_grpc_port

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"port {port} on 127.0.0.1 is in use.*CAIRN_SERVE_GRPC_PORT"):
            check_grpc_port("127.0.0.1", port)


# One endpoint -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
async def served(tmp_path_factory):
    """A trained model registered as champion, a second one ready to deploy, and the endpoint with
    two workers, HTTP and gRPC, serving the first."""
    root = tmp_path_factory.mktemp("grpc")
    nats = EmbeddedNats(root / "nats")
    nats.start()
    try:
        settings = make_settings(nats.url, root, serve_grpc_port=free_port())
        nc = await connect(settings, "test")
        await provision_all(nc.jetstream(), settings)
        lab = make_lab(settings, data_dir(settings))
        first, second = lab.train("srv", GOOD), lab.train("srv", BEST)
        assert _register(lab, first, "e1") == 1
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with endpoint(settings, port, workers=2) as proc:
            async with httpx.AsyncClient(timeout=30) as client:
                await endpoint_ready(client, url, proc, settings)
                yield types.SimpleNamespace(
                    settings=settings, lab=lab, first=first, second=second, url=url, client=client,
                    grpc=f"127.0.0.1:{settings.serve_grpc_port}", js=nc.jetstream(),
                )  # fmt: skip
        await nc.close()
    finally:
        nats.stop()


def _triton_infer(address: str, rows: list[dict], **kwargs: Any) -> Any:
    """tritonclient.grpc as its users call it: FP64 tensors, one per column (raw bytes, its default)."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url=address) as client:
        inputs = []
        for column in ("a", "b"):
            tensor = grpcclient.InferInput(column, [len(rows)], "FP64")
            tensor.set_data_from_numpy(np.array([r[column] for r in rows], dtype=np.float64))
            inputs.append(tensor)
        return client.infer("srv", inputs, **kwargs)


def _refusal(call) -> tuple[str, str]:
    """The gRPC status code name and message a call ends with."""
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as failure:
        call()
    return failure.value.status().removeprefix("StatusCode."), failure.value.message()


def _metric(text: str, labels: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(f"cairn_inference_requests_total{{{labels}}}")
    )


@pytest.mark.slow
async def test_tritonclient_grpc_gets_the_http_predictions_status_codes_metrics_and_records(served):
    import asyncio

    import grpc
    import tritonclient.grpc as grpcclient
    from tritonclient.grpc import service_pb2

    from services.serving.records import read_records

    url, address = served.url, served.grpc
    per_column = {
        "inputs": [
            {"name": c, "shape": [len(ROWS)], "datatype": "FP64", "data": [r[c] for r in ROWS]} for c in "ab"
        ]
    }
    by_http = (await served.client.post(url + "/v2/models/srv/infer", json=per_column)).json()
    http_predictions = by_http["outputs"][0]["data"]

    def protocol_calls() -> dict[str, Any]:
        with grpcclient.InferenceServerClient(url=address) as client:
            meta = client.get_model_metadata("srv")
            return {
                "live": client.is_server_live(),
                "ready": client.is_server_ready(),
                "model ready": client.is_model_ready("srv"),
                "version 1 ready": client.is_model_ready("srv", "1"),
                "version 7 ready": client.is_model_ready("srv", "7"),
                "nope ready": client.is_model_ready("nope"),
                "server": client.get_server_metadata().name,
                "meta": (
                    meta.name,
                    list(meta.versions),
                    [(t.name, t.datatype, list(t.shape)) for t in meta.inputs],
                ),
                "outputs": [(t.name, t.datatype, list(t.shape)) for t in meta.outputs],
            }

    calls = await asyncio.to_thread(protocol_calls)
    inputs = [("a", "FP64", [-1]), ("b", "FP64", [-1])]
    assert calls == {
        "live": True, "ready": True, "model ready": True, "version 1 ready": True, "version 7 ready": False,
        "nope ready": False, "server": "cairn", "meta": ("srv", ["1"], inputs),
        "outputs": [("predict", "FP64", [-1])],
    }  # fmt: skip
    http_meta = (await served.client.get(url + "/v2/models/srv")).json()
    # Both protocols describe the model with one function (logic.model_tensors).
    assert [(t["name"], t["datatype"], t["shape"]) for t in http_meta["inputs"]] == calls["meta"][2]
    assert [(t["name"], t["datatype"], t["shape"]) for t in http_meta["outputs"]] == calls["outputs"]

    # tritonclient's default (raw tensors): the HTTP route's predictions, to the bit.
    result = await asyncio.to_thread(_triton_infer, address, ROWS, request_id="g1")
    assert result.as_numpy("predict").tolist() == http_predictions
    answer = result.get_response()
    assert (answer.model_version, answer.id) == ("1", "g1")
    assert answer.parameters["sha256"].string_param == served.first.model.sha256
    only = await asyncio.to_thread(
        _triton_infer, address, ROWS[:1], outputs=[grpcclient.InferRequestedOutput("predict")]
    )
    assert only.as_numpy("predict").tolist() == http_predictions[:1]

    # Typed `contents`, and one 2-D tensor: answered with typed contents, the same numbers.
    def typed() -> Any:
        with grpc.insecure_channel(address) as channel:
            request = service_pb2.ModelInferRequest(model_name="srv", model_version="1")
            tensor = request.inputs.add(name="x", datatype="FP64", shape=[len(ROWS), 2])
            tensor.contents.fp64_contents.extend(v for r in ROWS for v in (r["a"], r["b"]))
            return channel.unary_unary(
                SERVICE + "ModelInfer",
                request_serializer=service_pb2.ModelInferRequest.SerializeToString,
                response_deserializer=service_pb2.ModelInferResponse.FromString,
            )(request)

    typed_answer = await asyncio.to_thread(typed)
    assert not typed_answer.raw_output_contents
    assert list(typed_answer.outputs[0].contents.fp64_contents) == http_predictions

    # The protocol's status codes, with the reason.
    def refusals() -> dict[str, tuple[str, str]]:
        with grpcclient.InferenceServerClient(url=address) as client:
            good = grpcclient.InferInput("a", [1], "FP64")
            good.set_data_from_numpy(np.array([0.5]))
            unknown = grpcclient.InferInput("zz", [1], "FP64")
            unknown.set_data_from_numpy(np.array([0.5]))
            return {
                "nope": _refusal(lambda: client.infer("nope", [good])),
                "version 7": _refusal(lambda: client.infer("srv", [good], model_version="7")),
                "unknown input": _refusal(lambda: client.infer("srv", [unknown])),
                "metadata nope": _refusal(lambda: client.get_model_metadata("nope")),
            }

    refused = await asyncio.to_thread(refusals)
    assert {k: code for k, (code, _) in refused.items()} == {
        "nope": "NOT_FOUND", "version 7": "NOT_FOUND", "unknown input": "INVALID_ARGUMENT",
        "metadata nope": "NOT_FOUND",
    }  # fmt: skip
    assert "no champion for model 'nope'" in refused["nope"][1]
    assert "version '7' is not served" in refused["version 7"][1]
    assert "unknown inputs ['zz']" in refused["unknown input"][1]

    # grpc.health.v1, as Kubernetes' probe sends it (bytes: the request's field 1 is the service).
    def health(service: bytes) -> bytes | str:
        with grpc.insecure_channel(address) as channel:
            request = b"\n" + bytes([len(service)]) + service if service else b""
            try:
                return channel.unary_unary(HEALTH)(request, timeout=10)
            except grpc.RpcError as exc:
                return exc.code().name

    assert await asyncio.to_thread(health, b"") == b"\x08\x01"  # SERVING: models loaded, NATS up
    assert await asyncio.to_thread(health, b"inference.GRPCInferenceService") == b"\x08\x01"
    assert await asyncio.to_thread(health, b"liveness") == b"\x08\x01"
    assert await asyncio.to_thread(health, b"nope") == "NOT_FOUND"

    def watch_first() -> bytes:
        with grpc.insecure_channel(address) as channel:
            stream = channel.unary_stream("/grpc.health.v1.Health/Watch")(b"", timeout=10)
            first = next(stream)
            stream.cancel()
            return first

    assert await asyncio.to_thread(watch_first) == b"\x08\x01"

    # Both workers serve the one gRPC port: fresh connections land on either.
    def worker() -> str:
        with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            request = service_pb2.ModelInferRequest(model_name="srv")
            tensor = request.inputs.add(name="a", datatype="FP64", shape=[1])
            tensor.contents.fp64_contents.append(0.1)
            _, call = channel.unary_unary(
                SERVICE + "ModelInfer",
                request_serializer=service_pb2.ModelInferRequest.SerializeToString,
                response_deserializer=service_pb2.ModelInferResponse.FromString,
            ).with_call(request)
            return dict(call.trailing_metadata())["x-cairn-worker"]

    pids: set[str] = set()
    answered = 0

    async def both_workers() -> bool:
        nonlocal answered
        pids.add(await asyncio.to_thread(worker))
        answered += 1
        return len(pids) == 2

    await _wait(both_workers, "gRPC answers from both workers", timeout=60)

    # /metrics (every worker's) counts gRPC calls under their code, HTTP's under their status.
    text = (await served.client.get(url + "/metrics")).text
    assert _metric(text, 'model="srv",status="OK"') == 3 + answered
    assert _metric(text, 'model="srv",status="NOT_FOUND"') == 1
    assert _metric(text, 'model="srv",status="INVALID_ARGUMENT"') == 1
    assert _metric(text, 'model="nope",status="NOT_FOUND"') == 1
    assert _metric(text, 'model="srv",status="200"') == 1

    # The request records name the version that answered a gRPC call, as for HTTP.
    async def recorded() -> list:
        records = await read_records(served.js, served.settings, model="srv", last=500)
        return [r for r in records if r.request_id == "g1"]

    (record,) = await _wait(recorded, "the gRPC call's record")
    assert (record.route, record.model_version, record.rows) == ("infer", 1, len(ROWS))


@pytest.mark.slow
async def test_a_deployment_is_seen_by_grpc_callers(served):
    """After model.deployed, a gRPC caller on an open channel gets the new version's predictions,
    those the HTTP route gives."""
    import asyncio

    import tritonclient.grpc as grpcclient

    address = served.grpc
    version = await asyncio.to_thread(_register, served.lab, served.second, "e2")
    assert version == 2
    with grpcclient.InferenceServerClient(url=address) as client:
        tensors = []
        for column in ("a", "b"):
            tensor = grpcclient.InferInput(column, [len(ROWS)], "FP64")
            tensor.set_data_from_numpy(np.array([r[column] for r in ROWS], dtype=np.float64))
            tensors.append(tensor)
        before = await asyncio.to_thread(client.infer, "srv", tensors)
        assert before.get_response().model_version == "1"
        await _publish_deployed(served.settings, served.second, 2, 1)

        async def on_v2() -> Any:
            result = await asyncio.to_thread(client.infer, "srv", tensors)
            return result if result.get_response().model_version == "2" else None

        after = await _wait(on_v2, "version 2 over gRPC", timeout=120)
    answer = after.get_response()
    assert answer.parameters["sha256"].string_param == served.second.model.sha256

    async def http_on_v2() -> Any:
        doc = (await served.client.post(served.url + "/v1/models/srv/predict", json={"rows": ROWS})).json()
        return doc if doc["version"] == 2 else None

    http = await _wait(http_on_v2, "version 2 over HTTP", timeout=120)
    assert after.as_numpy("predict").tolist() == pytest.approx(http["predictions"], rel=1e-12)
    assert after.as_numpy("predict").tolist() != before.as_numpy("predict").tolist()


@pytest.mark.slow
async def test_kserve_python_clients_in_their_default_modes_get_the_http_predictions(served):
    """KServe's own InferenceRESTClient (v2, binary tensors: its default) and InferenceGRPCClient
    (raw contents), from a venv of their own (their pins conflict with cairn's lock), against the
    same endpoint: the predictions the JSON route gives."""
    import asyncio
    import json
    import subprocess

    from tests.peers.kserve_venv import kserve_python

    columns = {c: [r[c] for r in ROWS] for c in "ab"}
    per_column = {"inputs": [{"name": c, "shape": [len(v)], "datatype": "FP64", "data": v}
                             for c, v in columns.items()]}
    by_http = (await served.client.post(served.url + "/v2/models/srv/infer", json=per_column)).json()
    expected = by_http["outputs"][0]["data"]
    python = await asyncio.to_thread(kserve_python)
    script = Path(__file__).parent / "peers" / "kserve_infer.py"
    done = await asyncio.to_thread(
        subprocess.run, [str(python), str(script), served.url, served.grpc, "srv", json.dumps(columns)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert "error" not in got["rest"] and "error" not in got["grpc"], got
    assert got["rest"]["predict"] == pytest.approx(expected, rel=1e-9)
    assert got["grpc"]["predict"] == pytest.approx(expected, rel=1e-9)
    assert got["rest"]["sent_binary"] is True  # Triton's binary tensor extension, the client's default
    assert got["rest"]["id"] == got["grpc"]["id"] == "kserve-1"  # the request's id comes back
    assert got["grpc"]["model_ready"] is True
