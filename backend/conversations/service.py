"""The conversations' SQL. Routes call these functions; nothing else touches the tables.

Style: hand-written SQL, one statement per operation wherever possible: a turn with its tool calls
and the conversation's totals is one statement (data-modifying CTEs), the shared view one query.
Such a statement is atomic on its own, so it goes out through ``backend.db.statements``: one
asyncpg statement on the request's connection, no BEGIN and COMMIT round trips around it,
inside the caller's transaction when one is open (tests roll theirs back). ``bench/write_path.py``
compares this with the same SQL through SQLAlchemy ``text()``, and with one statement per row.
The only multi-statement operation, delete, runs its two statements in one transaction.

They are correct with or without revision 002 (unique turn and sequence numbers, cascading
deletes, CHECKs): turn numbers come from the locked conversation row, deletes remove children
explicitly, and values are validated by the schemas, not by CHECKs.

Times: the same statements are right whether ``started_at``, ``ended_at`` and ``created_at`` are
``timestamp without time zone`` (UTC wall-clock) or ``timestamptz``, as they may be either while a
deploy converts them. They run in the service's session, whose TimeZone is UTC
(``backend.db.engine.SERVICE_SESSION``), and every conversion between the two types goes by that
zone: ``clock_timestamp()`` assigned to a ``timestamp`` column is UTC wall-clock time, ``to_char``
of a ``timestamptz`` prints UTC, a ``timestamptz`` cast to a date is its UTC day. Times sent as
parameters are aware and typed ``timestamptz`` in the SQL (asyncpg's ``timestamp`` codec refuses
aware values, its ``timestamptz`` one reads naive ones in the machine's zone); compared with a
``timestamp`` column they stay inside the column's b-tree operator family, so its index serves.
Times read back are made aware UTC in one place, ``schemas.as_utc``.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, NoReturn, TypeVar

import asyncpg
from pydantic import BaseModel

from backend.conversations.errors import (
    ConversationEnded,
    ConversationNotFound,
    IdempotencyKeyReused,
    InvalidCursor,
    InvalidKey,
    OperatorOnly,
    TotalsFull,
    TurnRejected,
)
from backend.conversations.keys import OPERATOR, Caller
from backend.conversations.schemas import (
    CURSOR_PATTERN,
    DEFAULT_VIEW_TURNS,
    MAX_TOTAL_COST_USD,
    MAX_TOTAL_TOKENS,
    MAX_TOTAL_TURNS,
    ConversationCreate,
    ConversationPage,
    ConversationPublic,
    EndStatus,
    ToolCallPublic,
    TurnCreate,
    TurnPublic,
    UsageGroup,
    UsageGrouping,
    UsageReport,
    as_utc,
    dumps,
)
from backend.db.statements import Statement, execute, fetch_all, fetch_one, transaction

# --- SQL -----------------------------------------------------------------------------------

# The time the row is written, not the transaction's start: a timestamptz, stored as UTC in a
# column of either type (see the module's docstring).
NOW = "clock_timestamp()"
# Must print what schemas.UtcTimestamp prints (to_char of a timestamptz prints the session's zone: UTC).
TIMESTAMP_FORMAT = """'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'"""

T = TypeVar("T")
# The unique indexes revision 003 puts on Idempotency-Keys (a race between two first attempts ends on them).
CONVERSATION_KEY_INDEX = "ix_kraken_conversations_idempotency_key"
TURN_KEY_INDEX = "ix_kraken_turns_conversation_id_idempotency_key"

CONVERSATION_COLUMNS = (
    "id, session_id, model, system_prompt_hash, agent_version, status, started_at, ended_at, "
    "total_turns, total_tokens, total_cost_usd"
)

# A user's key, resolved inside the statement that serves the request (issue 20): ``caller`` is the
# active user whose key hashes to :key_hash (one probe of the unique index; empty for a key never
# issued, rotated since, or deactivated), and ``touched`` records the user's activity at most once
# a minute: the row is written only when last_active is older than that, so a busy user's requests
# do not each update (and lock) it. Every statement of a user's request reads the table afresh:
# a rotation or a deactivation holds from its commit on. The operator's statements are the ones
# before issue 20, unchanged (they see every conversation).
CALLER = f"""caller AS (
    SELECT id FROM kraken_users WHERE api_key_hash = :key_hash AND is_active
), touched AS (
    UPDATE kraken_users SET last_active = {NOW}
    WHERE api_key_hash = :key_hash AND is_active
      AND (last_active IS NULL OR last_active < {NOW} - interval '1 minute')
)"""
# The conversation (``c``) is the caller's.
OWNED = "c.user_id = (SELECT id FROM caller)"
# Run on a user's failure paths only: is the key still good? Then the refusal is about the conversation.
KEY_VALID = Statement.of("SELECT 1 FROM kraken_users WHERE api_key_hash = :key_hash AND is_active")
RESOLVE = Statement.of(f"WITH {CALLER} SELECT id FROM caller")

# With an Idempotency-Key, a conversation created under it earlier is returned instead (with the
# fingerprint of the request that created it, to compare); without one, ``prior`` is empty. Two
# first attempts racing: the later one's INSERT meets the unique index, and is answered from the
# earlier one's row (``PRIOR_CONVERSATION``).
CREATE = Statement.of(f"""
WITH prior AS (
    SELECT {CONVERSATION_COLUMNS}, idempotency_fingerprint FROM kraken_conversations
    WHERE idempotency_key = :idempotency_key
), created AS (
    INSERT INTO kraken_conversations (
        session_id, model, system_prompt_hash, agent_version, status, started_at,
        idempotency_key, idempotency_fingerprint)
    SELECT :session_id, :model, :system_prompt_hash, :agent_version, 'active', {NOW},
        :idempotency_key, :idempotency_fingerprint
    WHERE NOT EXISTS (SELECT 1 FROM prior)
    RETURNING {CONVERSATION_COLUMNS}
)
SELECT {CONVERSATION_COLUMNS}, CAST(NULL AS bytea) AS prior_fingerprint FROM created
UNION ALL
SELECT {CONVERSATION_COLUMNS}, idempotency_fingerprint FROM prior
""")
PRIOR_CONVERSATION = Statement.of(f"""
SELECT {CONVERSATION_COLUMNS}, idempotency_fingerprint AS prior_fingerprint FROM kraken_conversations
WHERE idempotency_key = :idempotency_key
""")
# A user's create: the conversation is the user's (user_id). No row comes back only when the key
# names no active user. An Idempotency-Key another user (or the operator) used is not replayed to
# this one (``owned`` false: 409): keys are unique across the table, as revision 003 made them.
CREATE_AS_USER = Statement.of(f"""
WITH {CALLER}, prior AS (
    SELECT {CONVERSATION_COLUMNS}, idempotency_fingerprint, user_id FROM kraken_conversations
    WHERE idempotency_key = :idempotency_key
), created AS (
    INSERT INTO kraken_conversations (
        session_id, model, system_prompt_hash, agent_version, status, started_at,
        idempotency_key, idempotency_fingerprint, user_id)
    SELECT :session_id, :model, :system_prompt_hash, :agent_version, 'active', {NOW},
        :idempotency_key, :idempotency_fingerprint, caller.id
    FROM caller
    WHERE NOT EXISTS (SELECT 1 FROM prior)
    RETURNING {CONVERSATION_COLUMNS}
)
SELECT {CONVERSATION_COLUMNS}, CAST(NULL AS bytea) AS prior_fingerprint, true AS owned FROM created
UNION ALL
SELECT {CONVERSATION_COLUMNS}, idempotency_fingerprint, user_id IS NOT DISTINCT FROM (SELECT id FROM caller)
FROM prior WHERE EXISTS (SELECT 1 FROM caller)
""")
# No row when the key names no active user (rotated or deactivated since the create began): the
# caller is then nobody, and must not own the operator's conversations (user_id NULL) as NULL would.
PRIOR_CONVERSATION_AS_USER = Statement.of(f"""
WITH caller AS (SELECT id FROM kraken_users WHERE api_key_hash = :key_hash AND is_active)
SELECT {CONVERSATION_COLUMNS}, idempotency_fingerprint AS prior_fingerprint,
       user_id IS NOT DISTINCT FROM (SELECT id FROM caller) AS owned
