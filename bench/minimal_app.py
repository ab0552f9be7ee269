"""The yardsticks of bench/http_load.py: two minimal FastAPI + asyncpg pool apps over the same database.

    DATABASE_URL=postgresql://... BENCH_POOL_SIZE=8 \
        uv run uvicorn minimal_app:app --app-dir bench --workers 2 --loop uvloop --http httptools
    (minimal_app:plain for the second)

They do the database work of kraken-backend's endpoints with nothing around it: the append runs
the service's own APPEND statement object with the same parameters (so PostgreSQL does exactly
the same work), the shared view the service's SHARED_VIEW query, and /health answers a constant.
No API key check, no session, no error mapping, no middleware: what the stack itself costs, for
the same statement.

- ``app``: the append's body is a pydantic model FastAPI parses (types only, none of the
  service's rules), its answer a dict FastAPI serialises;
- ``plain``: the body is read with ``json.loads`` and its fields taken as they come, the answer
  written with ``json.dumps``: no model at all, the least a FastAPI app can do for that statement.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

import asyncpg
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from backend.conversations.schemas import DEFAULT_VIEW_TURNS, dumps
from backend.conversations.service import APPEND, SHARED_VIEW


class ToolCallIn(BaseModel):
    tool_name: str
    tool_args: Any
    tool_result: Any


class TurnIn(BaseModel):
    user_query: str
    assistant_response: str
    model: str
    input_tokens: int
    output_tokens: int
    cache_creation_tokens: int = 0
    cache_read_tokens: int = 0
    cost_usd: Decimal
    duration_ms: int
    tool_calls: list[ToolCallIn] = []


_pool: list[asyncpg.Pool] = []  # this process's: it serves one of the two apps


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    size = int(os.environ.get("BENCH_POOL_SIZE", "10"))
    # A fixed-size pool, as kraken-backend's is run by the benchmark (pool size, no overflow).
    _pool[:] = [await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=size, max_size=size)]
    try:
        yield
    finally:
        await _pool[0].close()


app = FastAPI(lifespan=lifespan)


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/conversations/{conversation_id}/turns", status_code=201)
async def append_turn(conversation_id: uuid.UUID, body: TurnIn) -> Any:
    fields = body.model_dump(exclude={"tool_calls"})
    tool_args = [dumps(call.tool_args) for call in body.tool_calls]
    tool_results = [dumps(call.tool_result) for call in body.tool_calls]
    params = dict(
        fields,
        conversation_id=conversation_id,
        idempotency_key=None,
        idempotency_fingerprint=None,
        tokens=body.input_tokens + body.output_tokens,
        tool_calls_count=len(body.tool_calls),
        tool_names=[call.tool_name for call in body.tool_calls],
        tool_args=tool_args,
        tool_results=tool_results,
        # The benchmark's results (~400 bytes) are far under KRAKEN_TOOL_RESULT_MAX_BYTES: the service
        # stores them whole too, so the rows written are the same.
        results_truncated=[False] * len(body.tool_calls),
    )
    async with _pool[0].acquire() as conn:
        row = await conn.fetchrow(APPEND.sql, *APPEND.args(params))
    if row is None:
        return JSONResponse({"detail": "conversation not found or ended"}, status_code=404)
    # The same content as kraken-backend's answer, so both send about as many bytes.
    return {
        "id": row["id"],
        "conversation_id": conversation_id,
        "turn_number": row["turn_number"],
        "tool_calls_count": len(body.tool_calls),
        "created_at": row["created_at"],
        **fields,
        "tool_calls": [
            {"id": call_id, "sequence_order": position, **call.model_dump(), "result_truncated": False}
            for position, (call_id, call) in enumerate(zip(row["tool_call_ids"], body.tool_calls, strict=True), 1)
        ],
    }


@app.get("/conversations/{conversation_id}")
async def shared_view(conversation_id: uuid.UUID) -> Response:
    async with _pool[0].acquire() as conn:
        # The service's first page (no query parameters): the same statement with the same values.
        params = {"id": conversation_id, "after_turn": 0, "limit": DEFAULT_VIEW_TURNS}
        row = await conn.fetchrow(SHARED_VIEW.sql, *SHARED_VIEW.args(params))
    if row is None:
        return JSONResponse({"detail": "not found"}, status_code=404)
    return Response(row[0], media_type="application/json")


# --- plain: no model, the body as json.loads reads it -----------------------------------------------

plain = FastAPI(lifespan=lifespan)
plain.add_api_route("/health", health)
plain.add_api_route("/conversations/{conversation_id}", shared_view)
_FIELDS = {
    "user_query": None,
    "assistant_response": None,
    "model": None,
    "input_tokens": None,
    "output_tokens": None,
    "cache_creation_tokens": 0,
    "cache_read_tokens": 0,
    "cost_usd": None,
    "duration_ms": None,
}


@plain.post("/conversations/{conversation_id}/turns", status_code=201)
async def append_turn_plain(conversation_id: uuid.UUID, request: Request) -> Response:
    body = json.loads(await request.body())
    fields = {name: body.get(name, default) for name, default in _FIELDS.items()}
    fields["cost_usd"] = Decimal(str(fields["cost_usd"]))  # NUMERIC's parameter
    calls = body.get("tool_calls", [])
    params = dict(
        fields,
        conversation_id=conversation_id,
        idempotency_key=None,
        idempotency_fingerprint=None,
        tokens=fields["input_tokens"] + fields["output_tokens"],
        tool_calls_count=len(calls),
        tool_names=[call["tool_name"] for call in calls],
        tool_args=[dumps(call["tool_args"]) for call in calls],
        tool_results=[dumps(call["tool_result"]) for call in calls],
        results_truncated=[False] * len(calls),
    )
    async with _pool[0].acquire() as conn:
        row = await conn.fetchrow(APPEND.sql, *APPEND.args(params))
    if row is None:
        return JSONResponse({"detail": "conversation not found or ended"}, status_code=404)
    answer = {
        "id": str(row["id"]),
        "conversation_id": str(conversation_id),
        "turn_number": row["turn_number"],
        "tool_calls_count": len(calls),
        "created_at": row["created_at"].isoformat(),
        **fields,
        "cost_usd": str(fields["cost_usd"]),
        "tool_calls": [
            {"id": str(call_id), "sequence_order": position, **call, "result_truncated": False}
            for position, (call_id, call) in enumerate(zip(row["tool_call_ids"], calls, strict=True), 1)
        ],
    }
    return Response(dumps(answer), status_code=201, media_type="application/json")
