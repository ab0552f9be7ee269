"""The feedback revision (issue 20, 010): kraken_feedback, one row per turn, cascading from its turn
and its conversation, its type a CHECK; online and offline (--sql) alike. Its downgrade refuses to
drop feedback without -x allow_data_loss=true."""

import asyncio

import asyncpg
import pytest

from backend.db.url import DatabaseTarget
from backend.tests.helpers import (
    CONSTRAINTS_FEEDBACK_ADDS,
    INDEXES_FEEDBACK_ADDS,
    constraints,
    execute_script,
    indexes,
    out,
    run_alembic,
    sql,
)

REVISION = "010"
BEFORE = "009"
POST_DEPLOY = ("-x", "phase=post-deploy")

CONVERSATION = (
    "INSERT INTO kraken_conversations (session_id, model, system_prompt_hash, agent_version)"
    " VALUES ('s', 'm', 'h', 'v') RETURNING id"
)
TURN = (
    "INSERT INTO kraken_turns (conversation_id, turn_number, user_query, assistant_response, model)"
    " VALUES ($1, $2, 'q', 'a', 'm') RETURNING id"
)
FEEDBACK = "INSERT INTO kraken_feedback (turn_id, conversation_id, feedback_type) VALUES ($1, $2, $3) RETURNING id"


def migrate(db: DatabaseTarget, *args: str) -> None:
    # Through the post-deploy phase: BEFORE (009, the timestamptz contract) is a post-deploy revision.
    result = run_alembic(*POST_DEPLOY, *args, target=db)
    assert result.returncode == 0, out(result)


def has_feedback(db: DatabaseTarget) -> bool:
    return bool(sql(db, "SELECT to_regclass('kraken_feedback') IS NOT NULL")[0][0])


def version(db: DatabaseTarget) -> str:
    return str(sql(db, "SELECT version_num FROM alembic_version")[0][0])


def a_turn(db: DatabaseTarget, number: int = 1, conversation: object = None) -> tuple[object, object]:
    """(conversation id, turn id) of a new turn, in a new conversation unless one is given."""
    if conversation is None:
        [(conversation,)] = sql(db, CONVERSATION)
    [(turn,)] = sql(db, TURN, conversation, number)
    return conversation, turn


def assert_feedback_schema(db: DatabaseTarget) -> None:
    found = constraints(db)
    assert {key: found.get(key) for key in CONSTRAINTS_FEEDBACK_ADDS} == {
        key: (definition, True) for key, definition in CONSTRAINTS_FEEDBACK_ADDS.items()
    }
    found_indexes = indexes(db)
    assert {name: found_indexes.get(name) for name in INDEXES_FEEDBACK_ADDS} == {
        name: (columns, True) for name, columns in INDEXES_FEEDBACK_ADDS.items()
    }


def assert_rules_hold(db: DatabaseTarget) -> None:
    """One row per turn, its type one of two, and it goes with its turn and with its conversation."""
    conversation, turn = a_turn(db)
    _, second = a_turn(db, 2, conversation)
    [(feedback,)] = sql(db, FEEDBACK, turn, conversation, "positive")
    [(created, updated, comment, trace)] = sql(
        db, "SELECT created_at, updated_at, comment, trace_id FROM kraken_feedback WHERE id = $1", feedback
    )
    assert created is not None
    assert updated == created
    assert (comment, trace) == (None, None)
    with pytest.raises(asyncpg.UniqueViolationError):
        sql(db, FEEDBACK, turn, conversation, "negative")
    with pytest.raises(asyncpg.CheckViolationError):
        sql(db, FEEDBACK, second, conversation, "meh")
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        sql(db, FEEDBACK, conversation, conversation, "negative")  # no turn has that id
    sql(db, FEEDBACK, second, conversation, "negative")

    sql(db, "DELETE FROM kraken_turns WHERE id = $1", turn)
    assert sql(db, "SELECT turn_id FROM kraken_feedback WHERE conversation_id = $1", conversation) == [(second,)]
    sql(db, "DELETE FROM kraken_conversations WHERE id = $1", conversation)
    assert sql(db, "SELECT count(*) FROM kraken_feedback") == [(0,)]