FROM kraken_conversations WHERE idempotency_key = :idempotency_key AND EXISTS (SELECT 1 FROM caller)
""")

# The turns stored for :conversation_id, as an append needs them: the highest turn number (one
# probe of the unique (conversation_id, turn_number) index), and their sums, which only an append
# to a conversation whose totals lag its turns reads (a WITH query runs only as far as it is read).
# Rows the original KRAKEN client wrote can lag: it wrote a turn, then in a second statement the
# totals, and one that died in between left total_turns behind the turns. Revision 005
# reconciles such rows with the same sums (its own copy: revisions never import the service).
STORED_TURNS = """last_turn AS (
    SELECT max(turn_number) AS turn_number FROM kraken_turns WHERE conversation_id = :conversation_id
), stored AS (
    SELECT count(*) AS total_turns,
           COALESCE(sum(CAST(input_tokens AS bigint) + output_tokens), 0) AS total_tokens,
           COALESCE(sum(cost_usd), 0) AS total_cost_usd
    FROM kraken_turns WHERE conversation_id = :conversation_id
)"""
# A conversation lags when a stored turn is numbered past its total_turns. Only "behind" is healed:
# after any append the row's total_turns is again at least every stored number, which is what keeps
# racing appends correct (see APPEND).
LAGS = "last_turn.turn_number > c.total_turns"


def _total_before(column: str) -> str:
    """A total of conversation ``c`` before the new turn: the row's, or the turns' sum if it lags."""
    return f"CASE WHEN {LAGS} THEN (SELECT {column} FROM stored) ELSE c.{column} END"


# One statement, one round trip: lock the conversation by updating its totals (so concurrent
# appends queue on the row and each sees the previous one's total_turns), insert the turn
# numbered after the new total, insert its tool calls numbered by their position. The WHERE refuses
# ended conversations and totals that would overflow their columns; then nothing is inserted.
# Tool calls arrive as parallel arrays: unnest keeps a JSON null a JSON null (jsonb_to_recordset
# would make it SQL NULL). With an Idempotency-Key already used in this conversation, nothing is
# written and the earlier turn's id comes back with its request's fingerprint (as for CREATE).
#
# A lagging conversation (LAGS) gets the sums of its turns plus this one as totals, and the turn
# the number after the highest stored one. Two appends racing on it: both read the turns in the
# statement's snapshot; the second waits for the first's row lock and, under READ COMMITTED, then
# evaluates SET, WHERE and RETURNING again on the row the first committed, whose total_turns is
# now the first's turn number. Its snapshot's highest turn is below that, so it no longer lags and
# takes total_turns + 1: gapless, like any append. (A conversation with a gap in its numbers, only
# ever made by hand, lags on every append; two racing on it can meet the unique index, and the
# second answers 409 and stores nothing.)
def _append(caller: str, owned: str) -> Statement:
    """The append, for the operator (``caller`` and ``owned`` empty) or a user's key (``caller`` the
    CALLER CTEs, ``owned`` the condition that the conversation is the caller's, in the UPDATE's WHERE:
    the key check costs no round trip)."""
    prior_owned = f" AND EXISTS (SELECT 1 FROM kraken_conversations AS c WHERE c.id = :conversation_id {owned})"
    return Statement.of(f"""
