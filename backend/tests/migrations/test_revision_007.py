"""Revision 007 (post-deploy) on real databases whose default time zone is America/New_York: the
timestamptz copies take the columns' names holding the same instants, the old columns kept so by
writes through the new names (this release's), online and from the offline SQL; the swap waits for
its lock no longer than lock_timeout; the downgrade keeps every instant."""

import asyncio
import sys
import time
from datetime import UTC, datetime

from backend.config import PROJECT_ROOT
from backend.db.engine import connect
from backend.db.url import DatabaseTarget
from backend.tests.helpers import child_env, execute_script, fetch, out, revision_module, run_alembic, run_ops, sql
from backend.tests.migrations.test_revision_006 import COLUMNS, instants, new_york

POST_DEPLOY = ("-x", "phase=post-deploy")
TYPES = """
SELECT attname, format_type(atttypid, atttypmod), pg_get_expr(adbin, adrelid)
FROM pg_attribute LEFT JOIN pg_attrdef ON adrelid = attrelid AND adnum = attnum
WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped AND attname LIKE $2
ORDER BY attname
"""
INDEXES = "SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid = $1::regclass"
TIMESTAMPTZ = "timestamp with time zone"
TIMESTAMP = "timestamp without time zone"


def at_006(db: DatabaseTarget) -> dict[str, list[datetime | None]]:
    """``db`` (empty) at 006 with 005's rows, New York its default zone; the instants it holds."""
    new_york(db)
    result = run_alembic("upgrade", "006", target=db)
    assert result.returncode == 0, out(result)
    return instants(db)


def types(db: DatabaseTarget, table: str, column: str) -> list[tuple[str, str, str | None]]:
    """The column and its copies (``<column>__new``, ``<column>__old``): name, type, default."""
    return [tuple(r) for r in sql(db, TYPES, table, f"{column}%")]


def swapped(db: DatabaseTarget) -> None:
    """The columns in timestamptz under their names (with the default), the old ones as ``__old``."""
    assert types(db, "kraken_conversations", "started_at") == [
        ("started_at", TIMESTAMPTZ, "now()"),
        ("started_at__old", TIMESTAMP, None),
    ]
    assert types(db, "kraken_conversations", "ended_at") == [
        ("ended_at", TIMESTAMPTZ, None),
        ("ended_at__old", TIMESTAMP, None),
    ]
    assert types(db, "kraken_turns", "created_at") == [
        ("created_at", TIMESTAMPTZ, "now()"),
        ("created_at__old", TIMESTAMP, None),
    ]
    indexes = dict(sql(db, INDEXES, "kraken_turns"))
    assert "(created_at) INCLUDE (model," in indexes["ix_kraken_turns_created_at"]
    assert "(created_at__old) INCLUDE (model," in indexes["ix_kraken_turns_created_at__old"]
    assert "(started_at)" in dict(sql(db, INDEXES, "kraken_conversations"))["ix_kraken_conversations_started_at"]


def version(db: DatabaseTarget) -> str:
    return str(sql(db, "SELECT version_num FROM alembic_version")[0][0])


def test_007_swaps_every_column_keeping_its_instants_and_the_old_columns_in_sync(empty_db: DatabaseTarget) -> None:
    db = empty_db
    before = at_006(db)
    refused = run_alembic("upgrade", "007", target=db)  # the pre-deploy phase stops before it
    assert refused.returncode == 0, out(refused)
    assert version(db) == "006"
    assert "stopping before post-deploy revision(s) 007" in out(refused)

    result = run_alembic(*POST_DEPLOY, "upgrade", "007", target=db)
    assert result.returncode == 0, out(result)
    assert version(db) == "007"
    swapped(db)
    assert instants(db) == before
    assert instants(db, "__old") == before

    # This release writes aware times through the names, and relies on the defaults: the old
    # columns follow (a rollback to 006 finds them complete).
    sql(db, "UPDATE kraken_conversations SET ended_at = timestamptz '2026-12-03 12:00+00' WHERE ended_at IS NULL")
    sql(
        db,
        "INSERT INTO kraken_conversations (session_id, model, system_prompt_hash, agent_version)"
        " VALUES ('new', 'm', 'h', 'v')",
    )
    written = instants(db)
    assert instants(db, "__old") == written
    assert datetime(2026, 12, 3, 12, tzinfo=UTC) in written["ended_at"]
    [(fresh,)] = sql(db, "SELECT started_at FROM kraken_conversations WHERE session_id = 'new'")
    assert abs(fresh - datetime.now(UTC)).total_seconds() < 60  # now() as an instant, not New York's wall clock

    swapped(db)

    down = run_alembic("downgrade", "006", target=db)
    assert down.returncode == 0, out(down)
    assert version(db) == "006"
    for table, columns in COLUMNS.items():
        for column in columns:
            names = [r[:2] for r in types(db, table, column)]
            assert names == [(column, TIMESTAMP), (f"{column}__new", TIMESTAMPTZ)]
    assert instants(db) == written
    assert instants(db, "__new") == written
    # Back at 006 the previous release writes naive UTC times: the copies follow again.
    sql(db, "UPDATE kraken_conversations SET ended_at = timestamp '2026-12-04 08:00' WHERE session_id = 'new'")
    assert instants(db, "__new") == instants(db)


