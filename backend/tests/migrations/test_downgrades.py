"""Every revision goes up, down and up again on a database with rows; downgrades that would lose
rows refuse unless the operator says so."""

import re
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg
import pytest
from alembic.script import ScriptDirectory

from backend.db.url import DatabaseTarget
from backend.migrations import ops
from backend.migrations.revisions import alembic_config
from backend.tests.helpers import fetch, out, run_alembic, sql

TABLES = ("kraken_conversations", "kraken_turns", "kraken_tool_calls")
# Rows every revision so far accepts: a conversation with two turns and a tool call on each, its
# totals those of its turns (005 rewrites totals that are not). A revision that adds a column
# without a default extends this.
SEED = """
WITH c AS (
    INSERT INTO kraken_conversations (session_id, model, system_prompt_hash, agent_version, total_turns)
    VALUES ('stairway', 'm', 'h', 'v', 2) RETURNING id
), t AS (
    INSERT INTO kraken_turns (conversation_id, turn_number, user_query, assistant_response, model)
    SELECT id, n, 'q', 'a', 'm' FROM c, generate_series(1, 2) AS n RETURNING id
)
INSERT INTO kraken_tool_calls (turn_id, tool_name, tool_args, tool_result, sequence_order)
SELECT id, 'search', '{}', '{}', 1 FROM t
"""


def revisions() -> list[tuple[str, str | None]]:
    """(revision, the revision it follows), base first."""
    script = ScriptDirectory.from_config(alembic_config())
    steps = []
    for step in reversed(list(script.walk_revisions())):
        assert step.down_revision is None or isinstance(step.down_revision, str), "a merge revision"
        steps.append((step.revision, step.down_revision))
    return steps


Rows = dict[str, list[dict[str, str | None]]]


def comparable(value: object) -> str | None:
    """A value as text that is equal for equal values whatever the column's type: an instant as
    naive UTC (a timestamptz and the timestamp holding its UTC wall-clock time name the same one),
    a number in its shortest form (numeric(10,6)'s 1.500000 is 1.5, as are an int or a float of
    it), NULL as None, anything else as text."""
    if value is None:
        return None
    if isinstance(value, datetime):
        instant = value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo is not None else value
        return instant.isoformat()
    if isinstance(value, int | float | Decimal) and not isinstance(value, bool):
        number = Decimal(str(value)).normalize()
        return f"{number:f}"
    return str(value)


def copy_of(column: str) -> str | None:
    """The column a type change's copy (``<column>__new``, ``<column>__old``) holds the values of."""
    return column.rsplit("__", 1)[0] if ops.helper_owned(column) else None


def rows(db: DatabaseTarget, tables: tuple[str, ...] = TABLES) -> Rows:
    """Every row of the tables there are, as {column: comparable(value)}; a type change's copy of a
    column (which its steps add, rename and drop) must hold that column's values, and is left out."""
    present = [t for t in tables if sql(db, "SELECT to_regclass($1) IS NOT NULL", t)[0][0]]
    found: Rows = {}
    for t in present:
        table_rows = [{k: comparable(v) for k, v in r.items()} for r in sql(db, f"SELECT * FROM {t}")]
        for row in table_rows:
            copies = {k: v for k, v in row.items() if copy_of(k) is not None}
            assert copies == {k: row[str(copy_of(k))] for k in copies}, f"{t}: a copy differs from its column"
        found[t] = sorted(({k: v for k, v in r.items() if copy_of(k) is None} for r in table_rows), key=str)
    return found


def kept(before: Rows, after: Rows) -> Rows:
    """``before`` as far as ``after`` still has columns for; the dropped columns must have held nothing."""
    projected: Rows = {}
    for table, table_rows in before.items():
        columns = set(after[table][0]) if after.get(table) else set()
        for row in table_rows:
            dropped = {k: v for k, v in row.items() if k not in columns}
            assert set(dropped.values()) <= {None}, f"{table}: values in dropped columns {dropped}"
        projected[table] = sorted(({k: v for k, v in r.items() if k in columns} for r in table_rows), key=str)
    return projected


def version(db: DatabaseTarget) -> list[str]:
    if sql(db, "SELECT to_regclass('alembic_version') IS NULL")[0][0]:
        return []
    return [r[0] for r in sql(db, "SELECT version_num FROM alembic_version")]


def migrate(db: DatabaseTarget, *args: str) -> None:
    result = run_alembic(*args, target=db)
    assert result.returncode == 0, out(result)


def upgrade(db: DatabaseTarget, revision: str) -> None:
    """Up to ``revision``, post-deploy revisions included (downgrades are not phased)."""
    migrate(db, "-x", "phase=post-deploy", "upgrade", revision)


