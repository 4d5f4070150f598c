"""Run in .venv-kserve (never imports cairn): KServe's own clients, in their default modes, against
a cairn endpoint. Prints one JSON object: each protocol's predictions, or its error.

    python kserve_infer.py HTTP_URL GRPC_ADDRESS MODEL '{"column": [values], ...}'

REST: `InferenceRESTClient` with the v2 protocol, inputs set from numpy with its default
`binary_data=True` (Triton's binary tensor extension). gRPC: `InferenceGRPCClient`, whose request
carries the tensors as `raw_input_contents`.
"""

import asyncio
import json
import sys

import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest
from kserve.inference_client import RESTConfig


def request(model: str, columns: dict) -> InferRequest:
    inputs = []
    for name, values in columns.items():
        array = np.array(values, dtype=object if isinstance(values[0], str) else np.float64)
        tensor = InferInput(name, [len(values)], "BYTES" if array.dtype == object else "FP64")
        tensor.set_data_from_numpy(array)  # binary_data=True: its default
        inputs.append(tensor)
    return InferRequest(model_name=model, infer_inputs=inputs, request_id="kserve-1")


async def main(http_url: str, grpc_address: str, model: str, columns: dict) -> dict:
    out = {}
    rest = InferenceRESTClient(RESTConfig(protocol="v2"))
    try:
        answer = await rest.infer(http_url, request(model, columns), model_name=model)
        _, json_length = request(model, columns).to_rest()  # what the client sent: binary if a length
        out["rest"] = {"predict": answer.outputs[0].as_numpy().tolist(), "id": answer.id,
                       "sent_binary": bool(json_length)}
    except Exception as exc:  # noqa: BLE001 - reported to the test
        out["rest"] = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        await rest.close()
    grpc_client = InferenceGRPCClient(grpc_address)
    try:
        answer = await grpc_client.infer(request(model, columns))
        out["grpc"] = {"predict": answer.outputs[0].as_numpy().tolist(), "id": answer.id}
        ready = await grpc_client.is_model_ready(model)
        out["grpc"]["model_ready"] = ready
    except Exception as exc:  # noqa: BLE001
        out["grpc"] = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        await grpc_client.close()
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])))))
