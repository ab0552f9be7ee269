"""The feedback's SQL (kraken_feedback). Routes call these functions; nothing else touches the table.

As for the conversations (``backend.conversations.service``): one statement per operation, sent
through ``backend.db.statements``; a user's key is checked inside that statement (the CALLER CTEs,
the conversation's user_id in the same WHERE), and only a statement that matched nothing runs a
second query, to say why (the key: 401; the conversation, the turn or the feedback: 404). The
operator's key sees every conversation. Feedback is accepted on ended conversations too: it often
comes after the conversation is over.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn

import asyncpg

from backend.conversations.errors import ConversationNotFound
from backend.conversations.keys import OPERATOR, Caller
from backend.conversations.schemas import FeedbackPublic, FeedbackType, as_utc
from backend.conversations.service import (
    CALLER,
    NOW,
    OWNED,
    USER_OWNS,
    decode_cursor,
    encode_cursor,
    refused_for_user,
    user_id_of,
)
from backend.db.statements import Statement, fetch_all, fetch_one
from backend.feedback.errors import ExportOperatorOnly, FeedbackNotFound, TurnNotFound
from backend.feedback.schemas import FeedbackExported, FeedbackPage, FeedbackPut

FEEDBACK_COLUMNS = "f.feedback_type, f.comment, f.trace_id, f.created_at, f.updated_at"
# The turn :turn_number of conversation :conversation_id (one probe of the unique
# (conversation_id, turn_number) index); a user's: only in a conversation of theirs.
_TURN = "t.conversation_id = :conversation_id AND t.turn_number = CAST(:turn_number AS integer)"
_OWNED_TURN = f" AND EXISTS (SELECT 1 FROM kraken_conversations AS c WHERE c.id = t.conversation_id AND {OWNED})"


def _put(caller: str, owned: str) -> Statement:
    """The upsert, for the operator (``caller``, ``owned`` empty) or a user's key.

    One statement: the turn found by its number, the row inserted, or on the turn's unique index
    the earlier one replaced. ``created`` (xmax = 0: no earlier version of the row was updated)
    tells the first feedback (201) from a replace (200). A replace that changes nothing keeps
    updated_at; created_at is always the first feedback's. The instant is read once (``n``): two
    calls of clock_timestamp() in one row differ whenever a microsecond passes between them, and
    a first feedback's created_at and updated_at must be equal.
    """
    return Statement.of(f"""
{caller}INSERT INTO kraken_feedback AS f (
    turn_id, conversation_id, feedback_type, comment, trace_id, created_at, updated_at)
SELECT t.id, t.conversation_id, CAST(:feedback_type AS text), CAST(:comment AS text), CAST(:trace_id AS text),
       n.at, n.at
FROM kraken_turns AS t CROSS JOIN (SELECT {NOW} AS at) AS n
WHERE {_TURN}{owned}
ON CONFLICT (turn_id) DO UPDATE SET
    feedback_type = EXCLUDED.feedback_type, comment = EXCLUDED.comment, trace_id = EXCLUDED.trace_id,
    updated_at = CASE
        WHEN (f.feedback_type, f.comment, f.trace_id) IS DISTINCT FROM
             (EXCLUDED.feedback_type, EXCLUDED.comment, EXCLUDED.trace_id)
        THEN EXCLUDED.updated_at ELSE f.updated_at END
RETURNING {FEEDBACK_COLUMNS}, (f.xmax = 0) AS created
""")


PUT = _put("", "")
PUT_AS_USER = _put(f"WITH {CALLER}\n", _OWNED_TURN)


def _delete(caller: str, owned: str) -> Statement:
    return Statement.of(f"""
{caller}DELETE FROM kraken_feedback AS f USING kraken_turns AS t
WHERE f.turn_id = t.id AND {_TURN}{owned}
RETURNING f.id
""")


DELETE = _delete("", "")
DELETE_AS_USER = _delete(f"WITH {CALLER}\n", _OWNED_TURN)

# Why a put or a delete matched nothing (only run on that path): no row, no such conversation of
# the caller's; turn_id NULL, no such turn in it; else (a delete) no feedback on the turn.
_TARGET = """
SELECT (SELECT t.id FROM kraken_turns AS t WHERE t.conversation_id = c.id
        AND t.turn_number = CAST(:turn_number AS integer)) AS turn_id
