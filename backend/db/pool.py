"""The service's connection pool: asyncpg's own (``asyncpg.create_pool``), lending connections to
requests' leases (``backend.db.leases``).

The settings map onto it as follows. ``KRAKEN_DB_POOL_SIZE`` + ``KRAKEN_DB_MAX_OVERFLOW`` is the
pool's ``max_size``; a connection given back while more than ``KRAKEN_DB_POOL_SIZE`` are open (an
overflow one) is closed rather than kept. ``KRAKEN_DB_POOL_TIMEOUT`` bounds ``Pool.acquire``. No
connection is opened before the first request (``min_size`` 0): a worker starts while the database
is away and answers 503 until it is back, without asyncpg reconnecting (and logging) in the
background. One idle for ``IDLE_CLOSE_SECONDS`` is closed (``max_inactive_connection_lifetime``).

A connection is thrown away only when it is broken (closed, or a statement of the failed request
still runs on it) or left inside a transaction; an application error (a 500) keeps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import cast

import asyncpg

from backend.db.engine import SERVICE_APPLICATION_NAME, connect_kwargs, service_session
from backend.db.url import DatabaseTarget

# Idle connections are closed after this long: before the idle timeouts of the NAT gateways and
# load balancers between a service and its database (often 350 s and up) silently cut them.
IDLE_CLOSE_SECONDS = 300.0
# A connection back in the pool for less than this is not pinged when lent (HikariCP's "alive
# bypass window"): it answered a moment ago. One the server closed meanwhile is replaced without a
# round trip: asyncpg marks a connection closed when its socket closes, and its pool reconnects.
PING_AFTER_IDLE_SECONDS = 1.0
# How long a failed request's connection may take to confirm that nothing of its statement runs on.
SETTLE_SECONDS = 2.0


class PoolBusy(Exception):
    """No pooled connection was free within KRAKEN_DB_POOL_TIMEOUT."""


class PooledConnection(asyncpg.Connection):  # type: ignore[misc]
    """asyncpg's connection, with when it last went back to the pool (None: never lent yet)."""

    returned_at: float | None = None


async def _returned(conn: PooledConnection) -> None:
    """The pool's reset on release: the time, and nothing sent. asyncpg's default reset (``RESET ALL``,
    ``UNLISTEN *``, ``CLOSE ALL``, advisory unlocks) is a round trip per request undoing what requests
    never do; a transaction left open, the one state they can leave, is never given back (the lender
    closes such a connection first)."""
    conn.returned_at = time.monotonic()


async def create_pool(
    target: DatabaseTarget,
    *,
    size: int,
    max_overflow: int,
    statement_cache: bool,
    statement_timeout: float | None,
) -> asyncpg.Pool:
    """The pool of the service's connections: none opened yet (see the module's docstring)."""
    pool: asyncpg.Pool = await asyncpg.create_pool(
        **service_session(connect_kwargs(target, SERVICE_APPLICATION_NAME, statement_cache, statement_timeout)),
        min_size=0,
        max_size=size + max_overflow,
        max_inactive_connection_lifetime=IDLE_CLOSE_SECONDS,
        reset=_returned,
        connection_class=PooledConnection,
    )
    return pool


class _Pooled:
    __slots__ = ("_lender", "connection")

    def __init__(self, lender: PoolLender, connection: asyncpg.Connection) -> None:
        self._lender = lender
        self.connection = connection

    async def give_back(self, succeeded: bool) -> None:
        await self._lender.take_back(self.connection, succeeded)


