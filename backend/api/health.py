"""Liveness and readiness."""

from __future__ import annotations

from typing import Any, Literal

import asyncpg
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from backend.api.deps import get_connection
from backend.api.errors import RETRY_AFTER, ErrorBody
from backend.config import Settings
from backend.migrations.revisions import SchemaStatus, read_revisions
from backend.migrations.runner import schema_status_on

router = APIRouter(tags=["health"])

_REVISION = "The database's schema revision (several are joined by commas); null if it was never migrated."


class Health(BaseModel):
    status: Literal["ok"]
    revision: str | None = Field(description=f"{_REVISION} Read at boot.")


class Ready(BaseModel):
    status: Literal["ready"]
    revision: str | None = Field(description=_REVISION)
    head: list[str] = Field(description="This code's head revision(s).")


class NotReady(BaseModel):
    status: Literal["unavailable"]
    reason: Literal["database unreachable", "schema is not at head", "schema is ahead of this code", "shutting down"]
    revision: str | None = Field(None, description=f"{_REVISION} Absent when the database is unreachable.")
    head: list[str] = Field(description="This code's head revision(s).")


@router.get("/health")
async def health(request: Request) -> Health:
    """Liveness: the process serves requests. Reports the schema revision found at boot."""
    status: SchemaStatus = request.app.state.schema_status
    return Health(status="ok", revision=status.revision)


@router.get(
    "/ready",
    response_model=Ready,
    responses={
        503: {
            # ErrorBody: no pooled connection was free in time (type database_busy).
            "model": NotReady | ErrorBody,
            "description": "The process is shutting down (SIGTERM), the database is unreachable, or its schema "
            "is not at this code's head (or is ahead of it with KRAKEN_SCHEMA_AHEAD=refuse); or no pooled "
            "connection was free in time "
            "(the API's error shape, type `database_busy`, with Retry-After).",
            "headers": {"Retry-After": {**RETRY_AFTER, "required": False}},
        }
    },
)
async def ready(request: Request) -> JSONResponse:
    """Readiness: the database answers and its schema serves this code (checked live, one query): at
    its head, or with only post-deploy revisions pending."""
    settings: Settings = request.app.state.settings
    heads = sorted(read_revisions().heads)
    if request.app.state.draining:  # SIGTERM: send new work elsewhere while requests in flight finish
        return JSONResponse({"status": "unavailable", "reason": "shutting down", "head": heads}, 503)
    try:
        # A connection from the pool, as requests get theirs: none free in time is 503 database_busy.
        status = await schema_status_on(await get_connection(request))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError):
        return _unreachable(heads)  # connecting failed, or the connection did
    body: dict[str, Any] = {"revision": status.revision, "head": heads}
    if status.serves_code or (status.ahead and settings.schema_ahead == "serve"):
        return JSONResponse({"status": "ready", **body})
    reason = "schema is ahead of this code" if status.ahead else "schema is not at head"
    return JSONResponse({"status": "unavailable", "reason": reason, **body}, 503)


def _unreachable(heads: list[str]) -> JSONResponse:
    return JSONResponse({"status": "unavailable", "reason": "database unreachable", "head": heads}, 503)
