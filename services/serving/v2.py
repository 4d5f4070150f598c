"""The Open Inference Protocol v2 (/v2/...), as KServe, Triton and MLServer clients speak it:
named tensors in, named tensors out, as JSON or as Triton's binary tensor data
(services.serving.binary_tensors); a path that names a version is answered by that one."""

from __future__ import annotations

import time
import uuid

from starlette.requests import Request
from starlette.responses import Response

from services.platform.ml.transform import input_schema
from services.serving import binary_tensors
from services.serving.champion import Served
from services.serving.intake import Answer, Call, Intake, json_answer, json_response
from services.serving.logic import model_tensors, v2_outputs, version_problem


class V2:
    def __init__(self, intake: Intake):
        self.intake = intake

    async def infer(self, request: Request) -> Response:
        return await self.intake.route(request, self.answer)

    async def answer(self, call: Call) -> Answer:
        """Open Inference Protocol: named tensors in, named tensors out (JSON or binary)."""
        return await self.intake.admitted(call, self._infer)

    async def _infer(self, call: Call, served: Served) -> Answer:
        intake = self.intake
        start = time.perf_counter()
        got = intake.rows(call, served, v2=True)
        if isinstance(got, Answer):
            return got
        doc, x, n = got
        name = served.name
        if not n:
            return intake.error(name, 422, "no rows")
        out = await served.batcher(x)
        outputs = v2_outputs(served.task, served.model.spec["classes"], out)
        wanted = {o.get("name") for o in binary_tensors.requested_outputs(doc)}
        if wanted:
            outputs = [o for o in outputs if o["name"] in wanted]
        intake.metrics.answered(name, start)
        # The answer's id is the request's, if it gave one (the protocol's is optional): no uuid4
        # per request unless a request record needs an id.
        request_id = doc.get("id") or call.headers.get("x-request-id")
        if intake.recorder.rate > 0:
            request_id = request_id or uuid.uuid4().hex
            intake.recorder.record(served, "infer", call.body, n, outputs, start, request_id)
        answer = {"model_name": name, "model_version": str(served.version),
                  "outputs": outputs, "parameters": {"sha256": served.model.ref.sha256}}
        if request_id:
            answer["id"] = str(request_id)
        binary = binary_tensors.binary_outputs(doc, [o["name"] for o in outputs])
        if not binary:
            return json_answer(answer, headers=intake.worker)
        content, header_length = binary_tensors.response_body(answer, binary)
        headers = {**intake.worker, binary_tensors.HEADER: str(header_length)}
        return Answer(content, headers=headers, media_type=binary_tensors.MEDIA_TYPE)

    async def live(self, _: Request) -> Response:
        return json_response({"live": True})

    async def ready(self, _: Request) -> Response:
        ok = self.intake.champions.is_ready()
        return json_response({"ready": ok}, 200 if ok else 503)

    async def server(self, _: Request) -> Response:
        return json_response({"name": "cairn", "version": "1", "extensions": ["binary_tensor_data"]})

    async def model(self, request: Request) -> Response:
        """Model metadata: the input tensors are the model's columns, in the order a 2-D tensor uses."""
        name, version = request.path_params["name"], request.path_params.get("version")
        served = self.intake.champions.models.get(name)
        if served is None:
            return json_response({"error": f"no champion for model {name!r}"}, 404)
        if (problem := version_problem(name, version, served.version)) is not None:
            served_version = str(served.version)
            doc = {"error": problem, "version": version, "served_version": served_version}
            return json_response(doc, 404)
        spec = served.model.spec
        schema = input_schema(spec) if served.task != "text_generation" else {}
        inputs, outputs = model_tensors(served.task, schema, spec.get("classes") or [])
        return json_response(
            {"name": name, "versions": [str(served.version)],
             "platform": f"cairn-{served.model.manifest['family']}",
             "inputs": inputs, "outputs": outputs,
             "parameters": {"sha256": served.model.ref.sha256, "task": served.task,
                            "predictor": served.predictor or served.model.manifest["family"]}}
        )

    async def model_ready(self, request: Request) -> Response:
        name, version = request.path_params["name"], request.path_params.get("version")
        served = self.intake.champions.models.get(name)
        ready = served is not None and version_problem(name, version, served.version) is None
        return json_response({"name": name, "ready": ready}, 200 if ready else 404)
