"""The service's pool (asyncpg's own) and its lender: dead connections replaced, idle ones checked,
busy ones not; a connection thrown away only when it is broken or left inside a transaction."""

import asyncio
import contextlib
import socket
from typing import Any

import pytest

from backend.db import pool as db_pool
from backend.db.engine import connect
from backend.db.errors import request_fault
from backend.db.leases import Lease
from backend.db.pool import PoolBusy
from backend.db.url import parse_database_url
from backend.tests.helpers import lender_on

ONE = {"db_pool_size": 1, "db_max_overflow": 0}


async def _pid(lease: Lease) -> int:
    pid: int = await (await lease.connection()).fetchval("SELECT pg_backend_pid()")
    return pid


async def test_a_connection_the_server_closed_while_idle_in_the_pool_is_replaced(live_db, settings_for):
    async with lender_on(live_db, settings_for(live_db, **ONE)) as lender:
        lease = Lease(lender)
        victim = await _pid(lease)
        await lease.end(succeeded=True)
        # The server ends it, as a restart, a failover or an idle timeout would.
        admin = await connect(live_db)
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", victim) is True
        finally:
            await admin.close()
        async with asyncio.timeout(30):  # until asyncpg has read the closed socket
            while lender.pool.get_size():
                await asyncio.sleep(0.01)

        lease = Lease(lender)  # the only pooled connection was the dead one
        replacement = await _pid(lease)
        await lease.end(succeeded=True)
    assert replacement != victim


@pytest.mark.parametrize(("window", "pinged"), [(0.0, True), (3600.0, False)], ids=["idle", "just-returned"])
async def test_only_connections_idle_past_the_window_are_pinged(live_db, settings_for, monkeypatch, window, pinged):
    monkeypatch.setattr(db_pool, "PING_AFTER_IDLE_SECONDS", window)
    sent: list[str] = []

    def log(query: Any) -> None:  # a function: asyncpg holds loggers weakly when they are methods
        sent.append(query.query)

    async with lender_on(live_db, settings_for(live_db, **ONE)) as lender:
        for query in ("SELECT 2", "SELECT 3"):
            lease = Lease(lender)
            conn = await lease.connection()
            if query == "SELECT 2":
                conn.add_query_logger(log)  # on the connection itself: it stays through releases
            await conn.fetchval(query)
            await lease.end(succeeded=True)
        await asyncio.sleep(0)  # asyncpg calls its query loggers soon after, not during
    queries = [q for q in sent if q.startswith("SELECT")]
    assert queries == (["SELECT 2", "SELECT 1", "SELECT 3"] if pinged else ["SELECT 2", "SELECT 3"])


async def test_a_lease_given_back_inside_a_transaction_does_not_pool_it(live_db, settings_for):
    """Whatever a request left open in a transaction must not reach the next request."""
    async with lender_on(live_db, settings_for(live_db, **ONE)) as lender:
        lease = Lease(lender)
        left_open = await _pid(lease)
        await (await lease.connection()).execute("BEGIN")
        await lease.end(succeeded=True)

        lease = Lease(lender)
        assert await _pid(lease) != left_open
        assert not (await lease.connection()).is_in_transaction()
        await lease.end(succeeded=True)


async def test_a_failed_request_keeps_its_connection(live_db, settings_for):
    """A 500 (a bug) or a 4xx after a failed statement gives its connection back to the pool: a bug
    that fails every request does not reconnect on every request."""
    async with lender_on(live_db, settings_for(live_db, **ONE)) as lender:
        lease = Lease(lender)
        first = await _pid(lease)
        with pytest.raises(Exception, match="division by zero"):
            await (await lease.connection()).execute("SELECT 1 / 0")
        await lease.end(succeeded=False)

        lease = Lease(lender)
        assert await _pid(lease) == first
        await lease.end(succeeded=True)


async def test_a_connection_a_statement_of_its_request_still_uses_is_not_pooled(live_db, settings_for):
    """Concurrent use (a bug): the request ended while another of its statements still runs on
    its connection, which would fail the next request's statements; it is closed instead."""
    async with lender_on(live_db, settings_for(live_db, **ONE)) as lender:
        lease = Lease(lender)
        first = await _pid(lease)
        stray = asyncio.create_task((await lease.connection()).execute("SELECT pg_sleep(5)"))
        await asyncio.sleep(0.1)
        await lease.end(succeeded=False)
        with contextlib.suppress(Exception):
            await stray

        lease = Lease(lender)
        assert await _pid(lease) != first
        await lease.end(succeeded=True)


async def test_no_free_connection_within_the_pool_timeout_is_busy(live_db, settings_for):
    async with lender_on(live_db, settings_for(live_db, **ONE, db_pool_timeout=0.2)) as lender:
        holding = Lease(lender)
        await holding.connection()
        with pytest.raises(PoolBusy) as caught:
            await Lease(lender).connection()
        assert request_fault(caught.value) == "busy"
        await holding.end(succeeded=True)
        assert lender.counts() == (0, 1, 0)


async def test_the_pool_opens_nothing_until_a_request_needs_a_connection(settings_for):
    """A worker starts while its database is away; its requests meet the outage (503), not a busy pool."""
    with socket.socket() as silent:  # accepts connections, never answers: a server that hangs
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        for where, expected in ((port, TimeoutError), (1, OSError)):  # hangs, then refuses
            target = parse_database_url(f"postgresql://postgres@127.0.0.1:{where}/kraken")
            async with lender_on(target, settings_for(target, db_pool_timeout=0.3)) as lender:
                assert lender.counts() == (0, 0, 0)
                with pytest.raises(expected) as caught:
                    await Lease(lender).connection()
                assert request_fault(caught.value) == "unavailable"


@pytest.fixture
def new_york_db(new_york_dbs):
    return new_york_dbs("head")


async def test_the_pools_sessions_are_in_utc_whatever_the_databases_default(new_york_db, settings_for):
    db = new_york_db
    bare = await connect(db)
    try:
        assert await bare.fetchval("SHOW timezone") == "America/New_York"  # what a session is given otherwise
    finally:
        await bare.close()
    async with lender_on(db, settings_for(db, db_pool_size=2, db_max_overflow=0)) as lender:
        leases = [Lease(lender), Lease(lender)]  # two connections at once: each opened in UTC
        zones = [await (await lease.connection()).fetchval("SHOW timezone") for lease in leases]
        for lease in leases:
            await lease.end(succeeded=True)
    assert zones == ["UTC", "UTC"]