def test_stairway_up_down_up_with_rows_at_every_step(empty_db: DatabaseTarget) -> None:
    steps = revisions()
    assert steps[0] == ("001", None)
    for revision, down in steps:
        upgrade(empty_db, revision)
        sql(empty_db, SEED)
        before = rows(empty_db)

        result = run_alembic("downgrade", "-1", target=empty_db)
        lost = result.returncode != 0
        if lost:
            # Only a downgrade that would lose rows may refuse, and then it changes nothing.
            assert "-x allow_data_loss=true" in out(result), out(result)
            assert (version(empty_db), rows(empty_db)) == ([revision], before)
            migrate(empty_db, "-x", "allow_data_loss=true", "downgrade", "-1")
        assert version(empty_db) == ([down] if down else [])
        if not lost:
            after = rows(empty_db)
            assert after == kept(before, after), f"downgrading {revision} lost rows without asking"

        upgrade(empty_db, revision)
        assert version(empty_db) == [revision]
        if not lost:
            assert rows(empty_db) == before, f"upgrading to {revision} again changed rows"
        else:
            sql(empty_db, SEED)  # the next step starts from rows again


def test_downgrading_001_refuses_while_the_tables_hold_rows(empty_db: DatabaseTarget) -> None:
    migrate(empty_db, "upgrade", "001")
    sql(empty_db, SEED)
    before = rows(empty_db)

    result = run_alembic("downgrade", "base", target=empty_db)
    assert result.returncode != 0
    failed = [line for line in out(result).splitlines() if line.startswith("FAILED")]
    assert failed == [
        "FAILED: downgrade of 001 would drop kraken_tool_calls (2 row(s)), kraken_turns (2 row(s)),"
        " kraken_conversations (1 row(s)): 5 row(s) would be lost, so 001 was not reverted"
        " (revisions after it were). Back up what you need, then run it again with -x allow_data_loss=true"
        " before the command"
        " (uv run alembic -x allow_data_loss=true downgrade ...)"
    ]
    assert version(empty_db) == ["001"]
    assert rows(empty_db) == before


async def test_offline_downgrade_sql_carries_the_same_refusal(empty_db: DatabaseTarget) -> None:
    guarded = run_alembic("downgrade", "001:base", "--sql", target=None)
    assert guarded.returncode == 0, out(guarded)
    found = re.search(r"DO \$guard\$.*?\$guard\$", guarded.stdout, re.DOTALL)
    assert found is not None, guarded.stdout
    assert found.start() < guarded.stdout.index("DROP TABLE")

    for table in TABLES:
        await fetch(empty_db, f"CREATE TABLE {table} (id int)")
    await fetch(empty_db, found.group(0))  # empty tables: nothing to lose
    await fetch(empty_db, "INSERT INTO kraken_turns VALUES (1)")
    with pytest.raises(asyncpg.RaiseError, match="downgrade of 001 would drop data"):
        await fetch(empty_db, found.group(0))

    allowed = run_alembic("-x", "allow_data_loss=true", "downgrade", "001:base", "--sql", target=None)
    assert allowed.returncode == 0, out(allowed)
    assert "$guard$" not in allowed.stdout
    assert 'DROP TABLE IF EXISTS "kraken_turns"' in allowed.stdout


def test_the_comparison_is_by_type_and_still_sees_a_lost_row(empty_db: DatabaseTarget) -> None:
    """A type change keeps every value (timestamp to timestamptz, numeric(10,6) to numeric(12,2)):
    compared as text, `+00:00` and `1.500000` would cry "lost rows"; a row or an instant that is
    really gone still fails."""
    table = ("kraken_stairway_types",)
    sql(empty_db, "CREATE TABLE kraken_stairway_types (id int, at timestamp, cost numeric(10,6), n int)")
    sql(empty_db, "INSERT INTO kraken_stairway_types VALUES (1, '2026-12-03 10:00:00', 1.5, 2), (2, NULL, 0, 3)")
    before = rows(empty_db, table)
    sql(
        empty_db,
        "ALTER TABLE kraken_stairway_types ALTER at TYPE timestamptz USING at AT TIME ZONE 'UTC',"
        " ALTER cost TYPE numeric(12,2), ALTER n TYPE bigint",
    )
    after = rows(empty_db, table)
    assert str(sql(empty_db, "SELECT at FROM kraken_stairway_types WHERE id = 1")[0][0]).endswith("+00:00")
    assert after == kept(before, after)

    sql(empty_db, "UPDATE kraken_stairway_types SET at = at + interval '5 hours' WHERE id = 1")  # a shifted instant
    assert rows(empty_db, table) != before
    sql(empty_db, "UPDATE kraken_stairway_types SET at = at - interval '5 hours' WHERE id = 1")
    sql(empty_db, "DELETE FROM kraken_stairway_types WHERE id = 2")  # a lost row
    after = rows(empty_db, table)
    assert after != kept(before, after)
