"""A real upgrade to head, as the deploy runs it (`alembic upgrade head` before the restart, then
`alembic -x phase=post-deploy upgrade head`), and the schema it leaves: tables, columns, indexes
and foreign keys. On DATABASE_URL's server when it is set, otherwise on
the embedded PostgreSQL.

    cd backend && uv run pytest tests/test_migrations.py -v

The columns are compared with the models (backend/models.py), each type as PostgreSQL itself
spells the model's; the constraints and indexes with the lists spelled out from the issues that
asked for them (backend/tests/helpers.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy.dialects import postgresql

from backend.db.engine import connect
from backend.db.url import DatabaseTarget
from backend.migrations import ops
from backend.models import Base
from backend.tests.helpers import (
    EXPECTED_CONSTRAINTS_HEAD,
    EXPECTED_INDEXES_010,
    EXPECTED_INDEXES_HEAD,
    HEAD,
    NEXT,
    POST_DEPLOY_UPGRADE,
    SERVED,
    assert_indexes,
    constraints,
    out,
    run_alembic,
    scratch_alembic,
    sql,
    trailing_post_deploy,
)

TABLES = ("kraken_conversations", "kraken_turns", "kraken_tool_calls", "kraken_users", "kraken_feedback")
# The columns the original design lists for each table.
SEED_COLUMNS = {
    "kraken_conversations": {
        "id", "session_id", "model", "system_prompt_hash", "agent_version", "status", "started_at", "ended_at",
        "total_turns", "total_tokens", "total_cost_usd",
    },
    "kraken_turns": {
        "id", "conversation_id", "turn_number", "user_query", "assistant_response", "input_tokens", "output_tokens",
        "cost_usd", "duration_ms", "tool_calls_count", "cache_creation_tokens", "cache_read_tokens", "model",
        "created_at",
    },
    "kraken_tool_calls": {
        "id", "turn_id", "tool_name", "tool_args", "tool_result", "result_truncated", "sequence_order",
    },
    # Issue 20's.
    "kraken_users": {"id", "api_key_hash", "name", "created_at", "last_active", "is_active"},
    "kraken_feedback": {
        "id", "turn_id", "conversation_id", "feedback_type", "comment", "trace_id", "created_at", "updated_at",
    },
}  # fmt: skip
COLUMNS = """
SELECT attname, format_type(atttypid, atttypmod), attnotnull FROM pg_attribute
WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped
"""


@pytest.fixture(scope="module")
def upgraded(database_factory: Callable[[], DatabaseTarget]) -> DatabaseTarget:
    """A new database brought to head by the alembic CLI, through both phases."""
    db = database_factory()
    for phase in (("upgrade", "head"), POST_DEPLOY_UPGRADE):
        result = run_alembic(*phase, target=db)
        assert result.returncode == 0, out(result)
    return db


def columns(db: DatabaseTarget, table: str) -> dict[str, tuple[str, bool]]:
    """column -> (its type as PostgreSQL prints it, NOT NULL)"""
    return {name: (kind, not_null) for name, kind, not_null in sql(db, COLUMNS, table)}


def model_columns(db: DatabaseTarget, table: str) -> dict[str, tuple[str, bool]]:
    """The model's columns, each type compiled for PostgreSQL and printed back by the server
    (a temporary table of those types: ``VARCHAR(16)`` comes back as ``character varying(16)``)."""
    model = Base.metadata.tables[table]
    dialect = postgresql.dialect()
    probe = ", ".join(f'"{c.name}" {c.type.compile(dialect=dialect)}' for c in model.columns)

    async def printed() -> list[tuple[str, str]]:
        conn = await connect(db)
        try:
            await conn.execute(f"CREATE TEMPORARY TABLE probe ({probe})")
            return [(r[0], r[1]) for r in await conn.fetch(COLUMNS.replace("attnotnull", "false"), "probe")]
        finally:
            await conn.close()

    return {name: (kind, not model.columns[name].nullable) for name, kind in asyncio.run(printed())}


def test_the_pre_deploy_phase_runs_the_earlier_post_deploy_revisions_first_on_an_empty_database(
    empty_db: DatabaseTarget,
) -> None:
    # 007 and 009 (post-deploy, earlier releases') run first: 008 and 010 (pre-deploy) follow them.
    result = run_alembic("upgrade", "head", target=empty_db)
    assert result.returncode == 0, out(result)
    for post_deploy in ("007", "009"):
        assert f"running post-deploy revision {post_deploy} of an earlier release before pre-deploy revision 010" in (
            out(result)
        )
    assert [r[0] for r in sql(empty_db, "SELECT version_num FROM alembic_version")] == [SERVED]
    assert SERVED == HEAD == "010"  # no post-deploy revision trails it
    assert "stopping before post-deploy" not in out(result)
    assert_indexes(empty_db, EXPECTED_INDEXES_010)


TRAILING_POST_DEPLOY = trailing_post_deploy(
    "post-deploy, after head",
    "CREATE INDEX kraken_trailing_post ON kraken_users (name)",
    "DROP INDEX kraken_trailing_post",
)


def test_the_pre_deploy_phase_stops_before_the_post_deploy_revisions(empty_db: DatabaseTarget, tmp_path: Path) -> None:
    ini = scratch_alembic(tmp_path, {f"{NEXT}_post.py": TRAILING_POST_DEPLOY})
    result = run_alembic("upgrade", "head", target=empty_db, config=ini)
    assert result.returncode == 0, out(result)
    assert f"stopping before post-deploy revision(s) {NEXT}" in out(result)
    assert [r[0] for r in sql(empty_db, "SELECT version_num FROM alembic_version")] == [HEAD]
    assert_indexes(empty_db, EXPECTED_INDEXES_HEAD)
    assert sql(empty_db, "SELECT to_regclass('kraken_trailing_post') IS NULL")[0][0]
    second = run_alembic(*POST_DEPLOY_UPGRADE, target=empty_db, config=ini)
    assert second.returncode == 0, out(second)
    assert [r[0] for r in sql(empty_db, "SELECT version_num FROM alembic_version")] == [NEXT]
    assert sql(empty_db, "SELECT to_regclass('kraken_trailing_post') IS NOT NULL")[0][0]


def test_the_upgrade_reaches_head(upgraded: DatabaseTarget) -> None:
    current = run_alembic("current", target=upgraded)
    assert current.returncode == 0, out(current)
    assert current.stdout.strip() == f"{HEAD} (head)"


def test_the_tables_are_there(upgraded: DatabaseTarget) -> None:
    found = {row[0] for row in sql(upgraded, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {*TABLES, "alembic_version", "alembic_ledger"} <= found


@pytest.mark.parametrize("table", TABLES)
def test_every_column_of_the_design_is_there(upgraded: DatabaseTarget, table: str) -> None:
    assert SEED_COLUMNS[table] <= set(columns(upgraded, table))


@pytest.mark.parametrize("table", TABLES)
def test_the_columns_are_the_models_with_their_types_and_nullability(upgraded: DatabaseTarget, table: str) -> None:
    # Besides a type change's copies (007's <column>__old), which the models leave out until it ends.
    found = {name: kind for name, kind in columns(upgraded, table).items() if not ops.helper_owned(name)}
    assert found == model_columns(upgraded, table)


def test_the_constraints_and_foreign_keys_are_there_and_validated(upgraded: DatabaseTarget) -> None:
    found = constraints(upgraded)
    assert {key: definition for key, (definition, _) in found.items()} == EXPECTED_CONSTRAINTS_HEAD
    assert all(validated for _, validated in found.values())
    foreign = {key: d for key, (d, _) in found.items() if d.startswith("FOREIGN KEY")}
    assert foreign == {
        ("kraken_turns", "kraken_turns_conversation_id_fkey"): (
            "FOREIGN KEY (conversation_id) REFERENCES kraken_conversations(id) ON DELETE CASCADE"
        ),
        ("kraken_tool_calls", "kraken_tool_calls_turn_id_fkey"): (
            "FOREIGN KEY (turn_id) REFERENCES kraken_turns(id) ON DELETE CASCADE"
        ),
        ("kraken_conversations", "kraken_conversations_user_id_fkey"): (
            "FOREIGN KEY (user_id) REFERENCES kraken_users(id)"
        ),
        ("kraken_feedback", "kraken_feedback_turn_id_fkey"): (
            "FOREIGN KEY (turn_id) REFERENCES kraken_turns(id) ON DELETE CASCADE"
        ),
        ("kraken_feedback", "kraken_feedback_conversation_id_fkey"): (
            "FOREIGN KEY (conversation_id) REFERENCES kraken_conversations(id) ON DELETE CASCADE"
        ),
    }


def test_the_indexes_are_there_and_valid(upgraded: DatabaseTarget) -> None:
    assert_indexes(upgraded, EXPECTED_INDEXES_HEAD)


def test_a_second_upgrade_changes_nothing(upgraded: DatabaseTarget) -> None:
    before = {table: columns(upgraded, table) for table in TABLES}, constraints(upgraded)
    for phase in (("upgrade", "head"), POST_DEPLOY_UPGRADE):
        again = run_alembic(*phase, target=upgraded)
        assert again.returncode == 0, out(again)
    assert ({table: columns(upgraded, table) for table in TABLES}, constraints(upgraded)) == before


def test_a_test_that_migrates_from_empty_is_slow_unmarked(request: pytest.FixtureRequest, empty_db: object) -> None:
    """conftest's rule: the fast loop (-m "not slow") leaves out every test that takes empty_db."""
    assert request.node.get_closest_marker("slow") is not None
