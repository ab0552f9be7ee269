"""The conversations domain module on its own: truncation, cursors, and its SQL on a real database."""

import asyncio
import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncConnection

from backend.conversations import errors, service
from backend.conversations.schemas import (
    CURSOR_PATTERN,
    ConversationCreate,
    ConversationDetail,
    Tokens,
    ToolCallCreate,
    ToolCallPublic,
    TurnCreate,
    TurnPublic,
    TurnView,
    dumps,
)
from backend.db import pool as db_pool
from backend.db.leases import Lease
from backend.tests.helpers import CONVERSATION, driver_of, each_served_schema, lender_on, rows, turn_body

# --- store_tool_result ---------------------------------------------------------------------


@pytest.mark.parametrize("limit", [256, 1000, 10240])
@pytest.mark.parametrize(
    "unit",
    ["x", "é", "🐙", '"', "\\", "\x01", "\n"],
    ids=["ascii", "2-byte", "4-byte", "quote", "backslash", "control", "newline"],
)
def test_a_truncated_result_keeps_the_longest_preview_that_fits_the_limit(limit, unit):
    result = {"output": unit * limit}
    encoded = dumps(result)

    stored, stored_json, truncated = service.store_tool_result(result, limit)

    assert truncated is True
    assert stored_json == dumps(stored)
    assert stored["original_size_bytes"] == len(encoded.encode())
    preview = stored["preview"]
    assert encoded.startswith(preview)
    assert len(stored_json.encode()) <= limit
    # One character more would not fit: the preview is as long as the limit allows.
    longer = dumps({"original_size_bytes": stored["original_size_bytes"], "preview": encoded[: len(preview) + 1]})
    assert len(longer.encode()) > limit


@pytest.mark.parametrize("limit", [256, 10240])
def test_a_result_at_the_limit_is_kept_whole_and_one_byte_more_is_truncated(limit):
    at_limit = "y" * (limit - 2)  # plus two quotes
    assert service.store_tool_result(at_limit, limit) == (at_limit, dumps(at_limit), False)
    assert service.store_tool_result(at_limit + "y", limit)[2] is True


def test_results_are_measured_as_compact_utf8_json():
    result = {"a": [1, 2], "b": "é"}  # {"a":[1,2],"b":"é"} is 20 bytes
    assert service.store_tool_result(result, 20)[2] is False
    assert service.store_tool_result(result, 19)[2] is True


# --- cursors -------------------------------------------------------------------------------


@pytest.mark.parametrize("started_at", [datetime(2025, 3, 1, 12, 30, 5, 123456), datetime.min, datetime.max])
def test_a_cursor_round_trips_its_position(started_at):
    position = (started_at.replace(tzinfo=UTC), uuid.uuid4())
    cursor = service.encode_cursor(*position)
    assert re.fullmatch(CURSOR_PATTERN, cursor)
    assert service.decode_cursor(cursor) == position
    # The number releases that held naive UTC times wrote: their cursors name the same positions.
    assert cursor.split("-")[0] == str((started_at - datetime.min) // timedelta(microseconds=1))


def test_a_cursor_after_the_last_time_python_holds_lists_from_the_first_row():
    assert service.decode_cursor(f"{10**18 - 1}-{'f' * 32}") is None


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "x",
        "!!!",
        "MjAyNS0wMS0wMXxub3QtYS11dWlk",  # the base64 form cursors had before
        f"1-{'0' * 31}",
        f"1-{'A' * 32}",
        f"{'1' * 19}-{'0' * 32}",
        f"-1-{'0' * 32}",
        f" 1-{'0' * 32}",
        f"1-{'0' * 32}\n",
    ],
)
def test_a_cursor_not_of_the_documented_form_is_refused(cursor):
    assert not re.fullmatch(CURSOR_PATTERN, cursor)
    with pytest.raises(errors.InvalidCursor):
        service.decode_cursor(cursor)


# --- fingerprints --------------------------------------------------------------------------