WITH {caller}prior AS (
    SELECT id, idempotency_fingerprint FROM kraken_turns
    WHERE conversation_id = :conversation_id AND idempotency_key = :idempotency_key{prior_owned if owned else ""}
), {STORED_TURNS}, conversation AS (
    UPDATE kraken_conversations AS c
    SET total_turns = {_total_before("total_turns")} + 1,
        total_tokens = {_total_before("total_tokens")} + CAST(:tokens AS integer),
        total_cost_usd = {_total_before("total_cost_usd")} + CAST(:cost_usd AS numeric)
    FROM last_turn
    WHERE c.id = :conversation_id AND NOT EXISTS (SELECT 1 FROM prior) {owned}
      AND c.status = 'active' AND c.ended_at IS NULL
      AND {_total_before("total_turns")} < {MAX_TOTAL_TURNS}
      AND {_total_before("total_tokens")} <= {MAX_TOTAL_TOKENS} - CAST(:tokens AS integer)
      AND {_total_before("total_cost_usd")} <= {MAX_TOTAL_COST_USD} - CAST(:cost_usd AS numeric)
    RETURNING c.id, GREATEST(c.total_turns, COALESCE(last_turn.turn_number, 0) + 1) AS turn_number
), turn AS (
    INSERT INTO kraken_turns (
        conversation_id, turn_number, user_query, assistant_response, model,
        input_tokens, output_tokens, cache_creation_tokens, cache_read_tokens,
        cost_usd, duration_ms, tool_calls_count, created_at, idempotency_key, idempotency_fingerprint)
    SELECT id, turn_number, CAST(:user_query AS text), CAST(:assistant_response AS text), CAST(:model AS text),
        CAST(:input_tokens AS integer), CAST(:output_tokens AS integer),
        CAST(:cache_creation_tokens AS integer), CAST(:cache_read_tokens AS integer),
        CAST(:cost_usd AS numeric), CAST(:duration_ms AS integer), CAST(:tool_calls_count AS integer), {NOW},
        CAST(:idempotency_key AS text), CAST(:idempotency_fingerprint AS bytea)
    FROM conversation
    RETURNING id, turn_number, created_at
), tool_calls AS (
    INSERT INTO kraken_tool_calls (turn_id, tool_name, tool_args, tool_result, result_truncated, sequence_order)
    SELECT turn.id, call.tool_name, call.tool_args, call.tool_result, call.result_truncated, call.sequence_order
    FROM turn, unnest(
        CAST(:tool_names AS text[]), CAST(:tool_args AS jsonb[]),
        CAST(:tool_results AS jsonb[]), CAST(:results_truncated AS boolean[])
    ) WITH ORDINALITY AS call(tool_name, tool_args, tool_result, result_truncated, sequence_order)
    RETURNING id, sequence_order
)
SELECT turn.id, turn.turn_number, turn.created_at,
       ARRAY(SELECT id FROM tool_calls ORDER BY sequence_order) AS tool_call_ids,
       CAST(NULL AS bytea) AS prior_fingerprint
