"""The migration session compresses its WAL's full-page images when the server does not and the
role may (backend/migrations/wal.py); otherwise the backfill engine says how to turn it on.

Each test is in a database of its own; the non-superuser role is made for the test and dropped
after it (roles belong to the whole server).
"""

import asyncio
import logging
import secrets
from collections.abc import Iterator
from dataclasses import replace

import pytest
from sqlalchemy import Connection, text

from backend.db.engine import create_migration_engine
from backend.db.url import DatabaseTarget
from backend.migrations import ops, runner, wal
from backend.tests.conftest import settings_of
from backend.tests.helpers import run_ops, sql

ENGINE = "backend.migrations.ops"


def server_compression(db: DatabaseTarget) -> str:
    return str(sql(db, "SELECT setting FROM pg_settings WHERE name = 'wal_compression'")[0][0])


def best(db: DatabaseTarget) -> str:
    """The compression the runner should pick on ``db``'s server: lz4 when it was built with it."""
    choices = sql(db, "SELECT enumvals FROM pg_settings WHERE name = 'wal_compression'")[0][0] or []
    return "lz4" if "lz4" in choices else "pglz"


def server_version(db: DatabaseTarget) -> int:
    return int(sql(db, "SHOW server_version_num")[0][0])


def compression_after_session_bounds(db: DatabaseTarget) -> tuple[object, object]:
    """The runner's session set-up on a migration connection to ``db``; then what the session's
    wal_compression shows and what the runner recorded of it."""

    def work(connection: Connection) -> tuple[object, object]:
        runner._set_session_bounds(connection, settings_of(db))
        return connection.execute(text("SHOW wal_compression")).scalar(), connection.info.get(wal.COMPRESSION)

    async def go() -> tuple[object, object]:
        engine = create_migration_engine(db)
        try:
            async with engine.connect() as connection:
                return await connection.run_sync(work)
        finally:
            await engine.dispose()

    return asyncio.run(go())


@pytest.fixture
def limited_role(empty_db: DatabaseTarget) -> Iterator[DatabaseTarget]:
    """``empty_db`` as a role that owns it (it can migrate it) but is no superuser; ``empty_db``
    itself stays the tests' own (superuser) role."""
    role = f"kraken_nosuper_{secrets.token_hex(4)}"
    sql(empty_db, f'CREATE ROLE "{role}" LOGIN NOSUPERUSER')
    sql(empty_db, f'ALTER DATABASE "{empty_db.database}" OWNER TO "{role}"')
    sql(empty_db, f'GRANT CREATE ON SCHEMA public TO "{role}"')
    try:
        yield replace(empty_db, user=role)
    finally:
        # What the role owns goes back to the test's own role before the role goes.
        sql(empty_db, f'REASSIGN OWNED BY "{role}" TO CURRENT_USER')
        sql(empty_db, f'DROP OWNED BY "{role}"')
        if server_version(empty_db) >= 150000:
            sql(empty_db, f'REVOKE SET ON PARAMETER wal_compression FROM "{role}"')
        sql(empty_db, f'DROP ROLE "{role}"')


def test_the_runner_compresses_its_full_page_images_when_the_server_does_not(empty_db: DatabaseTarget) -> None:
    if server_compression(empty_db) not in ("off", "false"):
        pytest.fail("the test servers run with wal_compression off (PostgreSQL's default)")
    shown, recorded = compression_after_session_bounds(empty_db)
    # The tests' role is a superuser on both servers: it may, and lz4 is taken where the server has it.
    assert recorded == best(empty_db)
    assert shown == recorded


def test_a_role_that_may_not_set_it_leaves_it_and_the_engine_says_how(
    limited_role: DatabaseTarget, caplog: pytest.LogCaptureFixture
) -> None:
    if server_compression(limited_role) not in ("off", "false"):
        pytest.fail("the test servers run with wal_compression off (PostgreSQL's default)")
    shown, recorded = compression_after_session_bounds(limited_role)
    assert (shown, recorded) == ("off", None)

    sql(limited_role, "CREATE TABLE numbers (id bigint PRIMARY KEY, n integer NOT NULL, doubled integer)")
    sql(limited_role, "INSERT INTO numbers (id, n) SELECT g, g FROM generate_series(1, 50) g")
    caplog.set_level(logging.INFO, logger=ENGINE)

    def walk() -> None:
        assert wal.compress_full_page_images(ops._bind()) is None  # what the runner does first
        ops.backfill_by_key(
            "numbers", "id", "UPDATE numbers SET doubled = n * 2 WHERE id = ANY(:keys)", 10, key_type="bigint"
        )

    run_ops(limited_role, walk)
    advice = [r.getMessage() for r in caplog.records if r.name == ENGINE and wal.ADVICE in r.getMessage()]
    assert len(advice) == 1  # once per walk, not per batch
    assert sql(limited_role, "SELECT count(*) FROM numbers WHERE doubled = n * 2")[0][0] == 50


def test_a_role_granted_set_on_the_parameter_compresses(empty_db: DatabaseTarget, limited_role: DatabaseTarget) -> None:
    if server_version(limited_role) < 150000:
        pytest.fail("grants on parameters need PostgreSQL 15; the test servers are 15 and 18")
    sql(empty_db, f'GRANT SET ON PARAMETER wal_compression TO "{limited_role.user}"')
    shown, recorded = compression_after_session_bounds(limited_role)
    assert recorded == best(limited_role)
    assert shown == recorded


def test_an_engine_walk_outside_the_runner_gives_no_advice(
    empty_db: DatabaseTarget, caplog: pytest.LogCaptureFixture
) -> None:
    """No runner, nothing looked at: the engine does not guess."""
    sql(empty_db, "CREATE TABLE numbers (id bigint PRIMARY KEY, n integer NOT NULL, doubled integer)")
    sql(empty_db, "INSERT INTO numbers (id, n) SELECT g, g FROM generate_series(1, 20) g")
    caplog.set_level(logging.INFO, logger=ENGINE)
    run_ops(
        empty_db,
        lambda: ops.backfill_by_key("numbers", "id", "UPDATE numbers SET doubled = n * 2 WHERE id = ANY(:keys)", 10,
                                    key_type="bigint"),
    )  # fmt: skip
    assert not [r for r in caplog.records if wal.ADVICE in r.getMessage()]