class _NextToolCall(ToolCallCreate):
    """ToolCallCreate as a later release may extend it: a field with a default."""

    call_id: str | None = None


class _NextTurn(TurnCreate):
    """TurnCreate as a later release may extend it, in itself and in its tool calls."""

    reasoning_tokens: Tokens = 0
    tool_calls: list[_NextToolCall] = []  # type: ignore[assignment]


class _NextConversation(ConversationCreate):
    locale: str = "en"


def _fingerprint(model: type[BaseModel], body: dict[str, Any]) -> bytes:
    return service.fingerprint(model.model_validate_json(json.dumps(body)))


@pytest.mark.parametrize(
    ("model", "next_model", "body"),
    [(TurnCreate, _NextTurn, turn_body()), (ConversationCreate, _NextConversation, CONVERSATION)],
    ids=["turn", "conversation"],
)
def test_a_release_that_adds_a_field_with_a_default_fingerprints_a_body_as_the_one_before(model, next_model, body):
    assert _fingerprint(next_model, body) == _fingerprint(model, body)


def test_a_new_field_still_counts_once_it_is_not_at_its_default():
    before = _fingerprint(TurnCreate, turn_body())
    assert _fingerprint(_NextTurn, turn_body(reasoning_tokens=0)) == before  # its default, sent: the same request
    assert _fingerprint(_NextTurn, turn_body(reasoning_tokens=3)) != before
    nested = turn_body()
    nested["tool_calls"][0]["call_id"] = "call-1"
    assert _fingerprint(_NextTurn, nested) != before


# --- SQL -----------------------------------------------------------------------------------


@pytest.fixture
async def conn(db_connection: AsyncConnection) -> asyncpg.Connection:
    """The test's connection as the service gets it: asyncpg's, inside the test's transaction."""
    return await driver_of(db_connection)


TRANSACTION_CONTROL = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE")


async def logged() -> None:
    """Let asyncpg's query loggers run: it calls them soon after each query, not during it."""
    await asyncio.sleep(0)


@pytest.fixture
async def statements(db_connection: AsyncConnection) -> list[str]:
    """What the test's connection sends to the server, transaction control left out."""
    sent: list[str] = []
    driver = (await db_connection.get_raw_connection()).driver_connection
    assert driver is not None

    def record(query: Any) -> None:
        if not query.query.lstrip().upper().startswith(TRANSACTION_CONTROL):
            sent.append(query.query)

    driver.add_query_logger(record)
    return sent


async def _conversation(conn: asyncpg.Connection) -> uuid.UUID:
    return (await service.create_conversation(conn, ConversationCreate.model_validate(CONVERSATION))).value.id


async def _append(conn: asyncpg.Connection, conversation_id: uuid.UUID) -> TurnPublic:
    turn = TurnCreate.model_validate(turn_body())
    return (await service.append_turn(conn, conversation_id, turn, tool_result_max_bytes=10240)).value


async def test_a_turn_with_its_tool_calls_and_totals_is_one_statement(conn, statements):
    conversation_id = await _conversation(conn)
    await _append(conn, conversation_id)  # asyncpg learns jsonb[] once per connection
    await logged()
    statements.clear()

    turn = await _append(conn, conversation_id)

    await logged()
    assert statements == [service.APPEND.sql]
    assert (turn.turn_number, turn.tool_calls_count) == (2, 2)


async def test_the_service_path_sends_one_statement_and_no_begin_or_commit(live_db, settings_for, monkeypatch):
    """In production a turn is one round trip (plus the pool's check of a connection idle a while)."""
    monkeypatch.setattr(db_pool, "PING_AFTER_IDLE_SECONDS", 3600.0)  # the check has its own tests
    sent: list[str] = []
    async with lender_on(live_db, settings_for(live_db, db_pool_size=1, db_max_overflow=0)) as lender:
        lease = Lease(lender)  # a fresh connection: not pinged, learns jsonb[]
        conn = await lease.connection()
        conn.add_query_logger(lambda q: sent.append(q.query))
        conversation_id = await _conversation(conn)
        await _append(conn, conversation_id)
        await lease.end(succeeded=True)
        await logged()
        sent.clear()
        lease = Lease(lender)  # what a request's lease does
        await _append(await lease.connection(), conversation_id)
        await lease.end(succeeded=True)
        await logged()
    assert sent == [service.APPEND.sql]


