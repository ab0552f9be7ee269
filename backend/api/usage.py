"""Usage reports: turns, tokens and cost summed."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from backend.api.deps import ConnectionDep, RequireApiKey
from backend.api.errors import documented
from backend.conversations import service
from backend.conversations.schemas import UsageQuery, UsageReport

router = APIRouter(tags=["usage"])


@router.get("/usage", dependencies=RequireApiKey, responses=documented(401, 422))
async def get_usage(query: Annotated[UsageQuery, Query()], conn: ConnectionDep) -> UsageReport:
    """Turns created in [from, to), summed per model or per UTC day (groups in key order).

    An interval whose end is at or before its start holds no turns: no groups. Other query
    parameters are refused (422).
    """
    return await service.usage(conn, query.start, query.end, query.group_by)
