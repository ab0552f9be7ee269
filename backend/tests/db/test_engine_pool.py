"""The service engine's pool: dead connections are replaced, idle ones checked, busy ones not."""

import asyncio
from typing import Any

import asyncpg
import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncConnection

from backend.db import engine as db_engine
from backend.db.engine import connect
from backend.db.leases import Lease, PoolLender
from backend.main import create_service_engine


def _driver(conn: AsyncConnection) -> asyncpg.Connection:
    assert conn.sync_connection is not None
    driver: asyncpg.Connection | None = conn.sync_connection.connection.driver_connection
    assert driver is not None
    return driver


async def test_a_connection_the_server_closed_while_idle_in_the_pool_is_replaced(live_db, settings_for):
    engine = create_service_engine(live_db, settings_for(live_db, db_pool_size=1, db_max_overflow=0))
    try:
        async with engine.connect() as conn:
            victim = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
            driver = _driver(conn)
        # The server ends it, as a restart, a failover or an idle timeout would.
        admin = await connect(live_db)
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", victim) is True
        finally:
            await admin.close()
        async with asyncio.timeout(30):  # until asyncpg has read the closed socket
            while not driver.is_closed():
                await asyncio.sleep(0.01)

        async with engine.connect() as conn:  # the only pooled connection is the dead one
            replacement = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
    finally:
        await engine.dispose()
    assert replacement != victim


@pytest.mark.parametrize(("window", "pinged"), [(0.0, True), (3600.0, False)], ids=["idle", "just-returned"])
async def test_only_connections_idle_past_the_window_are_pinged(live_db, settings_for, monkeypatch, window, pinged):
    monkeypatch.setattr(db_engine, "PING_AFTER_IDLE_SECONDS", window)
    engine = create_service_engine(live_db, settings_for(live_db, db_pool_size=1, db_max_overflow=0))
    sent: list[str] = []

    def log(query: Any) -> None:  # a function: asyncpg holds loggers weakly when they are methods
        sent.append(query.query)

    event.listen(engine.sync_engine, "connect", lambda conn, _: conn.driver_connection.add_query_logger(log))
    try:
        for query in ("SELECT 2", "SELECT 3"):
            async with engine.connect() as conn:
                await _driver(conn).fetchval(query)  # asyncpg logs its own queries, not SQLAlchemy's
        await asyncio.sleep(0)  # asyncpg calls its query loggers soon after, not during
    finally:
        await engine.dispose()
    queries = [q for q in sent if q.startswith("SELECT")]
    assert queries == (["SELECT 2", "SELECT 1", "SELECT 3"] if pinged else ["SELECT 2", "SELECT 3"])


async def test_a_lease_given_back_inside_a_transaction_does_not_pool_it(live_db, settings_for):
    """SQLAlchemy's reset on return only ends transactions begun through SQLAlchemy; one begun on
    the asyncpg connection (an interrupted delete) must not reach the next request."""
    engine = create_service_engine(live_db, settings_for(live_db, db_pool_size=1, db_max_overflow=0))
    lender = PoolLender(engine)
    try:
        lease = Lease(lender)
        left_open = await lease.connection()
        await left_open.execute("BEGIN")
        await lease.end(succeeded=True)

        lease = Lease(lender)
        conn = await lease.connection()
        assert conn is not left_open
        assert not conn.is_in_transaction()
        await lease.end(succeeded=True)
    finally:
        await engine.dispose()
