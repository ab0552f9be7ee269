"""One shape for every client error: ``{"detail": [{"loc": [...], "msg": "...", "type": "..."}]}``.

That is FastAPI's validation error shape, so ``loc`` names the field (``["body", "tool_calls", 0,
"tool_name"]``, ``["path", "conversation_id"]``, ``["header", "Authorization"]``). The handlers
here give HTTP and domain errors the same shape, and drop the ``input`` FastAPI echoes back (it
can be megabytes, or a NaN that JSON cannot carry).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import asyncpg
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from backend import metrics
from backend.conversations.errors import (
    ConversationEnded,
    ConversationError,
    ConversationNotFound,
    IdempotencyKeyReused,
    InvalidCursor,
    InvalidKey,
    OperatorOnly,
    TotalsFull,
    TurnRejected,
)
from backend.db.errors import ConnectionLost, Fault, StatementTimeout, first_line, request_fault
from backend.db.pool import PoolBusy
from backend.feedback.errors import ExportOperatorOnly, FeedbackNotFound, TurnNotFound
from backend.users.errors import UserDeactivated, UserNotFound

logger = logging.getLogger(__name__)


class ErrorItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorBody(BaseModel):
    detail: list[ErrorItem]


class ErrorResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        # ASCII-escaped: a message can quote a client's key holding an unpaired surrogate, which
        # UTF-8 cannot encode; escaped, it is still valid JSON.
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


def api_error(
    status_code: int, loc: Sequence[str | int], msg: str, type_: str, headers: dict[str, str] | None = None
) -> HTTPException:
    return HTTPException(status_code, detail=[{"loc": list(loc), "msg": msg, "type": type_}], headers=headers)


# Domain error -> (status, where, type).
DOMAIN_ERRORS: dict[type[ConversationError], tuple[int, tuple[str, ...], str]] = {
    ConversationNotFound: (404, ("path", "conversation_id"), "not_found"),
    ConversationEnded: (409, ("path", "conversation_id"), "conversation_ended"),
    TotalsFull: (409, ("body",), "totals_full"),
    TurnRejected: (409, ("body",), "turn_rejected"),
    InvalidCursor: (422, ("query", "cursor"), "invalid_cursor"),
    # 409, not the IETF draft's 422: the request itself is valid; the key is taken, by another one.
    IdempotencyKeyReused: (409, ("header", "Idempotency-Key"), "idempotency_key_reused"),
    # A user's key the statement found no active user for: as the dependencies' own 401.
    InvalidKey: (401, ("header", "Authorization"), "unauthorized"),
    OperatorOnly: (403, ("query", "group_by"), "forbidden"),
    UserNotFound: (404, ("path", "user_id"), "not_found"),
    TurnNotFound: (404, ("path", "turn_number"), "not_found"),
    FeedbackNotFound: (404, ("path", "turn_number"), "not_found"),
    # As OperatorOnly: the key is a user's, checked; what it asks is the operator's.
    ExportOperatorOnly: (403, ("header", "Authorization"), "forbidden"),
    UserDeactivated: (409, ("path", "user_id"), "user_deactivated"),
}
_DOMAIN_HEADERS = {401: {"WWW-Authenticate": "Bearer"}}

# Where an HTTP error raised by the framework (not by us) is about.
_FRAMEWORK_LOC: dict[int, list[str | int]] = {400: ["body"], 413: ["body"]}
_FRAMEWORK_TYPE = {413: "body_too_large"}


async def _validation_error(request: Request, exc: Exception) -> ErrorResponse:
    assert isinstance(exc, RequestValidationError)
    items = [{"loc": [_short(part) for part in e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
    return ErrorResponse({"detail": items}, status_code=422)


def _short(part: str | int) -> str | int:
    # An unknown field's name is the client's, and can be as long as the body allows.
    return part[:200] + "..." if isinstance(part, str) and len(part) > 200 else part


async def _http_error(request: Request, exc: Exception) -> ErrorResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail: Any = exc.detail
    if not isinstance(detail, list):
        # Starlette's and FastAPI's own: 404 unknown path, 405, 413 body too large, 400 unparsable body.
        loc = _FRAMEWORK_LOC.get(exc.status_code, [])
        type_ = _FRAMEWORK_TYPE.get(exc.status_code, f"http_{exc.status_code}")
        detail = [{"loc": loc, "msg": str(detail), "type": type_}]
    return ErrorResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)


async def _method_not_allowed(request: Request, exc: Exception) -> ErrorResponse:
    """405 with every method the path serves in ``Allow``.

    FastAPI makes a route per method, and Starlette's 405 names only the methods of the first
    route whose path matched (``OPTIONS /conversations`` said ``POST``, not ``GET, POST``).
    """
    assert isinstance(exc, StarletteHTTPException)
    allowed = sorted(
        method
        for route in iter_route_contexts(request.app.routes)
        if route.matches(request.scope)[0] == Match.PARTIAL
        for method in route.methods or ()
    )
    answer = StarletteHTTPException(405, exc.detail, headers={"Allow": ", ".join(allowed)})
    return await _http_error(request, answer)


async def _domain_error(request: Request, exc: Exception) -> ErrorResponse:
    assert isinstance(exc, ConversationError)
    status_code, loc, type_ = DOMAIN_ERRORS[type(exc)]
    return ErrorResponse(
        {"detail": [{"loc": list(loc), "msg": str(exc), "type": type_}]},
        status_code=status_code,
        headers=_DOMAIN_HEADERS.get(status_code),
    )


# Database fault -> (status, seconds for Retry-After, type, message). A write that met one may
# still have been committed just before the connection went: retry it with its Idempotency-Key.
DATABASE_FAULTS: dict[Fault, tuple[int, int, str, str]] = {
    "unavailable": (503, 2, "database_unavailable", "the database is unavailable; retry later"),
    "busy": (503, 1, "database_busy", "no database connection was free in time; retry later"),
    "timeout": (504, 1, "database_timeout", "the database did not answer in time (KRAKEN_DB_STATEMENT_TIMEOUT)"),
    "conflict": (503, 1, "database_conflict", "the database aborted this request to resolve a conflict; retry it"),
    "pooler": (503, 30, "database_misconfigured", "the service cannot use its database as configured; retry later"),
}
DATABASE_ERRORS = (
    StatementTimeout,
    ConnectionLost,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    PoolBusy,
    OSError,
)


class FaultLog:
    """Database trouble, told once when it starts and once when it clears, never per request.

    Trouble is the database being unavailable, out of connections or too slow; a conflict
    (deadlock, serialization failure) is one request's bad luck and gets an INFO line. A statement
    cache behind a transaction pooler is a misconfiguration, told once as an ERROR.
    """

    def __init__(self) -> None:
        self.where = "the database"  # the lifespan names the server (user@host:port/database)
        self.trouble_since: float | None = None
        self.answered = 0
        self.told_about_the_pooler = False

    def record(self, fault: Fault, exc: BaseException) -> None:
        if fault == "pooler":
            if not self.told_about_the_pooler:
                self.told_about_the_pooler = True
                logger.error(
                    "prepared statements fail: DATABASE_URL goes through a transaction-pooling proxy (PgBouncer?); "
                    "set KRAKEN_DB_STATEMENT_CACHE=false"
                )
            return
        if fault == "conflict":
            logger.info("the database aborted a request to resolve a conflict: %s; answered 503", first_line(exc))
            return
        if self.trouble_since is None:
            self.trouble_since, self.answered = time.monotonic(), 0
            logger.warning(
                "database trouble (%s): %s at %s; answering 503/504 until a request gets through",
                fault,
                first_line(exc),
                self.where,
            )
        self.answered += 1

    def cleared(self, since: float) -> None:
        """A request got its work done on a connection it had from ``since`` (time.monotonic()):
        trouble that started before that, if any, is over. (A request that had its connection
        earlier may have finished its work before the trouble began.)"""
        if self.trouble_since is None or since < self.trouble_since:
            return
        lasted, self.trouble_since = time.monotonic() - self.trouble_since, None
        logger.warning(
            "database trouble over after %.1f s; %d request(s) were answered 503/504 meanwhile", lasted, self.answered
        )


async def _database_error(request: Request, exc: Exception) -> ErrorResponse:
    fault = request_fault(exc)
    if fault is None:
        raise exc  # not an expected fault: the server error handler answers it
    faults: FaultLog = request.app.state.fault_log
    faults.record(fault, exc)
    if request.app.state.settings.metrics:
        metrics.record_database_error(fault)
    status_code, retry_after, type_, msg = DATABASE_FAULTS[fault]
    return ErrorResponse(
        {"detail": [{"loc": [], "msg": msg, "type": type_}]},
        status_code=status_code,
        headers={"Retry-After": str(retry_after)},
    )


def install_error_handlers(app: FastAPI) -> None:
    app.state.fault_log = FaultLog()
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(405, _method_not_allowed)
    app.add_exception_handler(ConversationError, _domain_error)
    for error in DATABASE_ERRORS:
        app.add_exception_handler(error, _database_error)


# --- the OpenAPI document's error responses --------------------------------------------------

RETRY_AFTER = {
    "description": "Seconds to wait before retrying.",
    "required": True,
    "schema": {"type": "integer", "minimum": 0},
}
# What each error status means to a client, for the OpenAPI document; a route's docstring adds
# what is particular to it.
_STATUS_DOCS: dict[int, str] = {
    400: "The body cannot be decoded: invalid UTF-8, nesting deeper than the parser allows, an integer of "
    'over 4300 digits (`loc` `["body"]`).',
    401: "The API key is missing or wrong, or a user's key was rotated or its user deactivated "
    '(`loc` `["header", "Authorization"]`).',
    403: "The key may not ask this: `group_by=user` takes the operator's key "
    '(`loc` `["query", "group_by"]`, type `forbidden`).',
    404: 'No conversation with this id, also for an id that is not a UUID (`loc` `["path", "conversation_id"]`).',
    409: "The conversation's state refuses the request.",
    413: 'The body is over KRAKEN_MAX_BODY_BYTES (`loc` `["body"]`, type `body_too_large`).',
    422: "Malformed JSON (`json_invalid`), or a field that fails validation: `loc` names it, `type` says why.",
    500: "An unexpected error: `msg` `internal error (request <id>)`, type `internal_error`; the log has the rest.",
}


def _database_doc(status_code: int) -> str:
    types = ", ".join(f"`{type_}`" for code, _, type_, _ in DATABASE_FAULTS.values() if code == status_code)
    return (
        f"The database could not serve the request (type {types}). Retry after Retry-After seconds; "
        "a write with its Idempotency-Key, which makes the retry safe."
    )


def documented(*status_codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for the error statuses a route can answer: the shape, what each means, its headers."""
    database = {code for code, _, _, _ in DATABASE_FAULTS.values()}
    responses: dict[int | str, dict[str, Any]] = {}
    for code in status_codes:
        response: dict[str, Any] = {"model": ErrorBody}
        if code in database:
            response |= {"description": _database_doc(code), "headers": {"Retry-After": RETRY_AFTER}}
        else:
            response["description"] = _STATUS_DOCS[code]
        if code == 401:
            response["headers"] = {
                "WWW-Authenticate": {"required": True, "schema": {"type": "string", "enum": ["Bearer"]}}
            }
        responses[code] = response
    return responses