class PoolLender:
    """Lends the pool's connections: within its acquire timeout, each checked when it sat idle a while."""

    def __init__(self, pool: asyncpg.Pool, *, size: int, timeout: float) -> None:
        self.pool = pool
        self._size = size
        self._timeout = timeout
        self._out: set[asyncpg.Connection] = set()
        self._all_back = asyncio.Event()
        self._all_back.set()
        # Called whenever what the pool holds may have changed (the metrics' gauges), or None.
        self.on_change: Callable[[], None] | None = None

    def counts(self) -> tuple[int, int, int]:
        """(in use, idle, overflow): connections lent, open in the pool, open beyond the pool's size."""
        open_ = self.pool.get_size()
        idle = self.pool.get_idle_size()
        return open_ - idle, idle, max(open_ - self._size, 0)

    async def lend(self) -> _Pooled:
        deadline = time.monotonic() + self._timeout
        while True:
            conn = await self._acquire(deadline)
            if await self._alive(conn):
                break
        self._out.add(conn)
        self._all_back.clear()
        self._changed()
        return _Pooled(self, conn)

    async def _acquire(self, deadline: float) -> asyncpg.Connection:
        try:
            # asyncio.timeout, not acquire(timeout=): that wraps every acquire in a task of its own.
            async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
                # A PoolConnectionProxy: Connection's methods, detached once it is released.
                return cast(asyncpg.Connection, await self.pool.acquire())
        except TimeoutError:
            if self.pool.get_size() < self.pool.get_max_size():
                # Not every connection was open, so the wait went to opening one: the server is
                # slow to answer or unreachable (connect timeouts are longer than the pool's).
                raise TimeoutError("timed out connecting to the database") from None
            raise PoolBusy() from None

    async def _alive(self, conn: asyncpg.Connection) -> bool:
        """True unless ``conn`` sat idle a while and fails one simple-protocol query (safe behind
        PgBouncer: nothing is prepared); then it is closed, and the pool opens another."""
        returned_at = cast(PooledConnection, conn).returned_at  # the proxy forwards attributes
        if returned_at is None:  # just opened
            conn.add_termination_listener(self._closed)  # closed idle (by the server, or for idling)
            return True
        if time.monotonic() - returned_at < PING_AFTER_IDLE_SECONDS:
            return True
        try:
            await conn.execute("SELECT 1")
        except Exception:
            with contextlib.suppress(Exception):
                conn.terminate()
            await self.pool.release(conn)
            return False
        return True

    async def take_back(self, conn: asyncpg.Connection, succeeded: bool) -> None:
        """Return a lent connection; ``succeeded``: its request ended without a 5xx."""
        try:
            if not succeeded and not closed(conn):
                await settle(conn)
            if closed(conn):
                pass  # its holder is back in the pool already, which opens another when one is wanted
            elif conn.is_in_transaction():
                # Left inside a transaction (an interrupted delete): what it did is rolled back
                # when the server sees it go, and no next request inherits it.
                await close_politely(conn)
            elif self.pool.get_size() > self._size:
                await close_politely(conn)  # an overflow connection
            await self.pool.release(conn, timeout=SETTLE_SECONDS)  # waits for a cancellation under way
        except Exception:
            # The release failed (asyncpg closed the connection): make sure it is gone.
            with contextlib.suppress(Exception):
                conn.terminate()
            with contextlib.suppress(Exception):
                await self.pool.release(conn)
        finally:
            self._out.discard(conn)
            if not self._out:
                self._all_back.set()
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _closed(self, conn: asyncpg.Connection) -> None:
        self._changed()

    async def all_returned(self, timeout: float) -> bool:
        """Wait (up to ``timeout`` seconds) until every lent connection is back: at shutdown,
        uvicorn cancels requests past the grace and goes on without waiting for them, while
        their leases still settle their statements (see ``settle``)."""
        try:
            await asyncio.wait_for(self._all_back.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Close every connection (those still lent are cut off after SETTLE_SECONDS)."""
        try:
            await asyncio.wait_for(self.pool.close(), SETTLE_SECONDS)
        except TimeoutError:
            self.pool.terminate()
        self._changed()


async def settle(conn: asyncpg.Connection) -> None:
    """After a failed request, make sure nothing of its statements runs on: a statement it left
    (cut off at shutdown, cancelled by its timeout) is cancelled on the server by a CancelRequest
    asyncpg sends from a task of its own, and asyncpg sends a next statement only once that
    cancellation is through. A connection that cannot answer within SETTLE_SECONDS, or that a
    statement of the request still uses (concurrent use: a bug), is closed."""
    try:
        await asyncio.wait_for(conn.execute("SELECT 1"), SETTLE_SECONDS)
    except Exception:
        with contextlib.suppress(Exception):
            conn.terminate()


def closed(conn: asyncpg.Connection) -> bool:
    """Whether ``conn`` (lent from the pool) is closed. asyncpg's pool detaches a lent connection
    the moment it closes (its holder goes back to the pool), after which each of its methods
    raises InterfaceError ("connection has been released back to the pool")."""
    try:
        return bool(conn.is_closed())
    except asyncpg.InterfaceError:
        return True


async def close_politely(conn: asyncpg.Connection) -> None:
    """Close a connection in doubt politely: the server rolls back what it left open, and a
    cancellation asyncpg sent for its statement reaches the server first (a lock wait stops
    too); one that cannot say goodbye within SETTLE_SECONDS is dropped."""
    try:
        await conn.close(timeout=SETTLE_SECONDS)
    except Exception:
        with contextlib.suppress(Exception):
            conn.terminate()