FROM kraken_conversations AS c WHERE c.id = :conversation_id
"""
TARGET = Statement.of(_TARGET)
TARGET_AS_USER = Statement.of(_TARGET.rstrip() + f" AND {USER_OWNS}\n")

# The export, newest first: a backward scan of ix_kraken_feedback_created_at_id from the upper
# bound (or the cursor), the lower bound ending it; the type filters rows on the way. Missing
# bounds are infinite (one statement serves every combination, its index range from parameters).
_EXPORT = """
SELECT f.id, f.conversation_id, f.turn_id, t.turn_number, {columns}
FROM kraken_feedback AS f JOIN kraken_turns AS t ON t.id = f.turn_id
WHERE f.created_at >= COALESCE(CAST(:start AS timestamptz), '-infinity')
  AND f.created_at < COALESCE(CAST(:end AS timestamptz), 'infinity')
  AND (CAST(:feedback_type AS text) IS NULL OR f.feedback_type = CAST(:feedback_type AS text)){after}
ORDER BY f.created_at DESC, f.id DESC
LIMIT :limit
"""
EXPORT_FIRST = Statement.of(_EXPORT.format(columns=FEEDBACK_COLUMNS, after=""))
EXPORT_AFTER = Statement.of(
    _EXPORT.format(
        columns=FEEDBACK_COLUMNS,
        after="\n  AND (f.created_at, f.id) < (CAST(:created_at AS timestamptz), CAST(:id AS uuid))",
    )
)


@dataclass(frozen=True)
class Stored:
    """The turn's feedback as stored, and whether this request gave its first (False: it replaced one)."""

    feedback: FeedbackPublic
    created: bool


def _params(conversation_id: uuid.UUID, turn_number: int, caller: Caller, **more: Any) -> dict[str, Any]:
    params = dict(more, conversation_id=conversation_id, turn_number=turn_number)
    if not caller.is_operator:
        params["key_hash"] = caller.key_hash
    return params


async def put_feedback(
    conn: asyncpg.Connection,
    conversation_id: uuid.UUID,
    turn_number: int,
    body: FeedbackPut,
    *,
    caller: Caller = OPERATOR,
) -> Stored:
    """Give turn ``turn_number`` its feedback, replacing any it had (the whole of it: a field left out is null)."""
    params = _params(conversation_id, turn_number, caller, **body.model_dump())
    try:
        row = await fetch_one(conn, PUT if caller.is_operator else PUT_AS_USER, **params)
    except asyncpg.ForeignKeyViolationError:
        # The conversation (and its turns) was deleted after this statement's snapshot found the
        # turn: its insert stored nothing, and the turn is gone.
        row = None
    if row is None:
        await _explain(conn, conversation_id, turn_number, caller)
    created = row["created"]
    return Stored(FeedbackPublic.model_validate({k: v for k, v in dict(row).items() if k != "created"}), created)


async def delete_feedback(
    conn: asyncpg.Connection, conversation_id: uuid.UUID, turn_number: int, *, caller: Caller = OPERATOR
) -> None:
    params = _params(conversation_id, turn_number, caller)
    row = await fetch_one(conn, DELETE if caller.is_operator else DELETE_AS_USER, **params)
    if row is None:
        await _explain(conn, conversation_id, turn_number, caller)


async def _explain(conn: asyncpg.Connection, conversation_id: uuid.UUID, turn_number: int, caller: Caller) -> NoReturn:
    """Why a put or a delete matched nothing: the key, the conversation, the turn, or (a delete) the feedback."""
    if caller.is_operator:
        target = await fetch_one(conn, TARGET, conversation_id=conversation_id, turn_number=turn_number)
    else:
        await refused_for_user(conn, caller)
        target = await fetch_one(
            conn, TARGET_AS_USER, conversation_id=conversation_id, turn_number=turn_number, key_hash=caller.key_hash
        )
    if target is None:
        raise ConversationNotFound()
    if target["turn_id"] is None:
        raise TurnNotFound()
    raise FeedbackNotFound()


async def export_feedback(
    conn: asyncpg.Connection,
    *,
    start: datetime | None,
    end: datetime | None,
    feedback_type: FeedbackType | None,
    limit: int,
    cursor: str | None,
    caller: Caller = OPERATOR,
) -> FeedbackPage:
    """Every conversation's feedback created in [start, end), newest first, by keyset on
    (created_at, id): rows added between pages are newer than any cursor, so pages neither skip
    nor repeat. The operator's key only (a user's, once checked: 403)."""
    if await user_id_of(conn, caller) is not None:
        raise ExportOperatorOnly()
    params: dict[str, Any] = {
        "start": None if start is None else as_utc(start),
        "end": None if end is None else as_utc(end),
        "feedback_type": feedback_type,
        "limit": limit + 1,
    }
    position = None if cursor is None else decode_cursor(cursor)
    if position is None:
        rows = await fetch_all(conn, EXPORT_FIRST, **params)
    else:
        params["created_at"], params["id"] = position
        rows = await fetch_all(conn, EXPORT_AFTER, **params)
    items = [FeedbackExported.model_validate(dict(row)) for row in rows[:limit]]
    more = len(rows) > limit
    return FeedbackPage(items=items, next_cursor=encode_cursor(items[-1].created_at, items[-1].id) if more else None)
