"""Revision 001 on a real database: exact schema, idempotence, and adopting existing databases."""

import pytest

from backend.db.url import DatabaseTarget
from backend.tests.helpers import out, run_alembic, sql

V, TS, M = "character varying", "timestamp without time zone", "numeric(10,6)"
# (type, nullable, default) per column, spelled out from the design notes, not from the revision.
SEED_SCHEMA: dict[str, dict[str, tuple[str, bool, str | None]]] = {
    "kraken_conversations": {
        "id": ("uuid", False, "gen_random_uuid()"),
        "session_id": (V, False, None),
        "model": (V, False, None),
        "system_prompt_hash": (f"{V}(16)", False, None),
        "agent_version": (V, False, None),
        "status": (V, False, "'active'::character varying"),
        "started_at": (TS, False, "now()"),
        "ended_at": (TS, True, None),
        "total_turns": ("integer", False, "0"),
        "total_tokens": ("integer", False, "0"),
        "total_cost_usd": (M, False, "0"),
    },
    "kraken_turns": {
        "id": ("uuid", False, "gen_random_uuid()"),
        "conversation_id": ("uuid", False, None),
        "turn_number": ("integer", False, None),
        "user_query": ("text", False, None),
        "assistant_response": ("text", False, None),
        "input_tokens": ("integer", False, "0"),
        "output_tokens": ("integer", False, "0"),
        "cost_usd": (M, False, "0"),
        "duration_ms": ("integer", False, "0"),
        "tool_calls_count": ("integer", False, "0"),
        "cache_creation_tokens": ("integer", False, "0"),
        "cache_read_tokens": ("integer", False, "0"),
        "model": (V, False, None),
        "created_at": (TS, False, "now()"),
    },
    "kraken_tool_calls": {
        "id": ("uuid", False, "gen_random_uuid()"),
        "turn_id": ("uuid", False, None),
        "tool_name": (V, False, None),
        "tool_args": ("jsonb", False, None),
        "tool_result": ("jsonb", False, None),
        "result_truncated": ("boolean", False, "false"),
        "sequence_order": ("integer", False, None),
    },
}
SEED_FOREIGN_KEYS = {
    ("kraken_turns", "conversation_id", "kraken_conversations", "id"),
    ("kraken_tool_calls", "turn_id", "kraken_turns", "id"),
}
SEED_INDEXES = {
    ("kraken_conversations", "session_id"),
    ("kraken_turns", "conversation_id"),
    ("kraken_tool_calls", "turn_id"),
}


def columns(db: DatabaseTarget, table: str) -> dict[str, tuple[str, bool, str | None]]:
    rows = sql(
        db,
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod), NOT a.attnotnull, pg_get_expr(d.adbin, d.adrelid)"
        " FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum"
        " WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped",
        table,
    )
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def foreign_keys(db: DatabaseTarget) -> set[tuple[str, str, str, str]]:
    rows = sql(
        db,
        "SELECT c.conrelid::regclass::text, a.attname, c.confrelid::regclass::text, af.attname"
        " FROM pg_constraint c"
        " JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]"
        " JOIN pg_attribute af ON af.attrelid = c.confrelid AND af.attnum = c.confkey[1]"
        " WHERE c.contype = 'f' AND c.conrelid::regclass::text LIKE 'kraken_%'",
    )
    return {(r[0], r[1], r[2], r[3]) for r in rows}


def single_column_indexes(db: DatabaseTarget) -> set[tuple[str, str]]:
    rows = sql(
        db,
        "SELECT i.indrelid::regclass::text, a.attname FROM pg_index i"
        " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]"
        " WHERE i.indnkeyatts = 1 AND NOT i.indisprimary AND i.indrelid::regclass::text LIKE 'kraken_%'",
    )
    return {(r[0], r[1]) for r in rows}


def primary_keys(db: DatabaseTarget) -> set[str]:
    rows = sql(db, "SELECT conrelid::regclass::text FROM pg_constraint WHERE contype = 'p'")
    return {r[0] for r in rows}


def count(db: DatabaseTarget, table: str) -> int:
    return int(sql(db, f"SELECT count(*) FROM {table}")[0][0])


def version(db: DatabaseTarget) -> list[str]:
    return [r[0] for r in sql(db, "SELECT version_num FROM alembic_version")]


