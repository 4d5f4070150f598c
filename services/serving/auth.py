"""A bearer token on the inference endpoint: HTTP `Authorization: Bearer <token>`, gRPC metadata
`authorization` (what tritonclient's and KServe's clients send as a header).

Where the token comes from: services.platform.endpoint_token. A tenant's endpoint answers its own
token's holders only (docs/TENANTS.md). Probes stay open: health, readiness and metrics, over HTTP,
and gRPC's health service.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})
OPEN_GRPC_PREFIX = "/grpc.health.v1.Health/"
REFUSAL = b'{"detail":"this endpoint needs its bearer token (Authorization: Bearer ...)"}'


class RequireToken:
    """ASGI middleware: every request but the probes carries the token, else 401 and the app never
    sees it. A constant-time comparison of the whole header."""

    def __init__(self, app: Any, token: str):
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"authorization":
                if hmac.compare_digest(value, self.expected):
                    await self.app(scope, receive, send)
                    return
                break
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")],
            }
        )
        await send({"type": "http.response.body", "body": REFUSAL})


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """The same for gRPC: UNAUTHENTICATED without the token; the health service stays open."""

    def __init__(self, token: str):
        self.expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        if details.method.startswith(OPEN_GRPC_PREFIX):
            return await continuation(details)
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if isinstance(given, str) and hmac.compare_digest(given.encode(), self.expected):
            return await continuation(details)
        return grpc.unary_unary_rpc_method_handler(_refuse)


async def _refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "this endpoint needs its bearer token")
