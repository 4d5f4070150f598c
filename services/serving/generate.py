"""Text generation (/v1/models/NAME/generate): a prompt continued, answered whole or streamed as
server-sent events, one per token as it is produced."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from services.serving.champion import Served
from services.serving.intake import Answer, Intake, json_response, response
from services.serving.logic import GenerateRequest
from services.serving.textstream import TextDecoder


class Generation:
    def __init__(self, intake: Intake):
        self.intake = intake

    async def generate(self, request: Request) -> Response:
        """Continue a prompt: {prompt, max_tokens, temperature, top_k, seed, stream}.

        `tokens` counts the tokens really generated; with `stream: true` the answer is server-sent
        events, one per token, then a final one with the counts. The seed fixes the text either way.
        """
        intake = self.intake
        start = time.perf_counter()
        got = await intake.request(request, "text_generation")
        if isinstance(got, Answer):
            return response(got)
        name, served, body = got
        try:
            ask = GenerateRequest.model_validate_json(body)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            return response(intake.error(name, 422, problems))
        text = served.text
        prompt_ids = text.prompt_ids(ask.prompt)
        head = {"model": name, "version": served.version, "sha256": served.model.ref.sha256}
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        tokens = text.tokens(prompt_ids, ask.max_tokens, ask.temperature, ask.top_k, ask.seed)
        if ask.stream:
            return StreamingResponse(
                self._events(served, head, tokens, len(prompt_ids), body, start, request_id),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache"},
            )
        ids = await asyncio.to_thread(list, tokens)
        decoder = TextDecoder(text.tokenizer)
        out = "".join(decoder.piece(i) for i in ids) + decoder.end()
        intake.metrics.answered(name, start)
        intake.recorder.record(served, "generate", body, 1, out, start, request_id)
        return json_response({**head, "text": out, "tokens": len(ids), "prompt_tokens": len(prompt_ids)})

    async def _events(self, served: Served, head: dict, tokens: Any, prompt_tokens: int, body: bytes,
                      start: float, request_id: str) -> AsyncIterator[bytes]:
        """One SSE event per token as it is produced; a client that leaves stops the generation."""
        intake = self.intake
        decoder = TextDecoder(served.text.tokenizer)
        count, parts = 0, []
        done = object()
        while (token := await asyncio.to_thread(next, tokens, done)) is not done:
            count += 1
            piece = decoder.piece(token)
            parts.append(piece)
            yield b"data: " + orjson.dumps({"token": token, "text": piece}) + b"\n\n"
        tail = decoder.end()
        parts.append(tail)
        final = {**head, "done": True, "text": "".join(parts), "tail": tail, "tokens": count,
                 "prompt_tokens": prompt_tokens}
        intake.metrics.answered(served.name, start)
        intake.recorder.record(served, "generate", body, 1, final["text"], start, request_id)
        yield b"event: done\ndata: " + orjson.dumps(final) + b"\n\n"