def upgrade(db: DatabaseTarget) -> None:
    # These tests are about the baseline: later revisions have tests of their own.
    result = run_alembic("upgrade", "001", target=db)
    assert result.returncode == 0, result.stderr


def assert_seed_schema(db: DatabaseTarget) -> None:
    for table, expected in SEED_SCHEMA.items():
        assert columns(db, table) == expected, table
    assert primary_keys(db) >= set(SEED_SCHEMA)
    assert foreign_keys(db) == SEED_FOREIGN_KEYS
    assert single_column_indexes(db) >= SEED_INDEXES


def test_empty_database_gets_exactly_the_seed_schema(empty_db: DatabaseTarget) -> None:
    upgrade(empty_db)
    assert_seed_schema(empty_db)
    assert version(empty_db) == ["001"]
    # gen_random_uuid() and the other defaults work for a minimal insert.
    sql(
        empty_db,
        "INSERT INTO kraken_conversations (session_id, model, system_prompt_hash, agent_version)"
        " VALUES ('s', 'm', 'h', 'v')",
    )
    row = sql(
        empty_db,
        "SELECT status, total_turns, total_cost_usd, started_at IS NOT NULL FROM kraken_conversations",
    )
    assert tuple(row[0]) == ("active", 0, 0, True)


def test_second_upgrade_is_a_no_op(empty_db: DatabaseTarget) -> None:
    upgrade(empty_db)
    before = {t: columns(empty_db, t) for t in SEED_SCHEMA}
    result = run_alembic("upgrade", "001", target=empty_db)
    assert result.returncode == 0, result.stderr
    assert "applied revision" not in out(result)
    assert {t: columns(empty_db, t) for t in SEED_SCHEMA} == before
    assert version(empty_db) == ["001"]


def test_downgrade_then_upgrade(empty_db: DatabaseTarget) -> None:
    upgrade(empty_db)
    result = run_alembic("downgrade", "-1", target=empty_db)
    assert result.returncode == 0, result.stderr
    assert version(empty_db) == []
    assert sql(empty_db, "SELECT to_regclass('kraken_turns') IS NULL")[0][0]
    upgrade(empty_db)
    assert_seed_schema(empty_db)


# Pre-migration databases: the tables as the app created them before Alembic, with rows in them.
LEGACY_DDL = [
    "CREATE TABLE kraken_conversations (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), session_id varchar NOT NULL,"
    " model varchar NOT NULL, system_prompt_hash varchar(16) NOT NULL, agent_version varchar NOT NULL,"
    " status varchar NOT NULL DEFAULT 'active', started_at timestamp NOT NULL DEFAULT now(), ended_at timestamp,"
    " total_turns integer NOT NULL DEFAULT 0, total_tokens integer NOT NULL DEFAULT 0,"
    " total_cost_usd numeric(10,6) NOT NULL DEFAULT 0)",
    "CREATE TABLE kraken_turns (id uuid PRIMARY KEY DEFAULT gen_random_uuid(),"
    " conversation_id uuid NOT NULL REFERENCES kraken_conversations(id), turn_number integer NOT NULL,"
    " user_query text NOT NULL, assistant_response text NOT NULL, input_tokens integer NOT NULL DEFAULT 0,"
    " output_tokens integer NOT NULL DEFAULT 0, cost_usd numeric(10,6) NOT NULL DEFAULT 0,"
    " duration_ms integer NOT NULL DEFAULT 0, tool_calls_count integer NOT NULL DEFAULT 0,"
    " cache_creation_tokens integer NOT NULL DEFAULT 0, cache_read_tokens integer NOT NULL DEFAULT 0,"
    " model varchar NOT NULL, created_at timestamp NOT NULL DEFAULT now())",
    "CREATE TABLE kraken_tool_calls (id uuid PRIMARY KEY DEFAULT gen_random_uuid(),"
    " turn_id uuid NOT NULL REFERENCES kraken_turns(id), tool_name varchar NOT NULL, tool_args jsonb NOT NULL,"
    " tool_result jsonb NOT NULL, result_truncated boolean NOT NULL DEFAULT false, sequence_order integer NOT NULL)",
]
ROWS = [
    "INSERT INTO kraken_conversations (id, session_id, model, system_prompt_hash, agent_version)"
    " VALUES ('00000000-0000-0000-0000-000000000001', 's1', 'm', 'h', 'v'),"
    " ('00000000-0000-0000-0000-000000000002', 's2', 'm', 'h', 'v')",
    "INSERT INTO kraken_turns (id, conversation_id, turn_number, user_query, assistant_response, model)"
    " VALUES ('00000000-0000-0000-0000-00000000000a', '00000000-0000-0000-0000-000000000001', 1, 'q', 'a', 'm')",
    "INSERT INTO kraken_tool_calls (turn_id, tool_name, tool_args, tool_result, sequence_order)"
    " VALUES ('00000000-0000-0000-0000-00000000000a', 'search', '{}', '{\"hits\": 3}', 1)",
]