FROM turn
UNION ALL
SELECT id, NULL, NULL, NULL, idempotency_fingerprint FROM prior
""")


APPEND = _append("", "")
APPEND_AS_USER = _append(f"{CALLER}, ", f"AND {OWNED}")
PRIOR_TURN = Statement.of("""
SELECT id, idempotency_fingerprint AS prior_fingerprint FROM kraken_turns
WHERE conversation_id = :conversation_id AND idempotency_key = :idempotency_key
""")

# Why an append matched no row (only run on that path): the totals it went by.
CONVERSATION_STATE = Statement.of(f"""
WITH {STORED_TURNS}
SELECT c.status, c.ended_at, {_total_before("total_turns")} AS total_turns,
       {_total_before("total_tokens")} AS total_tokens, {_total_before("total_cost_usd")} AS total_cost_usd
FROM kraken_conversations AS c, last_turn WHERE c.id = :conversation_id
""")
# A user's: only a conversation of the (checked, active) user whose key it is.
USER_OWNS = "c.user_id = (SELECT id FROM kraken_users WHERE api_key_hash = :key_hash)"
CONVERSATION_STATE_AS_USER = Statement.of(CONVERSATION_STATE.named.rstrip() + f" AND {USER_OWNS}\n")

END = Statement.of(f"""
UPDATE kraken_conversations SET status = :status, ended_at = {NOW}
WHERE id = :id AND status = 'active' AND ended_at IS NULL
RETURNING {CONVERSATION_COLUMNS}
""")
END_AS_USER = Statement.of(f"""
WITH {CALLER}
UPDATE kraken_conversations AS c SET status = :status, ended_at = {NOW}
WHERE id = :id AND status = 'active' AND ended_at IS NULL AND {OWNED}
RETURNING {CONVERSATION_COLUMNS}
""")


# A turn (``t``) with its tool calls as JSON, as schemas.TurnPublic has it (``extra``: more of its
# fields, after them).
def _turn_json(extra: str = "") -> str:
    return f"""json_build_object(
    'id', t.id, 'conversation_id', t.conversation_id, 'turn_number', t.turn_number,
    'user_query', t.user_query, 'assistant_response', t.assistant_response, 'model', t.model,
    'input_tokens', t.input_tokens, 'output_tokens', t.output_tokens,
    'cache_creation_tokens', t.cache_creation_tokens, 'cache_read_tokens', t.cache_read_tokens,
    'cost_usd', t.cost_usd, 'duration_ms', t.duration_ms, 'tool_calls_count', t.tool_calls_count,
    'created_at', to_char(t.created_at, {TIMESTAMP_FORMAT}),
    'tool_calls', COALESCE((
        SELECT json_agg(json_build_object(
            'id', tc.id, 'sequence_order', tc.sequence_order, 'tool_name', tc.tool_name,
            'tool_args', tc.tool_args, 'tool_result', tc.tool_result,
            'result_truncated', tc.result_truncated
        ) ORDER BY tc.sequence_order, tc.id)
        FROM kraken_tool_calls tc WHERE tc.turn_id = t.id
    ), CAST('[]' AS json)){extra}
)"""


TURN_JSON = _turn_json()
# The shared view's turn (schemas.TurnView): with its feedback, read by SHARED_VIEW's join.
FEEDBACK_JSON = f"""CASE WHEN t.feedback_type IS NOT NULL THEN json_build_object(
        'feedback_type', t.feedback_type, 'comment', t.feedback_comment, 'trace_id', t.feedback_trace_id,
        'created_at', to_char(t.feedback_created_at, {TIMESTAMP_FORMAT}),
        'updated_at', to_char(t.feedback_updated_at, {TIMESTAMP_FORMAT})
    ) END"""
VIEW_TURN_JSON = _turn_json(f",\n    'feedback', {FEEDBACK_JSON}")
# A stored turn, for answering a retried append.
STORED_TURN = Statement.of(f"SELECT {TURN_JSON}::text FROM kraken_turns t WHERE t.id = :id")

# The shared view, rendered by PostgreSQL in one query: a conversation of hundreds of tool calls
# goes out as the text PostgreSQL built, without being parsed and re-serialized in Python. Keys
# and formats match schemas.ConversationDetail (a test holds them together). One page of turns:
# up to :limit + 1 turns after :after_turn, read in order from the unique (conversation_id,
# turn_number) index, each with its feedback (one probe of kraken_feedback's unique turn_id index per
# turn, in the same query); the page is the first :limit, and the one more says whether another follows.
SHARED_VIEW = Statement.of(f"""
WITH page AS MATERIALIZED (
    SELECT t.*, f.feedback_type, f.comment AS feedback_comment, f.trace_id AS feedback_trace_id,
           f.created_at AS feedback_created_at, f.updated_at AS feedback_updated_at
    FROM kraken_turns t LEFT JOIN kraken_feedback f ON f.turn_id = t.id
    WHERE t.conversation_id = :id AND t.turn_number > CAST(:after_turn AS integer)
    ORDER BY t.turn_number, t.id
    LIMIT CAST(:limit AS integer) + 1
), shown AS (
    SELECT * FROM page ORDER BY turn_number, id LIMIT CAST(:limit AS integer)
)
SELECT json_build_object(
    'id', c.id, 'session_id', c.session_id, 'model', c.model,
    'system_prompt_hash', c.system_prompt_hash, 'agent_version', c.agent_version, 'status', c.status,
    'started_at', to_char(c.started_at, {TIMESTAMP_FORMAT}),
    'ended_at', to_char(c.ended_at, {TIMESTAMP_FORMAT}),
    'total_turns', c.total_turns, 'total_tokens', c.total_tokens, 'total_cost_usd', c.total_cost_usd,
    'turns', COALESCE((
        SELECT json_agg({VIEW_TURN_JSON} ORDER BY t.turn_number, t.id) FROM shown t
    ), CAST('[]' AS json)),
    'next_after_turn', CASE WHEN (SELECT count(*) FROM page) > CAST(:limit AS integer)
        THEN (SELECT max(turn_number) FROM shown) END
)::text
FROM kraken_conversations c
WHERE c.id = :id
""")
# A user's key reads only that user's conversations (the id of another one names none).
SHARED_VIEW_OWNED = Statement.of(SHARED_VIEW.named.rstrip() + " AND c.user_id = :user_id\n")

_LIST = f"""
SELECT {CONVERSATION_COLUMNS} FROM kraken_conversations
WHERE session_id = :session_id {{owned}}{{after}}
ORDER BY started_at DESC, id DESC
LIMIT :limit
"""
_AFTER = "AND (started_at, id) < (CAST(:started_at AS timestamptz), CAST(:id AS uuid))"
_OWNED_LIST = "AND user_id = :user_id "
LIST_FIRST = Statement.of(_LIST.format(owned="", after=""))
LIST_AFTER = Statement.of(_LIST.format(owned="", after=_AFTER))
LIST_FIRST_OWNED = Statement.of(_LIST.format(owned=_OWNED_LIST, after=""))
LIST_AFTER_OWNED = Statement.of(_LIST.format(owned=_OWNED_LIST, after=_AFTER))

# Locks the conversation first: appends then wait, so the delete below (a new statement, with a
# new snapshot) sees every turn there will ever be and leaves no child row behind.
LOCK = Statement.of("SELECT 1 FROM kraken_conversations WHERE id = :id FOR UPDATE")
LOCK_OWNED = Statement.of("SELECT 1 FROM kraken_conversations WHERE id = :id AND user_id = :user_id FOR UPDATE")
DELETE = Statement.of("""
WITH turns AS (
    DELETE FROM kraken_turns WHERE conversation_id = :id RETURNING id
), tool_calls AS (
    DELETE FROM kraken_tool_calls WHERE turn_id IN (SELECT id FROM turns)
)
DELETE FROM kraken_conversations WHERE id = :id
""")

# Grouped by the value itself (a model, a date), the key written once per group: formatting each
# row's time as text before grouping cost a day's report (10,000 turns) more than its index scan.
_USAGE = """
SELECT {key} AS key,
       count(*) AS turns,
       COALESCE(sum(t.input_tokens), 0) AS input_tokens,
       COALESCE(sum(t.output_tokens), 0) AS output_tokens,
       COALESCE(sum(t.cache_creation_tokens), 0) AS cache_creation_tokens,
       COALESCE(sum(t.cache_read_tokens), 0) AS cache_read_tokens,
       COALESCE(sum(CAST(t.input_tokens AS bigint) + t.output_tokens), 0) AS total_tokens,
       COALESCE(sum(t.cost_usd), 0) AS cost_usd
