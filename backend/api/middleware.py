"""ASGI middleware of the service."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.middleware.body_limit import RequestBodyLimitResponder
from starlette.types import ASGIApp, Receive, Scope, Send

from backend.api.errors import ErrorResponse


class BodySizeLimit:
    """413 for request bodies over ``settings.max_body_bytes``, before they are parsed.

    The limit is read per request: the module-level app exists before the settings are loaded,
    so ``FastAPI(max_body_size=...)`` cannot take it. A declared Content-Length over the limit
    is answered at once; a body without one (chunked) is counted by Starlette's limiter as it
    arrives, whose error FastAPI turns into an HTTPException for the JSON error handlers.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit: int = scope["app"].state.settings.max_body_bytes
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            msg = f"request body is {declared} bytes; the limit is {limit} (KRAKEN_MAX_BODY_BYTES)"
            detail = [{"loc": ["body"], "msg": msg, "type": "body_too_large"}]
            await ErrorResponse({"detail": detail}, status_code=413)(scope, receive, send)
            return
        await RequestBodyLimitResponder(self.app, limit)(scope, receive, send)