def make_legacy(db: DatabaseTarget, ddl: list[str]) -> dict[str, int]:
    for statement in ddl:
        sql(db, statement)
    present = [t for t in SEED_SCHEMA if sql(db, "SELECT to_regclass($1) IS NOT NULL", t)[0][0]]
    for statement in ROWS[: len(present)]:
        sql(db, statement)
    return {t: count(db, t) for t in present}


def test_adopts_tables_created_before_migrations(empty_db: DatabaseTarget) -> None:
    before = make_legacy(empty_db, LEGACY_DDL)
    assert before == {"kraken_conversations": 2, "kraken_turns": 1, "kraken_tool_calls": 1}
    upgrade(empty_db)
    assert {t: count(empty_db, t) for t in before} == before
    assert_seed_schema(empty_db)
    assert version(empty_db) == ["001"]


def test_completes_a_half_created_database(empty_db: DatabaseTarget) -> None:
    # Conversations and turns exist (turns without its index); tool calls were never created.
    before = make_legacy(empty_db, LEGACY_DDL[:2])
    assert before == {"kraken_conversations": 2, "kraken_turns": 1}
    upgrade(empty_db)
    assert {t: count(empty_db, t) for t in before} == before
    assert_seed_schema(empty_db)


def test_adds_missing_columns_with_their_defaults_and_keeps_rows(empty_db: DatabaseTarget) -> None:
    # An older app: no cache token columns, no agent_version/status, a narrower varchar, no FK.
    older = [
        LEGACY_DDL[0]
        .replace(" agent_version varchar NOT NULL,", "")
        .replace(" status varchar NOT NULL DEFAULT 'active',", "")
        .replace("session_id varchar NOT NULL", "session_id varchar(64) NOT NULL"),
        LEGACY_DDL[1]
        .replace(
            " cache_creation_tokens integer NOT NULL DEFAULT 0, cache_read_tokens integer NOT NULL DEFAULT 0,",
            "",
        )
        .replace("REFERENCES kraken_conversations(id)", ""),
        LEGACY_DDL[2].replace(" result_truncated boolean NOT NULL DEFAULT false,", ""),
    ]
    for statement in older:
        sql(empty_db, statement)
    sql(
        empty_db,
        "INSERT INTO kraken_conversations (id, session_id, model, system_prompt_hash)"
        " VALUES ('00000000-0000-0000-0000-000000000001', 's1', 'm', 'h')",
    )
    sql(empty_db, ROWS[1])
    sql(empty_db, ROWS[2])

    result = run_alembic("upgrade", "head", target=empty_db)
    # agent_version has no default, and a row exists: that cannot be filled in safely.
    assert result.returncode != 0
    assert "kraken_conversations.agent_version is missing" in out(result)
    assert "Traceback" not in out(result)
    assert version_table_absent(empty_db)
    assert "status" not in columns(empty_db, "kraken_conversations")  # nothing was changed

    # Once the operator adds the column by hand, everything else is filled in by the baseline.
    sql(empty_db, "ALTER TABLE kraken_conversations ADD COLUMN agent_version varchar")
    sql(empty_db, "UPDATE kraken_conversations SET agent_version = 'legacy'")
    upgrade(empty_db)
    assert_seed_schema(empty_db)
    assert {t: count(empty_db, t) for t in SEED_SCHEMA} == dict.fromkeys(SEED_SCHEMA, 1)
    row = sql(empty_db, "SELECT status, agent_version FROM kraken_conversations")[0]
    assert tuple(row) == ("active", "legacy")
    turn = sql(empty_db, "SELECT cache_creation_tokens, cache_read_tokens FROM kraken_turns")[0]
    assert tuple(turn) == (0, 0)
    assert sql(empty_db, "SELECT result_truncated FROM kraken_tool_calls")[0][0] is False