FROM kraken_turns AS t{join}
WHERE t.created_at >= CAST(:start AS timestamptz) AND t.created_at < CAST(:end AS timestamptz){owned}
GROUP BY {group}
ORDER BY {group}
"""
_DAY = "CAST(t.created_at AS date)"  # the UTC day, of either type, in the service's session
# The operator's per user: a user's id, and USAGE_SHARED for the conversations of the operator's
# key (user_id NULL). Ids are lower-case hex, so the text order puts USAGE_SHARED last.
USAGE_SHARED = "shared"
_USER = f"COALESCE(CAST(c.user_id AS text), '{USAGE_SHARED}')"
_BY_CONVERSATION = " JOIN kraken_conversations AS c ON c.id = t.conversation_id"
# A user's: the turns of that user's conversations (found by the user_id index).
_OWNED_USAGE = " AND t.conversation_id IN (SELECT id FROM kraken_conversations WHERE user_id = :user_id)"
_USAGE_KEYS: dict[UsageGrouping, tuple[str, str]] = {
    "model": ("t.model", "t.model"),
    "day": (f"to_char({_DAY}, 'YYYY-MM-DD')", _DAY),
}
USAGE: dict[UsageGrouping, Statement] = {
    grouping: Statement.of(_USAGE.format(key=key, group=group, join="", owned=""))
    for grouping, (key, group) in _USAGE_KEYS.items()
}
USAGE["user"] = Statement.of(_USAGE.format(key=_USER, group=_USER, join=_BY_CONVERSATION, owned=""))
USAGE_OWNED: dict[UsageGrouping, Statement] = {
    grouping: Statement.of(_USAGE.format(key=key, group=group, join="", owned=_OWNED_USAGE))
    for grouping, (key, group) in _USAGE_KEYS.items()
}


# --- operations ----------------------------------------------------------------------------


def _conversation(row: asyncpg.Record) -> ConversationPublic:
    return ConversationPublic.model_validate(dict(row))


@dataclass(frozen=True)
class Recorded(Generic[T]):
    """What a write stored, and whether an earlier attempt with the same Idempotency-Key stored it."""

    value: T
    replayed: bool = False


def fingerprint(body: BaseModel) -> bytes:
    """What an Idempotency-Key is checked against: sha256 of the request's validated fields, so
    key order and spacing in the JSON do not matter, but any value does.

    A field at its default counts as absent: a release that adds a field with a default computes
    the fingerprint of a body sent to the release before it as that release did. (A release that
    changes how a value is validated or normalised changes fingerprints: retries that span it get 409.)
    """
    return _digest(body.model_dump(mode="json", exclude_defaults=True))


def _fingerprint_with_defaults(body: BaseModel) -> bytes:
    """The fingerprint releases before ``fingerprint``'s rule stored: defaults included. Rows keep
    their keys for as long as the conversation lives, so a retry of a request first sent to such a
    release may come at any time; only a mismatch pays for this second hash."""
    return _digest(body.model_dump(mode="json"))


def _digest(fields: dict[str, Any]) -> bytes:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).digest()


def _check_replay(prior_fingerprint: bytes, body: BaseModel) -> None:
    if prior_fingerprint != fingerprint(body) and prior_fingerprint != _fingerprint_with_defaults(body):
        raise IdempotencyKeyReused()


async def user_id_of(conn: asyncpg.Connection, caller: Caller) -> uuid.UUID | None:
    """The caller's user id (None: the operator), for the reads that filter by it; InvalidKey for a
    key that names no active user. Records the user's activity as every user statement does."""
    if caller.is_operator:
        return None
    row = await fetch_one(conn, RESOLVE, key_hash=caller.key_hash)
    if row is None:
        raise InvalidKey()
    user_id: uuid.UUID = row["id"]
    return user_id


