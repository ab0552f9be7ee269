"""Revision 002 on real databases: the rules it adds, the rows it keeps, the rows it refuses,
finishing a run that was interrupted, and a downgrade back to exactly the 001 schema."""

import asyncpg
import pytest

from backend.db.url import DatabaseTarget
from backend.tests.helpers import assert_schema_002, constraints, indexes, out, run_alembic, sql

C1, C2, C3 = (f"00000000-0000-0000-0000-0000000000c{i}" for i in (1, 2, 3))
T1, T2, T3, T4 = (f"00000000-0000-0000-0000-0000000000a{i}" for i in (1, 2, 3, 4))
K1, K2, K3 = (f"00000000-0000-0000-0000-0000000000b{i}" for i in (1, 2, 3))

TABLES = ("kraken_conversations", "kraken_turns", "kraken_tool_calls")


def schema(db: DatabaseTarget) -> tuple[object, ...]:
    """Everything about the tables that a revision could change, rows aside."""
    columns = sql(
        db,
        "SELECT table_name, column_name, data_type, is_nullable, column_default FROM information_schema.columns"
        " WHERE table_name LIKE 'kraken\\_%' ORDER BY 1, 2",
    )
    return constraints(db), indexes(db), [tuple(c) for c in columns]


def rows(db: DatabaseTarget) -> dict[str, list[tuple[object, ...]]]:
    return {t: [tuple(r) for r in sql(db, f"SELECT * FROM {t} ORDER BY id")] for t in TABLES}


def version(db: DatabaseTarget) -> list[str]:
    return [r[0] for r in sql(db, "SELECT version_num FROM alembic_version")]


def migrate(db: DatabaseTarget, *args: str) -> None:
    result = run_alembic(*args, target=db)
    assert result.returncode == 0, out(result)


def conversation(id_: str, **values: object) -> str:
    cols = {"id": id_, "session_id": "s", "model": "m", "system_prompt_hash": "h", "agent_version": "v", **values}
    return insert("kraken_conversations", cols)


def turn(id_: str, conversation_id: str, number: int, **values: object) -> str:
    cols = {
        "id": id_,
        "conversation_id": conversation_id,
        "turn_number": number,
        "user_query": "q",
        "assistant_response": "a",
        "model": "m",
        **values,
    }
    return insert("kraken_turns", cols)


def tool_call(id_: str, turn_id: str, order: int) -> str:
    cols = {"id": id_, "turn_id": turn_id, "tool_name": "search", "tool_args": "{}", "tool_result": "{}"}
    return insert("kraken_tool_calls", {**cols, "sequence_order": order})


def insert(table: str, values: dict[str, object]) -> str:
    literals = ", ".join(f"'{v}'" if isinstance(v, str) else str(v) for v in values.values())
    return f"INSERT INTO {table} ({', '.join(values)}) VALUES ({literals})"


VALID_ROWS = [
    conversation(C1, total_turns=2, total_tokens=30, total_cost_usd=0.5),
    conversation(C2),
    turn(T1, C1, 1, input_tokens=10, output_tokens=20, cost_usd=0.25, duration_ms=900, tool_calls_count=2),
    turn(T2, C1, 2),
    turn(T3, C2, 1),
    tool_call(K1, T1, 1),
    tool_call(K2, T1, 2),
    tool_call(K3, T3, 1),
]


def at_001_with(db: DatabaseTarget, statements: list[str]) -> None:
    migrate(db, "upgrade", "001")
    for statement in statements:
        sql(db, statement)


def test_upgrade_keeps_every_row_and_downgrade_restores_the_001_schema(empty_db: DatabaseTarget) -> None:
    at_001_with(empty_db, VALID_ROWS)
    schema_001, rows_before = schema(empty_db), rows(empty_db)

    migrate(empty_db, "upgrade", "002")
    assert version(empty_db) == ["002"]
    assert_schema_002(empty_db)
    assert rows(empty_db) == rows_before

    migrate(empty_db, "downgrade", "001")  # no data is lost, so no flag is needed
    assert version(empty_db) == ["001"]
    assert schema(empty_db) == schema_001
    assert rows(empty_db) == rows_before