def version_table_absent(db: DatabaseTarget) -> bool:
    return bool(sql(db, "SELECT to_regclass('alembic_version') IS NULL")[0][0])


@pytest.mark.parametrize(
    ("ddl_change", "data", "message"),
    [
        (
            ("total_tokens integer", "total_tokens bigint"),
            None,
            "kraken_conversations.total_tokens is bigint, the baseline has integer",
        ),
        (
            ("tool_args jsonb", "tool_args json"),
            None,
            "kraken_tool_calls.tool_args is json, the baseline has jsonb",
        ),
        (
            ("model varchar NOT NULL, created_at", "model varchar, created_at"),
            "INSERT INTO kraken_turns (conversation_id, turn_number, user_query, assistant_response)"
            " VALUES ('00000000-0000-0000-0000-000000000002', 2, 'q', 'a')",
            "kraken_turns.model is NOT NULL in the baseline but 1 row(s) hold NULL",
        ),
    ],
)
def test_unsafe_differences_stop_the_upgrade_and_change_nothing(
    empty_db: DatabaseTarget, ddl_change: tuple[str, str], data: str | None, message: str
) -> None:
    old, new = ddl_change
    ddl = [statement.replace(old, new) for statement in LEGACY_DDL]
    before = make_legacy(empty_db, ddl)
    if data:
        sql(empty_db, data)
        before["kraken_turns"] += 1
    # Also leave an index missing and a default unset: neither may be fixed on a failed run.
    sql(empty_db, "ALTER TABLE kraken_conversations ALTER COLUMN status DROP DEFAULT")
    snapshot = {t: columns(empty_db, t) for t in SEED_SCHEMA}

    result = run_alembic("upgrade", "head", target=empty_db)
    assert result.returncode != 0
    error_lines = [line for line in out(result).splitlines() if line.startswith("FAILED")]
    assert len(error_lines) == 1
    assert message in error_lines[0]
    assert "Traceback" not in out(result)
    assert {t: columns(empty_db, t) for t in SEED_SCHEMA} == snapshot
    assert {t: count(empty_db, t) for t in before} == before
    assert single_column_indexes(empty_db) == set()
    assert version_table_absent(empty_db)


def test_orphaned_rows_block_the_missing_foreign_key(empty_db: DatabaseTarget) -> None:
    ddl = [LEGACY_DDL[0], LEGACY_DDL[1].replace("REFERENCES kraken_conversations(id)", "")]
    make_legacy(empty_db, ddl)
    sql(
        empty_db,
        "INSERT INTO kraken_turns (conversation_id, turn_number, user_query, assistant_response, model)"
        " VALUES ('00000000-0000-0000-0000-0000000000ff', 1, 'q', 'a', 'm')",
    )
    result = run_alembic("upgrade", "head", target=empty_db)
    assert result.returncode != 0
    assert "kraken_turns has 1 row(s) whose conversation_id matches no row of kraken_conversations" in out(result)
    assert count(empty_db, "kraken_turns") == 2
    assert sql(empty_db, "SELECT to_regclass('kraken_tool_calls') IS NULL")[0][0]


def test_a_table_without_an_id_column_gets_one_and_its_primary_key(empty_db: DatabaseTarget) -> None:
    sql(empty_db, LEGACY_DDL[0].replace("id uuid PRIMARY KEY DEFAULT gen_random_uuid(), ", ""))
    sql(
        empty_db,
        "INSERT INTO kraken_conversations (session_id, model, system_prompt_hash, agent_version)"
        " VALUES ('s1', 'm', 'h', 'v'), ('s2', 'm', 'h', 'v')",
    )
    result = run_alembic("upgrade", "001", target=empty_db)
    assert result.returncode == 0, out(result)
    assert count(empty_db, "kraken_conversations") == 2
    assert sql(empty_db, "SELECT count(DISTINCT id) FROM kraken_conversations")[0][0] == 2
    assert "kraken_conversations" in primary_keys(empty_db)
    assert_seed_schema(empty_db)