async def refused_for_user(conn: asyncpg.Connection, caller: Caller) -> None:
    """A user's write matched no row: InvalidKey when the key names no active user (now)."""
    if await fetch_one(conn, KEY_VALID, key_hash=caller.key_hash) is None:
        raise InvalidKey()


async def create_conversation(
    conn: asyncpg.Connection,
    data: ConversationCreate,
    *,
    idempotency_key: str | None = None,
    caller: Caller = OPERATOR,
) -> Recorded[ConversationPublic]:
    params = dict(data.model_dump(), idempotency_key=idempotency_key, idempotency_fingerprint=None)
    if idempotency_key is not None:
        params["idempotency_fingerprint"] = fingerprint(data)
    if not caller.is_operator:
        params["key_hash"] = caller.key_hash
    try:
        row = await fetch_one(conn, CREATE if caller.is_operator else CREATE_AS_USER, **params)
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name != CONVERSATION_KEY_INDEX:
            raise
        # Another attempt with this key committed first (both found no conversation under it).
        if caller.is_operator:
            row = await fetch_one(conn, PRIOR_CONVERSATION, idempotency_key=idempotency_key)
        else:
            row = await fetch_one(
                conn, PRIOR_CONVERSATION_AS_USER, idempotency_key=idempotency_key, key_hash=caller.key_hash
            )
    if row is None:
        raise InvalidKey()  # only a user's create stores nothing and answers no row: no such active key
    if not caller.is_operator and not row["owned"]:
        raise IdempotencyKeyReused()  # another user's (or the operator's) key: nothing of it is shown
    if row["prior_fingerprint"] is not None:
        _check_replay(row["prior_fingerprint"], data)
        return Recorded(_conversation(row), replayed=True)
    return Recorded(_conversation(row))


def store_tool_result(result: Any, max_bytes: int) -> tuple[Any, str, bool]:
    """(value, its JSON, truncated?) to store for a tool result, at most ``max_bytes`` of JSON.

    A larger result becomes ``{"original_size_bytes": N, "preview": P}`` where P is the longest
    start of its compact JSON text that keeps the stored JSON within ``max_bytes``.
    """
    encoded = dumps(result)
    size = len(encoded.encode())
    if size <= max_bytes:
        return result, encoded, False
    # Escaping can make a character cost up to 6 bytes inside the preview string, so search for
    # the longest prefix that fits (the stored size grows with the prefix).
    low, high = 0, min(len(encoded), max_bytes)
    while low < high:
        mid = (low + high + 1) // 2
        if len(dumps({"original_size_bytes": size, "preview": encoded[:mid]}).encode()) <= max_bytes:
            low = mid
        else:
            high = mid - 1
    stored = {"original_size_bytes": size, "preview": encoded[:low]}
    return stored, dumps(stored), True