async def test_the_shared_view_is_one_statement_with_exactly_the_schema_fields(conn, statements):
    conversation_id = await _conversation(conn)
    for _ in range(2):
        await _append(conn, conversation_id)
    await logged()
    statements.clear()

    document = await service.shared_view_json(conn, conversation_id)

    await logged()
    assert statements == [service.SHARED_VIEW.sql]
    view = json.loads(document)
    assert list(view) == list(ConversationDetail.model_fields)
    assert list(view["turns"][0]) == list(TurnView.model_fields)
    assert list(view["turns"][0]["tool_calls"][0]) == list(ToolCallPublic.model_fields)
    assert ConversationDetail.model_validate_json(document).turns[1].turn_number == 2


async def test_appending_to_an_unknown_or_ended_conversation_raises(conn):
    turn = TurnCreate.model_validate(turn_body())
    with pytest.raises(errors.ConversationNotFound):
        await service.append_turn(conn, uuid.uuid4(), turn, tool_result_max_bytes=10240)
    conversation_id = await _conversation(conn)
    await service.end_conversation(conn, conversation_id, "error")
    with pytest.raises(errors.ConversationEnded, match="status error"):
        await service.append_turn(conn, conversation_id, turn, tool_result_max_bytes=10240)


async def test_delete_removes_children_without_relying_on_cascades(conn, db_connection):
    # Put the foreign keys back as revision 001 made them, without ON DELETE CASCADE (in this
    # test's transaction only): this passes only if the service deletes every level itself.
    for table, column, parent in (
        ("kraken_tool_calls", "turn_id", "kraken_turns"),
        ("kraken_turns", "conversation_id", "kraken_conversations"),
    ):
        await db_connection.exec_driver_sql(
            f"ALTER TABLE {table} DROP CONSTRAINT {table}_{column}_fkey,"
            f" ADD CONSTRAINT {table}_{column}_fkey FOREIGN KEY ({column}) REFERENCES {parent} (id)"
        )
    conversation_id = await _conversation(conn)
    turn = await _append(conn, conversation_id)

    await service.delete_conversation(conn, conversation_id)

    assert await rows(db_connection, "SELECT 1 FROM kraken_tool_calls WHERE turn_id = :id", id=turn.id) == []
    assert await rows(db_connection, "SELECT 1 FROM kraken_turns WHERE id = :id", id=turn.id) == []
    with pytest.raises(errors.ConversationNotFound):
        await service.delete_conversation(conn, conversation_id)


@each_served_schema
@pytest.mark.parametrize("group_by", ["model", "day"])
async def test_usage_reads_its_interval_from_the_created_at_index_on_either_form(conn, group_by):
    # The bounds are timestamptz whatever created_at is: compared with a timestamp column they
    # must still be conditions of its index (the cross-type operators of its b-tree family).
    await conn.execute("SET LOCAL enable_seqscan = off")
    start, end = datetime(2025, 3, 1, tzinfo=UTC), datetime(2025, 3, 2, tzinfo=UTC)
    explained = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {service.USAGE[group_by].sql}", start, end)
    [plan] = json.loads(explained) if isinstance(explained, str) else explained  # decoded by SQLAlchemy's codec

    def nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
        return [node, *(n for child in node.get("Plans", []) for n in nodes(child))]

    [scan] = [node for node in nodes(plan["Plan"]) if node.get("Index Name") == "ix_kraken_turns_created_at"]
    assert "created_at >=" in scan["Index Cond"]
    assert "created_at <" in scan["Index Cond"]


async def test_usage_of_an_empty_window_has_no_groups(conn):
    report = await service.usage(conn, datetime(1990, 1, 1), datetime(1990, 1, 2), "day")
    assert report.groups == []
