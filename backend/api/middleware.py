"""The service's ASGI middleware: RequestContext (Starlette's gzip is inside it)."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid

from starlette.datastructures import Headers
from starlette.middleware.body_limit import RequestBodyLimitResponder
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend.api.deps import LEASE_SCOPE_KEY
from backend.api.errors import ErrorResponse, FaultLog
from backend.db.leases import Lease
from backend.logs import request_id
from backend.metrics import METRICS_PATH, RequestCounts

logger = logging.getLogger(__name__)

# Responses from this many bytes are gzip-compressed for clients that accept it; below, the
# header and the compressor's work cost more than they save.
GZIP_MINIMUM_BYTES = 1024

# A client's X-Request-ID is kept when it is a token a log line can carry as it is.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


class RequestContext:
    """The one middleware of the service's own, outside Starlette's gzip: each request's id, its
    database connection, its metrics, the body size limit, CORS, and the last word on errors.

    One layer rather than one per concern: every layer wraps ``send`` (and some ``receive``) again
    and costs every request a few calls; the four of them were a tenth of an append's CPU.

    - The id is the client's ``X-Request-ID`` when it is a plain token, or a new one; it goes back
      in the response's ``X-Request-ID`` and into every log line written for the request.
    - The request's ``Lease`` (``backend.db.leases``) is ended here, after the response went out.
    - With KRAKEN_METRICS on, the request is counted and timed (``metrics.RequestCounts``).
    - Bodies over ``settings.max_body_bytes`` are refused before they are parsed (``_limited``).
    - CORS headers and preflights for KRAKEN_CORS_ORIGINS (``_cors``).
    - An exception nothing else answered is logged here, once, with its traceback, and answered
      with a JSON 500 that holds the id and no internals (not re-raised: the server would log it again).

    Settings are read from the app's state per request, or at the first one: the module-level app
    exists before they are loaded.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.counts = RequestCounts()
        self.cors: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = Headers(scope=scope)
        given = headers.get("x-request-id", "")
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        token = request_id.set(rid)
        state = scope["app"].state
        settings = state.settings
        lease = scope[LEASE_SCOPE_KEY] = Lease(state.lender)
        status = 0  # none sent yet

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            if settings.cors_origins and scope["path"] != METRICS_PATH:
                await self._cors(settings.cors_origins)(scope, receive, send_with_id)
            else:
                await _limited(self.app, settings.max_body_bytes, headers)(scope, receive, send_with_id)
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
            if settings.metrics:
                # Unanswered (cancelled by the server): counted as the 500 a client would see as a failure.
                self.counts.record(scope, status or 500, time.perf_counter() - started)
            if lease.used:
                # 500, 503, 504: the request met a bug or a database fault on its connection.
                succeeded = 0 < status < 500
                await lease.end(succeeded)
                if succeeded:
                    faults: FaultLog = state.fault_log
                    faults.cleared(since=lease.lent_at)  # the database did this request's work
            request_id.reset(token)

    def _cors(self, origins: tuple[str, ...]) -> ASGIApp:
        """CORS for the browser pages that open share links (KRAKEN_CORS_ORIGINS; none set: no CORS headers).

        Only GET is allowed, without credentials: the shared view is a GET that needs no key, and a
        page in a browser should never hold the API key the writes need, so neither POST/DELETE nor
        the Authorization header is allowed cross-origin. X-Request-ID may be sent and is readable,
        so a page can quote it in a report. /metrics goes without: the scraper reads it, never a
        page in a browser. Its answers (a 413 too) carry the CORS headers.
        """
        if self.cors is None:
            self.cors = CORSMiddleware(
                self._within_limit,
                allow_origins=origins,
                allow_methods=("GET",),
                allow_headers=("X-Request-ID",),
                expose_headers=("X-Request-ID",),
                allow_credentials=False,
                max_age=600,
            )
        return self.cors

    async def _within_limit(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit: int = scope["app"].state.settings.max_body_bytes
        await _limited(self.app, limit, Headers(scope=scope))(scope, receive, send)


def _limited(app: ASGIApp, limit: int, headers: Headers) -> ASGIApp:
    """``app`` with request bodies over ``limit`` (KRAKEN_MAX_BODY_BYTES) answered 413, before they are parsed.

    A declared Content-Length over the limit is answered at once; one within it needs no counting
    (the server reads no more than it declares). A body without one (chunked) is counted by
    Starlette's limiter as it arrives, whose error FastAPI turns into an HTTPException for the
    JSON error handlers.
    """
    declared = headers.get("content-length", "")
    if not declared.isdigit():
        return RequestBodyLimitResponder(app, limit)
    if int(declared) <= limit:
        return app
    msg = f"request body is {declared} bytes; the limit is {limit} (KRAKEN_MAX_BODY_BYTES)"
    return ErrorResponse({"detail": [{"loc": ["body"], "msg": msg, "type": "body_too_large"}]}, status_code=413)