async def append_turn(
    conn: asyncpg.Connection,
    conversation_id: uuid.UUID,
    turn: TurnCreate,
    *,
    tool_result_max_bytes: int,
    idempotency_key: str | None = None,
    caller: Caller = OPERATOR,
) -> Recorded[TurnPublic]:
    stored = [store_tool_result(call.tool_result, tool_result_max_bytes) for call in turn.tool_calls]
    fields = turn.model_dump(exclude={"tool_calls"})
    params = dict(
        fields,
        idempotency_key=idempotency_key,
        idempotency_fingerprint=fingerprint(turn) if idempotency_key is not None else None,
        conversation_id=conversation_id,
        tokens=turn.input_tokens + turn.output_tokens,
        tool_calls_count=len(turn.tool_calls),
        tool_names=[call.tool_name for call in turn.tool_calls],
        tool_args=[dumps(call.tool_args) for call in turn.tool_calls],
        tool_results=[encoded for _, encoded, _ in stored],
        results_truncated=[truncated for _, _, truncated in stored],
    )
    if not caller.is_operator:
        params["key_hash"] = caller.key_hash
    try:
        row = await fetch_one(conn, APPEND if caller.is_operator else APPEND_AS_USER, **params)
    except asyncpg.IntegrityConstraintViolationError as exc:
        if exc.constraint_name != TURN_KEY_INDEX:
            # Only a constraint this code does not check for can get here (one added to the
            # database later, or rows that predate the service); the statement stored nothing.
            raise TurnRejected(exc.constraint_name) from None
        # Another attempt with this key committed first (both found no turn under it); a user's
        # APPEND_AS_USER got this far, so the conversation is the user's.
        row = await fetch_one(conn, PRIOR_TURN, conversation_id=conversation_id, idempotency_key=idempotency_key)
        assert row is not None  # the turn that took the key
    if row is None:
        await _explain_refused_append(conn, conversation_id, turn, caller)
    if row["prior_fingerprint"] is not None:
        _check_replay(row["prior_fingerprint"], turn)
        return Recorded(await _stored_turn(conn, row["id"]), replayed=True)
    return Recorded(
        TurnPublic(
            id=row["id"],
            conversation_id=conversation_id,
            turn_number=row["turn_number"],
            tool_calls_count=len(turn.tool_calls),
            created_at=row["created_at"],
            tool_calls=[
                ToolCallPublic(
                    id=call_id,
                    sequence_order=position,
                    tool_name=call.tool_name,
                    tool_args=call.tool_args,
                    tool_result=value,
                    result_truncated=truncated,
                )
                for position, (call_id, call, (value, _, truncated)) in enumerate(
                    zip(row["tool_call_ids"], turn.tool_calls, stored, strict=True), start=1
                )
            ],
            **fields,
        )
    )


async def _stored_turn(conn: asyncpg.Connection, turn_id: uuid.UUID) -> TurnPublic:
    row = await fetch_one(conn, STORED_TURN, id=turn_id)
    assert row is not None  # it holds the key it was just found by; turns are only deleted with their conversation
    return TurnPublic.model_validate_json(row[0])


async def _conversation_state(
    conn: asyncpg.Connection, conversation_id: uuid.UUID, caller: Caller
) -> asyncpg.Record | None:
    """Why a write matched no row: the conversation's state (None: no such conversation of the caller's)."""
    if caller.is_operator:
        return await fetch_one(conn, CONVERSATION_STATE, conversation_id=conversation_id)
    await refused_for_user(conn, caller)
    return await fetch_one(conn, CONVERSATION_STATE_AS_USER, conversation_id=conversation_id, key_hash=caller.key_hash)


async def _explain_refused_append(
    conn: asyncpg.Connection, conversation_id: uuid.UUID, turn: TurnCreate, caller: Caller
) -> NoReturn:
    state = await _conversation_state(conn, conversation_id, caller)
    if state is None:
        raise ConversationNotFound()
    if state["status"] != "active" or state["ended_at"] is not None:
        raise ConversationEnded(state["status"])
    if state["total_turns"] >= MAX_TOTAL_TURNS:
        raise TotalsFull("total_turns", MAX_TOTAL_TURNS)
    if state["total_tokens"] + turn.input_tokens + turn.output_tokens > MAX_TOTAL_TOKENS:
        raise TotalsFull("total_tokens", MAX_TOTAL_TOKENS)
    raise TotalsFull("total_cost_usd", MAX_TOTAL_COST_USD)


