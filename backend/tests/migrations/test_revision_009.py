"""Revision 009 (post-deploy, a release after 007) on real databases whose default time zone is
America/New_York: the old timestamp columns, their indexes and the triggers that kept them in sync
are dropped with every instant kept, online and from the offline SQL; the downgrade builds the old
columns again, in sync, so that 007's downgrade can swap back; a 009 stopped after its first column
still downgrades."""

import asyncio
from datetime import datetime

from backend.db.url import DatabaseTarget
from backend.tests.helpers import execute_script, out, revision_module, run_alembic, run_ops, sql
from backend.tests.migrations.test_revision_006 import COLUMNS, instants
from backend.tests.migrations.test_revision_007 import (
    INDEXES,
    POST_DEPLOY,
    TIMESTAMP,
    TIMESTAMPTZ,
    at_006,
    swapped,
    types,
    version,
)

HELPERS = (
    "SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal"
    " AND tgrelid IN ('kraken_conversations'::regclass, 'kraken_turns'::regclass)"
)
FUNCTIONS = "SELECT count(*) FROM pg_proc WHERE proname LIKE 'kraken\\_%\\_\\_sync'"


def at_008(db: DatabaseTarget) -> dict[str, list[datetime | None]]:
    """``db`` (empty) at 008, New York its default zone, with 005's rows: the instants it holds."""
    before = at_006(db)
    result = run_alembic(*POST_DEPLOY, "upgrade", "008", target=db)
    assert result.returncode == 0, out(result)
    return before


def contracted(db: DatabaseTarget) -> None:
    """Each column in timestamptz under its name, with nothing beside it: no old column, no
    index on one, no trigger, no sync function."""
    assert types(db, "kraken_conversations", "started_at") == [("started_at", TIMESTAMPTZ, "now()")]
    assert types(db, "kraken_conversations", "ended_at") == [("ended_at", TIMESTAMPTZ, None)]
    assert types(db, "kraken_turns", "created_at") == [("created_at", TIMESTAMPTZ, "now()")]
    for table in COLUMNS:
        assert not [name for name, _ in sql(db, INDEXES, table) if name.endswith("__old")]
    assert sql(db, HELPERS)[0][0] == 0
    assert sql(db, FUNCTIONS)[0][0] == 0


def test_009_drops_the_old_columns_keeping_every_instant_and_its_downgrade_builds_them_again(
    empty_db: DatabaseTarget,
) -> None:
    db = empty_db
    before = at_008(db)
    refused = run_alembic("upgrade", "009", target=db)  # the pre-deploy phase leaves it for later
    assert refused.returncode == 0, out(refused)
    assert version(db) == "008"
    assert "stopping before post-deploy revision(s) 009" in out(refused)

    result = run_alembic(*POST_DEPLOY, "upgrade", "009", target=db)
    assert result.returncode == 0, out(result)
    assert version(db) == "009"
    contracted(db)
    assert instants(db) == before
    # This release writes through the names; there is nothing left to keep in sync.
    sql(db, "UPDATE kraken_conversations SET ended_at = timestamptz '2026-12-05 09:00+00' WHERE ended_at IS NULL")
    written = instants(db)

    down = run_alembic("downgrade", "008", target=db)
    assert down.returncode == 0, out(down)
    assert version(db) == "008"
    swapped(db)  # the old columns again, indexed as before
    assert instants(db) == written
    assert instants(db, "__old") == written
    # ... and in sync: 007's downgrade can then swap back with nothing lost.
    sql(db, "UPDATE kraken_conversations SET ended_at = timestamptz '2026-12-06 10:00+00'")
    assert instants(db, "__old") == instants(db)
    back = run_alembic("downgrade", "006", target=db)
    assert back.returncode == 0, out(back)
    assert [r[:2] for r in types(db, "kraken_turns", "created_at")] == [
        ("created_at", TIMESTAMP),
        ("created_at__new", TIMESTAMPTZ),
    ]
    assert instants(db)["created_at"] == written["created_at"]


def test_009_offline_sql_does_what_the_online_run_does(empty_db: DatabaseTarget) -> None:
    db = empty_db
    before = at_008(db)
    pre = run_alembic("upgrade", "008:009", "--sql", target=None)
    assert pre.returncode == 0, out(pre)
    assert "DROP COLUMN" not in pre.stdout  # the pre-deploy phase's SQL leaves 009 out
    generated = run_alembic(*POST_DEPLOY, "upgrade", "008:009", "--sql", target=None)
    assert generated.returncode == 0, out(generated)
    assert "SET timezone = 'UTC'" in generated.stdout
    assert "DROP INDEX CONCURRENTLY" in generated.stdout
    asyncio.run(execute_script(db, generated.stdout))
    assert version(db) == "009"
    contracted(db)
    assert instants(db) == before

    back = run_alembic("downgrade", "009:008", "--sql", target=None)
    assert back.returncode == 0, out(back)
    assert "AT TIME ZONE 'UTC'" in back.stdout
    asyncio.run(execute_script(db, back.stdout))
    assert version(db) == "008"
    swapped(db)
    assert instants(db, "__old") == before


def test_009_stopped_after_its_first_column_downgrades_to_006_keeping_every_instant(empty_db: DatabaseTarget) -> None:
    """009 commits once per column: a run stopped after the first is not recorded, and the
    downgrade that follows runs 008's and 007's on a column already contracted."""
    db = empty_db
    before = at_008(db)
    run_ops(db, revision_module("009").CHANGES[0].contract)  # what such a run leaves
    assert version(db) == "008"
    assert types(db, "kraken_conversations", "started_at") == [("started_at", TIMESTAMPTZ, "now()")]
    down = run_alembic("downgrade", "006", target=db)
    assert down.returncode == 0, out(down)
    assert version(db) == "006"
    for table, columns in COLUMNS.items():
        for column in columns:
            assert [r[:2] for r in types(db, table, column)] == [(column, TIMESTAMP), (f"{column}__new", TIMESTAMPTZ)]
    assert instants(db) == before
    assert instants(db, "__new") == before
    assert "kraken_conversations.started_at: contracted already" in out(down)
