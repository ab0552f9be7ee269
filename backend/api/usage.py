"""Usage reports: turns, tokens and cost summed."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from backend.api.deps import CallerDep, ConnectionDep
from backend.api.errors import documented
from backend.conversations import service
from backend.conversations.schemas import UsageQuery, UsageReport

router = APIRouter(tags=["usage"])


@router.get("/usage", responses=documented(401, 403, 422))
async def get_usage(query: Annotated[UsageQuery, Query()], caller: CallerDep, conn: ConnectionDep) -> UsageReport:
    """Turns created in [from, to), summed per model, per UTC day or per user (groups in key order).

    An interval whose end is at or before its start holds no turns: no groups. Other query
    parameters are refused (422). With a user's key, the turns of that user's conversations only;
    `group_by=user` takes the operator's key (403 with a user's): one group per user, keyed by the
    user's id, and `shared` for the conversations the operator's key created.
    """
    return await service.usage(conn, query.start, query.end, query.group_by, caller=caller)
