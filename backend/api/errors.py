"""One shape for every client error: ``{"detail": [{"loc": [...], "msg": "...", "type": "..."}]}``.

That is FastAPI's validation error shape, so ``loc`` names the field (``["body", "tool_calls", 0,
"tool_name"]``, ``["path", "conversation_id"]``, ``["header", "Authorization"]``). The handlers
here give HTTP and domain errors the same shape, and drop the ``input`` FastAPI echoes back (it
can be megabytes, or a NaN that JSON cannot carry).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from backend.conversations.errors import (
    ConversationEnded,
    ConversationError,
    ConversationNotFound,
    InvalidCursor,
    TotalsFull,
    TurnRejected,
)


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
}

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


async def _domain_error(request: Request, exc: Exception) -> ErrorResponse:
    assert isinstance(exc, ConversationError)
    status_code, loc, type_ = DOMAIN_ERRORS[type(exc)]
    return ErrorResponse({"detail": [{"loc": list(loc), "msg": str(exc), "type": type_}]}, status_code=status_code)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ConversationError, _domain_error)


def documented(*status_codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for the error statuses a route can return."""
    return {code: {"model": ErrorBody} for code in status_codes}
