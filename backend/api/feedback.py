"""Feedback on turns: give, replace and remove a turn's, and the operator's export. Thin: validate,
call the service, return."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response, status

from backend.api.deps import CallerDep, ConnectionDep, ConversationId
from backend.api.errors import documented
from backend.api.openapi import link
from backend.conversations.schemas import MAX_TOTAL_TURNS, FeedbackPublic
from backend.feedback import service
from backend.feedback.schemas import FeedbackExportQuery, FeedbackPage, FeedbackPut

router = APIRouter(tags=["feedback"])

TurnNumber = Annotated[
    int,
    Path(
        ge=1,
        le=MAX_TOTAL_TURNS,
        description="The turn's number in the conversation (`turn_number` of the append's answer; 1 for the first).",
    ),
]
_PATH = "/conversations/{conversation_id}/turns/{turn_number}/feedback"


def _about_feedback(*status_codes: int) -> dict[int | str, dict[str, Any]]:
    """``documented`` with the 404 of a turn's feedback and the export's 403."""
    responses = documented(*status_codes)
    if 404 in responses:
        responses[404] = responses[404] | {
            "description": "No conversation with this id, also for an id that is not a UUID and another user's "
            '(`loc` `["path", "conversation_id"]`); no turn with this number in it, or (DELETE) no feedback '
            'on the turn (`loc` `["path", "turn_number"]`).'
        }
    if 403 in responses:
        responses[403] = responses[403] | {
            "description": "A user's key: the export takes the operator's key "
            '(`loc` `["header", "Authorization"]`, type `forbidden`).'
        }
    return responses


_BY_PATH = {"conversation_id": "$request.path.conversation_id", "turn_number": "$request.path.turn_number"}
_FEEDBACK_LINKS = {"links": {"DeleteFeedback": link("delete_feedback", **_BY_PATH)}}


@router.put(
    _PATH,
    responses={
        **_about_feedback(400, 401, 404, 413, 422),
        200: {"description": "The turn's earlier feedback, replaced.", **_FEEDBACK_LINKS},
        201: {"model": FeedbackPublic, "description": "The turn's first feedback.", **_FEEDBACK_LINKS},
    },
)
async def put_feedback(
    conversation_id: ConversationId,
    turn_number: TurnNumber,
    body: FeedbackPut,
    caller: CallerDep,
    conn: ConnectionDep,
    response: Response,
) -> FeedbackPublic:
    """Give the turn its feedback: 201 the first time, 200 when it replaces the turn's earlier one.

    The body is the whole feedback (a field left out is null). Idempotent: the same body again
    answers 200 and changes nothing, `updated_at` included; `updated_at` moves only when a value
    changes, `created_at` stays the first feedback's. On ended conversations too. With a user's key,
    only that user's conversations (another's answers 404, as an unknown one).
    """
    stored = await service.put_feedback(conn, conversation_id, turn_number, body, caller=caller)
    if stored.created:
        response.status_code = status.HTTP_201_CREATED
    return stored.feedback


@router.delete(_PATH, status_code=status.HTTP_204_NO_CONTENT, responses=_about_feedback(401, 404, 422))
async def delete_feedback(
    conversation_id: ConversationId, turn_number: TurnNumber, caller: CallerDep, conn: ConnectionDep
) -> None:
    """Remove the turn's feedback. 404 when it has none (a second delete too, as for a conversation)."""
    await service.delete_feedback(conn, conversation_id, turn_number, caller=caller)


@router.get("/feedback", responses=_about_feedback(401, 403, 422))
async def export_feedback(
    query: Annotated[FeedbackExportQuery, Query()], caller: CallerDep, conn: ConnectionDep
) -> FeedbackPage:
    """Every conversation's feedback, newest first (`created_at`, then `id`), `limit` per page: for evaluations.

    The operator's key only (403 with a user's). `from` and `to` bound `created_at` and are read as
    GET /usage reads its own; `feedback_type` keeps one kind. Pages are by keyset: feedback given
    between pages is newer than the cursor, so pages neither skip nor repeat. Other query parameters
    are refused (422).
    """
    return await service.export_feedback(
        conn,
        start=query.start,
        end=query.end,
        feedback_type=query.feedback_type,
        limit=query.limit,
        cursor=query.cursor,
        caller=caller,
    )
