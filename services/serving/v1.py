"""cairn's own routes (/v1/models...): list the champions, predict on raw rows, health."""

from __future__ import annotations

import time
import uuid

from starlette.requests import Request
from starlette.responses import Response

from services.platform.ml.transform import input_schema
from services.serving.champion import Served
from services.serving.intake import Answer, Call, Intake, json_answer, json_response
from services.serving.logic import present


class V1:
    def __init__(self, intake: Intake):
        self.intake = intake

    async def predict(self, request: Request) -> Response:
        return await self.intake.route(request, self.answer)

    async def answer(self, call: Call) -> Answer:
        return await self.intake.admitted(call, self._predict)

    async def _predict(self, call: Call, served: Served) -> Answer:
        intake = self.intake
        start = time.perf_counter()
        got = intake.rows(call, served, v2=False)
        if isinstance(got, Answer):
            return got
        _, x, n = got
        name = served.name
        out = await served.batcher(x)
        predictions = present(served.task, served.model.spec["classes"], out)
        intake.metrics.answered(name, start)
        if intake.recorder.rate > 0:  # the id is the record's only: no uuid4 per request when off
            request_id = call.headers.get("x-request-id") or uuid.uuid4().hex
            intake.recorder.record(served, "predict", call.body, n, predictions, start, request_id)
        return json_answer(
            {"model": name, "version": served.version, "sha256": served.model.ref.sha256,
             "predictions": predictions},
            headers=intake.worker,
        )

    async def list_models(self, _: Request) -> Response:
        return json_response(
            {
                name: {
                    "version": s.version,
                    "sha256": s.model.ref.sha256,
                    "family": s.model.manifest["family"],
                    "task": s.task,
                    "columns": input_schema(s.model.spec) if "columns" in s.model.spec else None,
                }
                for name, s in sorted(self.intake.champions.models.items())
            }
        )

    async def healthz(self, _: Request) -> Response:
        return json_response({"alive": True})

    async def readyz(self, _: Request) -> Response:
        champions = self.intake.champions
        ok = champions.is_ready()
        # "service" as every service's /readyz says it: `cairn up` counts an answer only from its own
        body = {"service": "serve", "ready": ok, "models": sorted(champions.models)}
        return json_response(body, 200 if ok else 503)