def test_007_stopped_after_its_first_column_downgrades_to_005_keeping_every_instant(empty_db: DatabaseTarget) -> None:
    """007 commits once per column: a run stopped after the first (its lock retries ran out on
    kraken_turns) is not recorded, so a rollback runs 006's downgrade on a column already swapped."""
    db = empty_db
    before = at_006(db)
    run_ops(db, revision_module("007").CHANGES[0].swap)  # what such a run leaves
    assert version(db) == "006"
    assert [r[:2] for r in types(db, "kraken_conversations", "started_at")] == [
        ("started_at", TIMESTAMPTZ),
        ("started_at__old", TIMESTAMP),
    ]
    down = run_alembic("downgrade", "005", target=db)
    assert down.returncode == 0, out(down)
    assert version(db) == "005"
    for table, columns in COLUMNS.items():
        for column in columns:
            assert [r[:2] for r in types(db, table, column)] == [(column, TIMESTAMP)]
    assert instants(db) == before
    assert "kraken_conversations.started_at: swapped already; swapping it back first" in out(down)


def test_007_offline_sql_does_what_the_online_run_does(empty_db: DatabaseTarget) -> None:
    db = empty_db
    before = at_006(db)
    pre = run_alembic("upgrade", "006:007", "--sql", target=None)
    assert pre.returncode == 0, out(pre)
    assert "RENAME COLUMN" not in pre.stdout  # the pre-deploy phase's SQL leaves 007 out
    generated = run_alembic(*POST_DEPLOY, "upgrade", "006:007", "--sql", target=None)
    assert generated.returncode == 0, out(generated)
    assert "SET timezone = 'UTC'" in generated.stdout
    assert 'LOCK TABLE "kraken_turns" IN ACCESS EXCLUSIVE MODE' in generated.stdout
    asyncio.run(execute_script(db, generated.stdout))
    assert version(db) == "007"
    swapped(db)
    assert instants(db) == before
    assert instants(db, "__old") == before

    back = run_alembic("downgrade", "007:006", "--sql", target=None)
    assert back.returncode == 0, out(back)
    asyncio.run(execute_script(db, back.stdout))
    assert version(db) == "006"
    assert [r[:2] for r in types(db, "kraken_turns", "created_at")] == [
        ("created_at", TIMESTAMP),
        ("created_at__new", TIMESTAMPTZ),
    ]
    assert instants(db) == before
    assert instants(db, "__new") == before


async def append_while_the_swap_waits(db: DatabaseTarget) -> tuple[int | None, str, list[float]]:
    """The post-deploy phase run while a long read holds ACCESS SHARE on kraken_turns (so the swap
    of created_at cannot get its lock), the service appending turns meanwhile: the run's exit code,
    its output, and each insert's wait."""
    reader = await connect(db)
    reader_tx = reader.transaction()
    await reader_tx.start()
    await reader.fetch("SELECT count(*) FROM kraken_turns")
    service = await connect(db)
    waits: list[float] = []
    migration = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "alembic", *POST_DEPLOY, "upgrade", "head",
        cwd=PROJECT_ROOT,
        env=child_env(db, KRAKEN_DDL_LOCK_TIMEOUT="0.5", KRAKEN_DDL_LOCK_RETRIES="2"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    finished = asyncio.ensure_future(migration.communicate())
    try:
        [(conversation,)] = await fetch(db, "SELECT id FROM kraken_conversations ORDER BY id LIMIT 1")
        while not finished.done():
            started = time.monotonic()
            await service.execute(
                "INSERT INTO kraken_turns (conversation_id, turn_number, user_query, assistant_response, model)"
                " VALUES ($1, $2, 'q', 'a', 'm')",
                conversation,
                100 + len(waits),
            )
            waits.append(time.monotonic() - started)
            await asyncio.sleep(0.02)
        output = (await finished)[0].decode()
    finally:
        await reader_tx.rollback()
        await reader.close()
        await service.close()
    return migration.returncode, output, waits


def test_007_waits_for_its_lock_no_longer_than_lock_timeout(empty_db: DatabaseTarget) -> None:
    db = empty_db
    before = at_006(db)
    code, output, waits = asyncio.run(append_while_the_swap_waits(db))

    assert code != 0
    assert "could not get its table lock within lock_timeout (0.5 s) in 3 attempts" in output
    assert len(waits) > 10
    # An insert queued behind one attempt waits at most its 0.5 s (the bound leaves a loaded
    # machine room, under three attempts back to back: see test_concurrent_runners).
    assert max(waits) < 1.4, f"longest insert waited {max(waits):.3f} s"
    assert version(db) == "006"
    assert [r[:2] for r in types(db, "kraken_turns", "created_at")] == [
        ("created_at", TIMESTAMP),
        ("created_at__new", TIMESTAMPTZ),
    ]
    # The columns of kraken_conversations swapped (one transaction each, committed); the next run
    # finishes the revision from there (to 007 itself: 008 follows it).
    finished_run = run_alembic(*POST_DEPLOY, "upgrade", "007", target=db)
    assert finished_run.returncode == 0, out(finished_run)
    assert version(db) == "007"
    swapped(db)
    now = instants(db)
    assert (now["started_at"], now["ended_at"]) == (before["started_at"], before["ended_at"])
    assert len(now["created_at"]) == len(before["created_at"]) + len(waits)
    assert set(before["created_at"]) <= set(now["created_at"])
    assert instants(db, "__old") == now
