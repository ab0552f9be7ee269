"""ASGI middleware of the service."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid

from starlette.datastructures import Headers
from starlette.middleware.body_limit import RequestBodyLimitResponder
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend.api.deps import LEASE_SCOPE_KEY
from backend.api.errors import ErrorResponse, FaultLog
from backend.db.leases import Lease
from backend.logs import request_id
from backend.metrics import METRICS_PATH

logger = logging.getLogger(__name__)

# Responses from this many bytes are gzip-compressed for clients that accept it; below, the
# header and the compressor's work cost more than they save.
GZIP_MINIMUM_BYTES = 1024

# A client's X-Request-ID is kept when it is a token a log line can carry as it is.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


class RequestContext:
    """The outermost layer of the app: each request's id, its database connection, and the last word on errors.

    The id is the client's ``X-Request-ID`` when it is a plain token, or a new one; it goes back
    in the response's ``X-Request-ID`` and into every log line written for the request. An
    exception nothing else answered is logged here, once, with its traceback, and answered with
    a JSON 500 that holds the id and no internals (not re-raised: the server would log it again).
    The request's ``Lease`` (``backend.db.leases``) is ended here, after the response went out.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("x-request-id", "")
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        token = request_id.set(rid)
        state = scope["app"].state
        lease = scope[LEASE_SCOPE_KEY] = Lease(state.lender)
        status = 0  # none sent yet

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            if status or not state.draining:
                raise
            # Shutting down, past KRAKEN_SHUTDOWN_GRACE: the server cancelled the request, and the
            # statement it was running is cancelled on the database (the lease waits for that).
            # One that completed just before may have been stored: the client retries with its
            # Idempotency-Key, against a process that is not going away.
            logger.warning("cut off at shutdown: %s %s", scope.get("method"), scope.get("path"))
            msg = "the service is shutting down; retry (a write with its Idempotency-Key)"
            detail = [{"loc": [], "msg": msg, "type": "shutting_down"}]
            answer = ErrorResponse({"detail": detail}, status_code=503, headers={"Retry-After": "1"})
            await answer(scope, receive, send_with_id)
        except Exception:
            logger.exception("unexpected error answering %s %s", scope.get("method"), scope.get("path"))
            if not status:
                detail = [{"loc": [], "msg": f"internal error (request {rid})", "type": "internal_error"}]
                await ErrorResponse({"detail": detail}, status_code=500)(scope, receive, send_with_id)
        finally:
            if lease.used:
                # 500, 503, 504: the request met a bug or a database fault on its connection.
                succeeded = 0 < status < 500
                await lease.end(succeeded)
                if succeeded:
                    faults: FaultLog = state.fault_log
                    faults.cleared(since=lease.lent_at)  # the database did this request's work
            request_id.reset(token)


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


class Cors:
    """CORS for the browser pages that open share links (KRAKEN_CORS_ORIGINS); none set: no CORS headers.

    Only GET is allowed, without credentials: the shared view is a GET that needs no key, and a
    page in a browser should never hold the API key the writes need, so neither POST/DELETE nor
    the Authorization header is allowed cross-origin. X-Request-ID may be sent and is readable,
    so a page can quote it in a report. The origins are read from the app's settings at the
    first request, as BodySizeLimit reads its limit: the module-level app exists before them.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.inner: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == METRICS_PATH:
            # /metrics needs no key: the scraper reads it, never a page in a browser.
            await self.app(scope, receive, send)
            return
        if self.inner is None:
            origins: tuple[str, ...] = scope["app"].state.settings.cors_origins
            self.inner = self.app
            if origins:
                self.inner = CORSMiddleware(
                    self.app,
                    allow_origins=origins,
                    allow_methods=("GET",),
                    allow_headers=("X-Request-ID",),
                    expose_headers=("X-Request-ID",),
                    allow_credentials=False,
                    max_age=600,
                )
        await self.inner(scope, receive, send)
