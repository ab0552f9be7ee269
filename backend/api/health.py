"""Liveness and readiness."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from backend.config import Settings
from backend.db.errors import sqlstate
from backend.migrations.revisions import SchemaStatus, read_revisions

router = APIRouter(tags=["health"])
UNDEFINED_TABLE = "42P01"


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    """Liveness: the process serves requests. Reports the schema revision found at boot."""
    status: SchemaStatus = request.app.state.schema_status
    return {"status": "ok", "revision": status.revision}


@router.get("/ready", responses={503: {"description": "Database unreachable or schema not at head"}})
async def ready(request: Request) -> JSONResponse:
    """Readiness: the database answers and its schema is at this code's head (checked live, one query)."""
    engine: AsyncEngine = request.app.state.engine
    settings: Settings = request.app.state.settings
    revisions = read_revisions()
    heads = sorted(revisions.heads)
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalars().all()
    except DBAPIError as exc:
        if sqlstate(exc) != UNDEFINED_TABLE:
            return _unreachable(heads)
        rows = []  # never migrated: the database answers, but has no version table yet
    except OSError:
        return _unreachable(heads)
    status = SchemaStatus(tuple(rows), revisions)
    body: dict[str, Any] = {"revision": status.revision, "head": heads}
    if status.at_head or (status.ahead and settings.schema_ahead == "serve"):
        return JSONResponse({"status": "ready", **body})
    reason = "schema is ahead of this code" if status.ahead else "schema is not at head"
    return JSONResponse({"status": "unavailable", "reason": reason, **body}, 503)


def _unreachable(heads: list[str]) -> JSONResponse:
    return JSONResponse({"status": "unavailable", "reason": "database unreachable", "head": heads}, 503)
