"""Liveness and readiness."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from backend.config import Settings
from backend.database import SchemaStatus, read_revisions

router = APIRouter(tags=["health"])


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    """Liveness: the process serves requests. Reports the schema revision found at boot."""
    status: SchemaStatus = request.app.state.schema_status
    return {"status": "ok", "revision": status.revision}


@router.get("/ready", responses={503: {"description": "Database unreachable or schema not at head"}})
async def ready(request: Request) -> JSONResponse:
    """Readiness: the database answers and its schema is at this code's head (checked live)."""
    engine: AsyncEngine = request.app.state.engine
    settings: Settings = request.app.state.settings
    revisions = read_revisions()
    heads = sorted(revisions.heads)
    try:
        async with engine.connect() as conn:
            # A database that was never migrated has no version table at all.
            migrated = (await conn.execute(text("SELECT to_regclass('alembic_version') IS NOT NULL"))).scalar_one()
            query = text("SELECT version_num FROM alembic_version")
            rows = (await conn.execute(query)).scalars().all() if migrated else []
    except (OSError, DBAPIError):
        return JSONResponse({"status": "unavailable", "reason": "database unreachable", "head": heads}, 503)
    status = SchemaStatus(tuple(rows), revisions)
    body: dict[str, Any] = {"revision": status.revision, "head": heads}
    if status.at_head or (status.ahead and settings.schema_ahead == "serve"):
        return JSONResponse({"status": "ready", **body})
    reason = "schema is ahead of this code" if status.ahead else "schema is not at head"
    return JSONResponse({"status": "unavailable", "reason": reason, **body}, 503)
