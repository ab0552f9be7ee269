"""Schema changes beside long transactions: a report's snapshot, open on a table the revision does
not touch, makes ``CREATE INDEX CONCURRENTLY`` wait until it ends. Statements whose lock blocks no
read or write wait for it within KRAKEN_INDEX_BUILD_TIMEOUT, not the short DDL lock_timeout, and
log whom they wait for; the revision succeeds once the report ends, or fails in one line naming
the setting, and the next run finishes the job."""

import asyncio
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import psycopg
import pytest
import sqlalchemy as sa
from alembic import op
from alembic.util import CommandError
from sqlalchemy import text
from sqlalchemy.pool import NullPool

from backend.config import PROJECT_ROOT, Settings
from backend.db.engine import connect
from backend.db.url import DatabaseTarget
from backend.migrations import ops
from backend.migrations.runner import long_waits
from backend.tests.helpers import (
    EXPECTED_INDEXES_004,
    assert_indexes,
    child_env,
    fetch,
    out,
    run_alembic,
    run_ops_async,
    run_ops_on,
    sql,
    until_waiting_for_a_lock,
    url_of,
)

pytestmark = pytest.mark.slow

USAGE_INDEX = "ix_kraken_turns_created_at"
# The short DDL bound the report outlasts: 1 s per attempt, two attempts, 0.5 s between them.
DDL_BOUNDS = {"KRAKEN_DDL_LOCK_TIMEOUT": "1", "KRAKEN_DDL_LOCK_RETRIES": "1"}
OUTLASTED = 1 * 2 + 0.5
LOG_EVERY = ("-x", f"{ops.LOG_INTERVAL_ARGUMENT}=0.5")
WAIT_LINE = re.compile(
    rf"building index {USAGE_INDEX} for (\d+) s, now waiting for 1 other session\(s\) to end their transaction "
    r"\(phase: waiting for old snapshots\): pid (\d+) \(application_name 'monthly-report', [^,]+, idle in transaction, "
    r"transaction since \d{4}-\d\d-\d\d [\d:]+ UTC, query since "
)


async def alembic(db: DatabaseTarget, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run_alembic, *args, target=db, config=None, cwd=PROJECT_ROOT, fresh=False, **env)


async def migrate(db: DatabaseTarget, *args: str, **env: str) -> str:
    result = await alembic(db, *args, **env)
    assert result.returncode == 0, out(result)
    return out(result)


@asynccontextmanager
async def report(db: DatabaseTarget) -> AsyncIterator[asyncpg.Connection]:
    """A long REPEATABLE READ report on a table no revision touches, its snapshot taken; it ends
    (rolls back) when the block does, unless the test commits it earlier."""
    await fetch(db, "CREATE TABLE IF NOT EXISTS sales AS SELECT g AS id FROM generate_series(1, 100) g")
    conn = await connect(db, "monthly-report")
    try:
        async with conn.transaction(isolation="repeatable_read"):
            await conn.fetchval("SELECT count(*) FROM sales")
            yield conn
    finally:
        await conn.close()