def test_the_table_takes_one_feedback_per_turn_and_goes_with_its_turn_and_conversation(
    empty_db: DatabaseTarget,
) -> None:
    migrate(empty_db, "upgrade", BEFORE)
    conversation, turn = a_turn(empty_db)  # rows already there: the foreign keys validate over them

    migrate(empty_db, "upgrade", REVISION)

    assert version(empty_db) == REVISION
    assert_feedback_schema(empty_db)
    assert_rules_hold(empty_db)
    assert sql(empty_db, "SELECT count(*) FROM kraken_turns WHERE id = $1", turn) == [(1,)]


def test_the_downgrade_refuses_to_lose_feedback_without_the_flag(empty_db: DatabaseTarget) -> None:
    migrate(empty_db, "upgrade", REVISION)
    conversation, turn = a_turn(empty_db)
    sql(empty_db, FEEDBACK, turn, conversation, "positive")

    refused = run_alembic(*POST_DEPLOY, "downgrade", BEFORE, target=empty_db)

    assert refused.returncode != 0
    [failed] = [line for line in out(refused).splitlines() if line.startswith("FAILED")]
    assert "kraken_feedback (1 row(s))" in failed, failed
    assert "allow_data_loss=true" in failed, failed
    assert has_feedback(empty_db)
    assert version(empty_db) == REVISION

    migrate(empty_db, "-x", "allow_data_loss=true", "downgrade", BEFORE)
    assert not has_feedback(empty_db)
    assert version(empty_db) == BEFORE
    assert sql(empty_db, "SELECT count(*) FROM kraken_turns") == [(1,)]


def test_with_nothing_to_lose_the_downgrade_needs_no_flag_and_upgrades_again(empty_db: DatabaseTarget) -> None:
    migrate(empty_db, "upgrade", REVISION)
    a_turn(empty_db)
    migrate(empty_db, "downgrade", BEFORE)
    assert not has_feedback(empty_db)
    migrate(empty_db, "upgrade", REVISION)
    assert_feedback_schema(empty_db)


def test_the_offline_sql_does_what_the_online_run_does(empty_db: DatabaseTarget) -> None:
    migrate(empty_db, "upgrade", BEFORE)
    a_turn(empty_db)
    generated = run_alembic("upgrade", f"{BEFORE}:{REVISION}", "--sql", target=None)
    assert generated.returncode == 0, out(generated)
    # Each foreign key in a transaction of its own, its referenced table locked first, then validated.
    for parent, key in (("kraken_turns", "turn_id"), ("kraken_conversations", "conversation_id")):
        lock = generated.stdout.index(f'LOCK TABLE "{parent}" IN SHARE ROW EXCLUSIVE MODE')
        add = generated.stdout.index(f'ADD CONSTRAINT "kraken_feedback_{key}_fkey"')
        validate = generated.stdout.index(f'VALIDATE CONSTRAINT "kraken_feedback_{key}_fkey"')
        assert lock < add < validate
        assert "NOT VALID" in generated.stdout[add:validate]
    asyncio.run(execute_script(empty_db, generated.stdout))
    assert version(empty_db) == REVISION
    assert_feedback_schema(empty_db)
    assert_rules_hold(empty_db)

    conversation, turn = a_turn(empty_db)
    sql(empty_db, FEEDBACK, turn, conversation, "positive")
    back = run_alembic("downgrade", f"{REVISION}:{BEFORE}", "--sql", target=None)
    assert back.returncode == 0, out(back)
    with pytest.raises(asyncpg.PostgresError, match="allow_data_loss"):
        asyncio.run(execute_script(empty_db, back.stdout))  # the refusal comes before the drop
    assert has_feedback(empty_db)
    sql(empty_db, "DELETE FROM kraken_feedback")
    asyncio.run(execute_script(empty_db, back.stdout))
    assert not has_feedback(empty_db)
    assert version(empty_db) == BEFORE
