"""Conversations, their turns and tool calls. Thin: validate, call the service, return."""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Query, Request, Response, status

from backend import metrics
from backend.api.deps import CallerDep, ConnectionDep, ConversationId, IdempotencyKey, app_settings, optional_caller
from backend.api.errors import documented
from backend.api.fast_path import FastPathRoute
from backend.api.openapi import link
from backend.conversations import service
from backend.conversations.schemas import (
    ConversationCreate,
    ConversationDetail,
    ConversationEnd,
    ConversationListQuery,
    ConversationPage,
    ConversationPublic,
    ConversationViewQuery,
    TurnCreate,
    TurnPublic,
)

router = APIRouter(prefix="/conversations", tags=["conversations"], route_class=FastPathRoute)
T = TypeVar("T")


def replayed(recorded: service.Recorded[T], response: Response) -> T:
    """What the write stored; marked when an earlier attempt with the same Idempotency-Key stored it."""
    if recorded.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return recorded.value


# Where a client (or a fuzzer) goes next with the ids an answer holds.
_BY_ID = {"conversation_id": "$response.body#/id"}
_BY_PATH_ID = {"conversation_id": "$request.path.conversation_id"}
_CONVERSATION_LINKS = {
    "links": {
        "GetConversation": link("get_conversation", **_BY_ID),
        "AppendTurn": link("append_turn", **_BY_ID),
        "EndConversation": link("end_conversation", **_BY_ID),
        "DeleteConversation": link("delete_conversation", **_BY_ID),
        "ListConversations": link("list_conversations", session_id="$response.body#/session_id"),
    }
}
_TURN_LINKS = {
    "links": {
        "GetConversation": link("get_conversation", **_BY_PATH_ID),
        "AppendTurn": link("append_turn", **_BY_PATH_ID),
        "EndConversation": link("end_conversation", **_BY_PATH_ID),
        "PutFeedback": link("put_feedback", **_BY_PATH_ID, turn_number="$response.body#/turn_number"),
    }
}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={**documented(400, 401, 409, 413, 422), 201: _CONVERSATION_LINKS},
)
async def create_conversation(
    body: ConversationCreate,
    caller: CallerDep,
    conn: ConnectionDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> ConversationPublic:
    """Start a conversation: status active, totals zero. Created with a user's key, it is that user's."""
    recorded = await service.create_conversation(conn, body, idempotency_key=idempotency_key, caller=caller)
    return replayed(recorded, response)


@router.post(
    "/{conversation_id}/turns",
    status_code=status.HTTP_201_CREATED,
    responses={**documented(400, 401, 404, 409, 413, 422), 201: _TURN_LINKS},
)
async def append_turn(
    conversation_id: ConversationId,
    body: TurnCreate,
    caller: CallerDep,
    conn: ConnectionDep,
    request: Request,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> TurnPublic:
    """Record one turn and its tool calls, in order, and add it to the conversation's totals.

    The server numbers the turn (next in the conversation, also under concurrent appends) and
    its tool calls (1, 2, ...). Turn, tool calls and totals are stored together or not at all.
    A tool result over KRAKEN_TOOL_RESULT_MAX_BYTES of compact JSON is stored truncated.
    Counts are JSON integers written without a fraction or an exponent (5, not 5.0 or 5e0).
    409 when the conversation has ended (`conversation_ended`), a total would overflow its column
    (`totals_full`: total_tokens up to 2147483647, total_cost_usd up to 9999.999999), or the
    database refused the turn (`turn_rejected`).
    """
    settings = app_settings(request)
    recorded = await service.append_turn(
        conn,
        conversation_id,
        body,
        tool_result_max_bytes=settings.tool_result_max_bytes,
        idempotency_key=idempotency_key,
        caller=caller,
    )
    if settings.metrics and not recorded.replayed:
        metrics.record_append(recorded.value)
    return replayed(recorded, response)


@router.post(
    "/{conversation_id}/end",
    responses=documented(400, 401, 404, 409, 413, 422),
)
async def end_conversation(
    conversation_id: ConversationId, body: ConversationEnd, caller: CallerDep, conn: ConnectionDep
) -> ConversationPublic:
    """Set the final status and ended_at. 409 if it has already ended (`conversation_ended`)."""
    return await service.end_conversation(conn, conversation_id, body.status, caller=caller)


# The shared view needs no key; a bearer key, when sent, is checked and scopes it (optional_caller).
_OPTIONAL_KEY: dict[str, Any] = {"security": [{}, {"HTTPBearer": []}]}


@router.get(
    "/{conversation_id}",
    response_model=ConversationDetail,
    responses=documented(401, 404, 422),
    openapi_extra=_OPTIONAL_KEY,
)
async def get_conversation(
    conversation_id: ConversationId,
    query: Annotated[ConversationViewQuery, Query()],
    conn: ConnectionDep,
    request: Request,
) -> Response:
    """The shared view: the conversation with its turns and their tool calls, in order. No key needed.

    With a user's key (`Authorization: Bearer kraken_...`) only that user's conversations: another's id
    answers 404, as an unknown one. The operator's key, or none, reads any.

    Turns come in pages: `limit` turns numbered after `after_turn`; `next_after_turn` says where the
    next page starts (null on the last). Other query parameters are refused (422).
    """
    document = await service.shared_view_json(
        conn, conversation_id, after_turn=query.after_turn, limit=query.limit, caller=optional_caller(request)
    )
    return Response(document, media_type="application/json")


@router.get("", responses=documented(401, 422))
async def list_conversations(
    query: Annotated[ConversationListQuery, Query()], caller: CallerDep, conn: ConnectionDep
) -> ConversationPage:
    """A session's conversations, newest first, `limit` per page. Other query parameters are refused (422).

    With a user's key, that user's conversations of the session only.
    """
    return await service.list_conversations(
        conn, query.session_id, limit=query.limit, cursor=query.cursor, caller=caller
    )


@router.delete(
    "/{conversation_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=documented(401, 404),
)
async def delete_conversation(conversation_id: ConversationId, caller: CallerDep, conn: ConnectionDep) -> None:
    """Remove the conversation with its turns and tool calls."""
    await service.delete_conversation(conn, conversation_id, caller=caller)