async def upgrade_process(db: DatabaseTarget, *args: str, **env: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "alembic", *args,
        cwd=PROJECT_ROOT, env=child_env(db, **env), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip


VALID = "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)"


async def index_state(db: DatabaseTarget, name: str) -> list[bool]:
    return [row[0] for row in await fetch(db, VALID, name)]


def index_valid(db: DatabaseTarget, name: str) -> list[bool]:
    return [row[0] for row in sql(db, VALID, name)]


async def test_an_index_build_waits_for_a_long_report_and_says_whom_it_waits_for(empty_db: DatabaseTarget) -> None:
    await migrate(empty_db, "upgrade", "003")
    lines: list[str] = []
    async with report(empty_db) as reporting:
        migration = await upgrade_process(empty_db, *LOG_EVERY, "upgrade", "004", **DDL_BOUNDS)
        assert migration.stdout is not None
        try:
            # The build waits for the report's snapshot past what the DDL bound allowed, naming it.
            while True:
                line = (await asyncio.wait_for(migration.stdout.readline(), 60)).decode()
                assert line, "".join(lines)
                lines.append(line)
                waiting = WAIT_LINE.search(line)
                if waiting and int(waiting[1]) > OUTLASTED:
                    break
            assert int(waiting[2]) == reporting.get_server_pid()
            assert await index_state(empty_db, USAGE_INDEX) == [False]  # still building
        except BaseException:
            migration.kill()
            raise
    output = "".join(lines) + (await asyncio.wait_for(migration.communicate(), 60))[0].decode()

    assert migration.returncode == 0, output
    assert "hit lock_timeout" not in output
    assert "is INVALID" not in output
    await asyncio.to_thread(assert_indexes, empty_db, EXPECTED_INDEXES_004)
    assert [r[0] for r in await fetch(empty_db, "SELECT version_num FROM alembic_version")] == ["004"]


async def test_a_build_that_outwaits_its_own_timeout_fails_in_one_line_and_the_next_run_finishes(
    empty_db: DatabaseTarget,
) -> None:
    await migrate(empty_db, "upgrade", "003")
    async with report(empty_db):
        failed = await alembic(empty_db, "upgrade", "004", KRAKEN_INDEX_BUILD_TIMEOUT="2", **DDL_BOUNDS)
    output = out(failed)

    assert failed.returncode != 0, output
    assert "Traceback" not in output
    assert "hit lock_timeout" not in output  # no retry: it would start the build over and wait again
    failures = [line for line in output.splitlines() if line.startswith("FAILED:")]
    assert failures == [
        f"FAILED: building index {USAGE_INDEX} waited longer than KRAKEN_INDEX_BUILD_TIMEOUT (2 s) for other "
        "transactions to end; it left an INVALID index, which the next run drops and builds again. The oldest open "
        "ones: SELECT pid, xact_start, state, query FROM pg_stat_activity WHERE xact_start IS NOT NULL ORDER BY "
        "xact_start"
    ], output
    assert await index_state(empty_db, USAGE_INDEX) == [False]
    assert [r[0] for r in await fetch(empty_db, "SELECT version_num FROM alembic_version")] == ["003"]

    # The report is over: the next run drops the INVALID index and builds it again.
    again = await migrate(empty_db, "upgrade", "004", KRAKEN_INDEX_BUILD_TIMEOUT="2", **DDL_BOUNDS)
    assert f"index {USAGE_INDEX} is INVALID (an interrupted build left it); building it again" in again
    await asyncio.to_thread(assert_indexes, empty_db, EXPECTED_INDEXES_004)


@pytest.mark.parametrize(("seconds", "lock_timeout"), [(1800, "1800000ms"), (2, "2000ms"), (0.0004, "1ms"), (0, "0ms")])
def test_the_index_build_timeout_is_a_setting_of_its_own(seconds: float, lock_timeout: str) -> None:
    waits = long_waits(Settings(index_build_timeout=seconds))
    assert waits == ops.LongWaits(lock_timeout, f"KRAKEN_INDEX_BUILD_TIMEOUT ({seconds:g} s)")  # 0: no limit
    assert long_waits(Settings()).lock_timeout == "1800000ms"  # 30 min by default


def test_a_bad_log_interval_is_one_line(empty_db: DatabaseTarget) -> None:
    result = run_alembic("-x", f"{ops.LOG_INTERVAL_ARGUMENT}=soon", "upgrade", "head", target=empty_db)
    assert result.returncode != 0
    assert "Traceback" not in out(result)
    assert f"FAILED: -x {ops.LOG_INTERVAL_ARGUMENT}=soon: give the seconds between log lines, more than 0" in out(
        result
    )


# --- the helpers, one by one ----------------------------------------------------------------------

SHORT = "300ms"  # the session's DDL lock_timeout in these tests
PATIENT = ops.LongWaits("0", "KRAKEN_INDEX_BUILD_TIMEOUT (0 s)")  # no limit


@pytest.fixture
async def items(empty_db: DatabaseTarget) -> DatabaseTarget:
    await fetch(empty_db, "CREATE TABLE items (id bigserial PRIMARY KEY, n integer NOT NULL)")
    await fetch(empty_db, "INSERT INTO items (n) SELECT g FROM generate_series(1, 1000) g")
    await fetch(empty_db, "CREATE INDEX ix_items_n ON items (n)")
    await fetch(empty_db, "ALTER TABLE items ADD CONSTRAINT items_n_check CHECK (n > 0) NOT VALID")
    return empty_db


async def test_a_concurrent_drop_waits_for_a_reader_of_its_table(items: DatabaseTarget) -> None:
    reader = await connect(items)
    try:
        async with reader.transaction():
            await reader.fetchval("SELECT count(*) FROM items")
            drop = asyncio.ensure_future(
                run_ops_async(
                    items, lambda: ops.drop_index_concurrently("ix_items_n"), lock_timeout=SHORT, long_waits=PATIENT
                )
            )
            await until_waiting_for_a_lock(items, statement="DROP INDEX CONCURRENTLY", for_more_than=1)  # > SHORT
            assert not drop.done()
        await drop
    finally:
        await reader.close()
    assert await index_state(items, "ix_items_n") == []


async def test_a_validation_waits_for_its_lock_and_writes_go_on_meanwhile(items: DatabaseTarget) -> None:
    # A manual VACUUM-like holder of SHARE UPDATE EXCLUSIVE: the validation queues behind it.
    holder, writer = await connect(items), await connect(items)
    await writer.execute(f"SET lock_timeout = '{SHORT}'")
    try:
        async with holder.transaction():
            await holder.execute("LOCK TABLE items IN SHARE UPDATE EXCLUSIVE MODE")
            validate = asyncio.ensure_future(
                run_ops_async(
                    items,
                    lambda: ops.validate_constraint("items_n_check", "items"),
                    lock_timeout=SHORT,
                    long_waits=PATIENT,
                )
            )
            await until_waiting_for_a_lock(items, statement="ALTER TABLE", for_more_than=1)  # > SHORT
            # Its queued lock stops neither reads nor writes.
            await writer.execute("INSERT INTO items (n) VALUES (1)")
            assert await writer.fetchval("SELECT count(*) FROM items") == 1001
            assert not validate.done()
        await validate
    finally:
        await holder.close()
        await writer.close()
    rows = await fetch(items, "SELECT convalidated FROM pg_constraint WHERE conname = 'items_n_check'")
    assert [r[0] for r in rows] == [True]


async def test_ddl_that_blocks_writes_keeps_the_short_lock_timeout(items: DatabaseTarget) -> None:
    reader = await connect(items)
    try:
        async with reader.transaction():
            await reader.fetchval("SELECT count(*) FROM items")
            with pytest.raises(Exception, match="lock timeout"):
                await run_ops_async(
                    items, lambda: ops.add_check_not_valid("items_n_big", "items", "n < 10000000"),
                    lock_timeout=SHORT, long_waits=PATIENT,
                )  # fmt: skip
    finally:
        await reader.close()


async def test_the_session_gets_its_own_lock_timeout_back_after_a_build(items: DatabaseTarget) -> None:
    seen: list[str] = []

    def build_then_look() -> None:
        ops.create_index_concurrently("ix_items_id_n", "items", ["id", "n"])
        seen.append(op.get_bind().execute(text("SHOW lock_timeout")).scalar_one())

    await run_ops_async(items, build_then_look, lock_timeout=SHORT, long_waits=ops.LongWaits("1800000ms", "-"))
    assert seen == [SHORT]


async def test_a_timed_out_validation_fails_in_one_line(items: DatabaseTarget) -> None:
    holder = await connect(items)
    try:
        async with holder.transaction():
            await holder.execute("LOCK TABLE items IN SHARE UPDATE EXCLUSIVE MODE")
            with pytest.raises(CommandError) as failed:
                await run_ops_async(
                    items, lambda: ops.validate_constraint("items_n_check", "items"),
                    lock_timeout=SHORT, long_waits=ops.LongWaits("500ms", "KRAKEN_INDEX_BUILD_TIMEOUT (0.5 s)"),
                )  # fmt: skip
    finally:
        await holder.close()
    assert str(failed.value).startswith(
        "validating constraint items_n_check on items waited longer than KRAKEN_INDEX_BUILD_TIMEOUT (0.5 s) for "
        "other transactions to end; it stays NOT VALID until the next run. "
    )


def test_on_a_plain_sync_connection_a_thread_watches_the_build(
    items: DatabaseTarget, caplog: pytest.LogCaptureFixture
) -> None:
    # A sync driver's connection (psycopg), as a tool may hand env.py: no event loop to watch from.
    dsn = url_of(items)
    engine = sa.create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn), poolclass=NullPool)
    sql(items, "CREATE TABLE sales AS SELECT g AS id FROM generate_series(1, 100) g")
    failures: list[BaseException] = []

    def migrate_on_sync_connection() -> None:
        try:
            with engine.connect() as connection:
                run_ops_on(
                    connection,
                    lambda: ops.create_index_concurrently("ix_items_id_n", "items", ["id", "n"]),
                    lock_timeout=SHORT,
                    long_waits=PATIENT,
                    x=[f"{ops.LOG_INTERVAL_ARGUMENT}=0.2"],
                )
        except BaseException as exc:
            failures.append(exc)

    with psycopg.connect(dsn, application_name="monthly-report") as reporting:
        reporting.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        reporting.execute("SELECT count(*) FROM sales")
        migration = threading.Thread(target=migrate_on_sync_connection)
        migration.start()
        try:
            named = (
                "now waiting for 1 other session(s) to end their transaction (phase: waiting for old snapshots): "
                f"pid {reporting.info.backend_pid} (application_name 'monthly-report'"
            )
            while not any(named in record.getMessage() for record in caplog.records):
                assert migration.is_alive(), failures
                time.sleep(0.05)
            assert index_valid(items, "ix_items_id_n") == [False]
        finally:
            reporting.commit()
            migration.join(timeout=60)
    engine.dispose()

    assert failures == []
    assert index_valid(items, "ix_items_id_n") == [True]