def test_the_rules_hold_after_002(empty_db: DatabaseTarget) -> None:
    at_001_with(empty_db, VALID_ROWS)
    migrate(empty_db, "upgrade", "002")

    refused = {
        turn(T4, C1, 2): asyncpg.UniqueViolationError,  # turn number 2 of C1 exists
        tool_call("00000000-0000-0000-0000-0000000000b9", T1, 2): asyncpg.UniqueViolationError,
        turn(T4, C2, 2, input_tokens=-1): asyncpg.CheckViolationError,
        turn(T4, C2, 2, cost_usd=-0.01): asyncpg.CheckViolationError,
        turn(T4, C2, 2, duration_ms=-5): asyncpg.CheckViolationError,
        conversation(C3, total_tokens=-1): asyncpg.CheckViolationError,
    }
    for statement, error in refused.items():
        with pytest.raises(error):
            sql(empty_db, statement)

    sql(empty_db, f"DELETE FROM kraken_conversations WHERE id = '{C1}'")
    assert [r[0] for r in sql(empty_db, "SELECT id::text FROM kraken_turns")] == [T3]
    assert [r[0] for r in sql(empty_db, "SELECT id::text FROM kraken_tool_calls")] == [K3]


def test_rows_breaking_the_rules_stop_002_before_it_changes_anything(empty_db: DatabaseTarget) -> None:
    at_001_with(
        empty_db,
        [
            conversation(C1, total_tokens=-1),
            conversation(C2),
            turn(T1, C1, 1),
            turn(T2, C1, 1),  # the same turn number twice
            turn(T3, C2, 1, input_tokens=-5, cost_usd=-0.5),
            tool_call(K1, T1, 1),
            tool_call(K2, T1, 1),  # the same position twice
            # A tool call whose turn is gone, as a key created NOT VALID by hand would have allowed.
            "DO $$ BEGIN SET LOCAL session_replication_role = replica; "
            + tool_call(K3, "00000000-0000-0000-0000-0000000000ff", 1)
            + "; END $$",
        ],
    )
    schema_before, rows_before = schema(empty_db), rows(empty_db)

    result = run_alembic("upgrade", "head", target=empty_db)
    assert result.returncode != 0
    assert "Traceback" not in out(result)
    failed = [line for line in out(result).splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1, out(result)
    message = failed[0]
    assert "revision 002 changed nothing: 8 violation(s) of rules it adds" in message
    expected = {
        "kraken_turns: unique (conversation_id, turn_number): 2 row(s)": {T1, T2},
        "kraken_tool_calls: unique (turn_id, sequence_order): 2 row(s)": {K1, K2},
        "kraken_conversations: total_tokens >= 0: 1 row(s)": {C1},
        "kraken_turns: input_tokens >= 0: 1 row(s)": {T3},
        "kraken_turns: cost_usd >= 0: 1 row(s)": {T3},
        "kraken_tool_calls.turn_id references kraken_turns: 1 row(s)": {K3},
    }
    details = message.split("of rules it adds. ", 1)[1].split(". A revision never changes", 1)[0]
    listed = dict(entry.split(", list them with: ") for entry in details.split("; "))
    assert listed.keys() == expected.keys()
    for label, query in listed.items():
        # Each query lists exactly the rows that break its rule, id first.
        assert {str(r[0]) for r in sql(empty_db, query)} == expected[label], label
    assert "output_tokens" not in message  # rules nothing breaks are not mentioned

    assert version(empty_db) == ["001"]
    assert schema(empty_db) == schema_before  # no constraint, no index (not even an invalid one)
    assert rows(empty_db) == rows_before


def test_002_finishes_a_run_interrupted_half_way(empty_db: DatabaseTarget) -> None:
    at_001_with(
        empty_db,
        [
            *VALID_ROWS,
            # Where a killed run could have stopped: some steps done, one half done.
            "CREATE UNIQUE INDEX kraken_turns_conversation_id_turn_number_key ON kraken_turns"
            " (conversation_id, turn_number)",
            "ALTER TABLE kraken_turns ADD CONSTRAINT kraken_turns_conversation_id_turn_number_key"
            " UNIQUE USING INDEX kraken_turns_conversation_id_turn_number_key",
            "CREATE UNIQUE INDEX kraken_tool_calls_turn_id_sequence_order_key ON kraken_tool_calls"
            " (turn_id, sequence_order)",
            "ALTER TABLE kraken_conversations ADD CONSTRAINT kraken_conversations_total_turns_check"
            " CHECK (total_turns >= 0) NOT VALID",
            "ALTER TABLE kraken_turns ADD CONSTRAINT kraken_turns_conversation_id_fkey_new FOREIGN KEY"
            " (conversation_id) REFERENCES kraken_conversations (id) ON DELETE CASCADE NOT VALID",
        ],
    )
    rows_before = rows(empty_db)
    migrate(empty_db, "upgrade", "002")
    assert_schema_002(empty_db)
    assert rows(empty_db) == rows_before
