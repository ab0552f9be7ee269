"""Revision 006 on real databases whose default time zone is America/New_York: each timestamp
column gets its timestamptz copy holding the same instants, kept so by writes through the old
names (the previous release's), online and from the offline SQL; the downgrade keeps every value."""

import asyncio
from datetime import UTC, datetime

from backend.db.url import DatabaseTarget
from backend.tests.helpers import execute_script, out, run_alembic, sql

COLUMNS = {"kraken_conversations": ("started_at", "ended_at"), "kraken_turns": ("created_at",)}
SEED = """
WITH c AS (
    INSERT INTO kraken_conversations (session_id, model, system_prompt_hash, agent_version, total_turns,
        started_at, ended_at)
    SELECT 's' || g, 'm', 'h', 'v', 1, timestamp '2026-03-08 06:30' + g * interval '1 hour',
        CASE WHEN g % 2 = 0 THEN timestamp '2026-11-01 05:30' + g * interval '1 minute' END
    FROM generate_series(1, 50) AS g RETURNING id, started_at
)
INSERT INTO kraken_turns (conversation_id, turn_number, user_query, assistant_response, model, created_at)
SELECT id, 1, 'q', 'a', 'm', started_at + interval '1 second' FROM c
"""


def new_york(db: DatabaseTarget) -> DatabaseTarget:
    """At 005, with rows spanning both daylight-saving changes, sessions defaulting to New York."""
    sql(db, f"ALTER DATABASE \"{db.database}\" SET timezone = 'America/New_York'")
    result = run_alembic("upgrade", "005", target=db)
    assert result.returncode == 0, out(result)
    sql(db, SEED)
    return db


def instants(db: DatabaseTarget, suffix: str = "") -> dict[str, list[datetime | None]]:
    """Each column (or its copy) as aware UTC instants, in id order."""
    found: dict[str, list[datetime | None]] = {}
    for table, columns in COLUMNS.items():
        for column in columns:
            values = [r[0] for r in sql(db, f"SELECT {column}{suffix} FROM {table} ORDER BY id")]
            found[column] = [
                None if v is None else v.replace(tzinfo=UTC) if v.tzinfo is None else v.astimezone(UTC) for v in values
            ]
    return found


def test_006_copies_every_instant_and_keeps_the_copies_in_sync(empty_db: DatabaseTarget) -> None:
    db = new_york(empty_db)
    before = instants(db)
    result = run_alembic("upgrade", "006", target=db)
    assert result.returncode == 0, out(result)
    assert instants(db, "__new") == before
    assert instants(db) == before

    # The previous release writes naive UTC times through the old names: the copies follow.
    sql(db, "UPDATE kraken_conversations SET ended_at = timestamp '2026-12-03 12:00' WHERE ended_at IS NULL")
    sql(
        db,
        "INSERT INTO kraken_conversations (session_id, model, system_prompt_hash, agent_version)"
        " VALUES ('new', 'm', 'h', 'v')",
    )
    assert instants(db, "__new") == instants(db)
    assert datetime(2026, 12, 3, 12, tzinfo=UTC) in instants(db, "__new")["ended_at"]

    synced = instants(db)
    result = run_alembic("downgrade", "005", target=db)
    assert result.returncode == 0, out(result)
    assert instants(db) == synced
    assert not sql(db, "SELECT attname FROM pg_attribute WHERE attname LIKE '%\\_\\_new' AND attnum > 0")


def test_006_offline_sql_does_what_the_online_run_does(empty_db: DatabaseTarget) -> None:
    db = new_york(empty_db)
    before = instants(db)
    generated = run_alembic("upgrade", "005:006", "--sql", target=None)
    assert generated.returncode == 0, out(generated)
    assert "AT TIME ZONE 'UTC'" in generated.stdout
    asyncio.run(execute_script(db, generated.stdout))
    assert instants(db, "__new") == before
    assert sql(db, "SELECT version_num FROM alembic_version")[0][0] == "006"
    not_null = "SELECT attnotnull FROM pg_attribute WHERE attrelid = 'kraken_turns'::regclass AND attname = $1"
    assert sql(db, not_null, "created_at__new")[0][0] is True