async def end_conversation(
    conn: asyncpg.Connection, conversation_id: uuid.UUID, status: EndStatus, *, caller: Caller = OPERATOR
) -> ConversationPublic:
    if caller.is_operator:
        row = await fetch_one(conn, END, id=conversation_id, status=status)
    else:
        row = await fetch_one(conn, END_AS_USER, id=conversation_id, status=status, key_hash=caller.key_hash)
    if row is not None:
        return _conversation(row)
    state = await _conversation_state(conn, conversation_id, caller)
    if state is None:
        raise ConversationNotFound()
    raise ConversationEnded(state["status"])


async def shared_view_json(
    conn: asyncpg.Connection,
    conversation_id: uuid.UUID,
    *,
    after_turn: int = 0,
    limit: int = DEFAULT_VIEW_TURNS,
    caller: Caller | None = None,
) -> str:
    """The conversation with a page of its turns (``limit`` after turn ``after_turn``) and their tool
    calls, in order, as JSON text. ``caller`` None: the shared view, open to anyone with the id; a
    user's key: only that user's conversations."""
    user_id = None if caller is None else await user_id_of(conn, caller)
    if user_id is None:
        row = await fetch_one(conn, SHARED_VIEW, id=conversation_id, after_turn=after_turn, limit=limit)
    else:
        row = await fetch_one(
            conn, SHARED_VIEW_OWNED, id=conversation_id, after_turn=after_turn, limit=limit, user_id=user_id
        )
    if row is None:
        raise ConversationNotFound()
    document: str = row[0]
    return document


# A cursor is a position in the listing, (started_at, id), written as CURSOR_PATTERN says. Every
# string of that form is a position, so none that the OpenAPI document allows is refused. Its
# microseconds count from 0001-01-01T00:00:00Z, the same number whichever type started_at has.
_EPOCH = datetime.min.replace(tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def encode_cursor(started_at: datetime, conversation_id: uuid.UUID) -> str:
    """The cursor of a position; ``started_at`` is aware (as ``ConversationPublic`` holds it)."""
    return f"{(started_at - _EPOCH) // _MICROSECOND}-{conversation_id.hex}"


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID] | None:
    """The position a cursor names; None for one later than datetime holds: the listing's first row follows it."""
    if re.fullmatch(CURSOR_PATTERN, cursor) is None:
        raise InvalidCursor()
    microseconds, conversation_id = cursor.split("-")
    try:
        started_at = _EPOCH + int(microseconds) * _MICROSECOND
    except OverflowError:
        return None
    return started_at, uuid.UUID(hex=conversation_id)


async def list_conversations(
    conn: asyncpg.Connection, session_id: str, *, limit: int, cursor: str | None, caller: Caller = OPERATOR
) -> ConversationPage:
    """Newest first; keyset pagination on (started_at, id), so pages never skip or repeat rows. A
    user's key lists that user's conversations only."""
    params: dict[str, Any] = {"session_id": session_id, "limit": limit + 1}
    position = None if cursor is None else decode_cursor(cursor)
    user_id = await user_id_of(conn, caller)
    if user_id is not None:
        params["user_id"] = user_id
    if position is None:
        rows = await fetch_all(conn, LIST_FIRST if user_id is None else LIST_FIRST_OWNED, **params)
    else:
        params["started_at"], params["id"] = position
        rows = await fetch_all(conn, LIST_AFTER if user_id is None else LIST_AFTER_OWNED, **params)
    items = [_conversation(row) for row in rows[:limit]]
    more = len(rows) > limit
    return ConversationPage(
        items=items, next_cursor=encode_cursor(items[-1].started_at, items[-1].id) if more else None
    )


async def usage(
    conn: asyncpg.Connection, start: datetime, end: datetime, group_by: UsageGrouping, *, caller: Caller = OPERATOR
) -> UsageReport:
    """Turns, tokens and cost of the turns created in [start, end), per model, per UTC day or (the
    operator's key only) per user; a naive bound is UTC. A user's key sums that user's conversations."""
    start, end = as_utc(start), as_utc(end)
    user_id = await user_id_of(conn, caller)
    if user_id is None:
        rows = await fetch_all(conn, USAGE[group_by], start=start, end=end)
    elif group_by == "user":
        raise OperatorOnly("group_by=user")
    else:
        rows = await fetch_all(conn, USAGE_OWNED[group_by], start=start, end=end, user_id=user_id)
    return UsageReport(
        start=start, end=end, group_by=group_by, groups=[UsageGroup.model_validate(dict(r)) for r in rows]
    )


async def delete_conversation(
    conn: asyncpg.Connection, conversation_id: uuid.UUID, *, caller: Caller = OPERATOR
) -> None:
    """Remove the conversation, its turns and their tool calls (two statements, one transaction; a
    user's key resolved before them)."""
    user_id = await user_id_of(conn, caller)
    async with transaction(conn):
        if user_id is None:
            locked = await fetch_one(conn, LOCK, id=conversation_id)
        else:
            locked = await fetch_one(conn, LOCK_OWNED, id=conversation_id, user_id=user_id)
        if locked is None:
            raise ConversationNotFound()
        await execute(conn, DELETE, id=conversation_id)
