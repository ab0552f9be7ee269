"""A request's database connection: lent on its first statement, given back when the request ends.

Requests use the pooled asyncpg connection itself, without an ORM session or a SQLAlchemy
``Connection`` around it: every statement the service sends goes to asyncpg directly
(``backend.db.statements``) and commits on its own, so a request has nothing to commit or roll
back at its end, only a connection to return. The pool stays SQLAlchemy's (bounded, with
overflow, a checkout timeout that answers 503, a liveness check on checkout); what goes is the
session and connection machinery set up and torn down around every request.

``RequestContext`` (the outermost middleware) holds one ``Lease`` per request and ends it after
the response is sent; routes reach the connection through ``backend.api.deps.ConnectionDep``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any, Protocol

import asyncpg
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool
from sqlalchemy.util import greenlet_spawn


class Lent(Protocol):
    """A connection out of its lender, and how it goes back."""

    connection: asyncpg.Connection

    async def give_back(self, succeeded: bool) -> None:
        """Return the connection; ``succeeded``: the request ended without a server or database error."""


class Lender(Protocol):
    async def lend(self) -> Lent: ...


# How long a failed request's connection may take to confirm that nothing of its statement runs on.
SETTLE_SECONDS = 2.0


class _Pooled:
    __slots__ = ("_fairy", "_pool", "_returned", "connection")

    def __init__(self, fairy: Any, pool: QueuePool, returned: Callable[[_Pooled], None]) -> None:
        self._fairy = fairy
        self._pool = pool
        self._returned = returned
        self.connection: asyncpg.Connection = fairy.driver_connection

    async def give_back(self, succeeded: bool) -> None:
        try:
            await self._give_back(succeeded)
        finally:
            self._returned(self)

    async def _give_back(self, succeeded: bool) -> None:
        # A connection that closed, or that a failed statement left in doubt (statements.py
        # closes those), leaves the pool now rather than failing the next checkout's check.
        # The pool's code is synchronous and awaits the driver through greenlet_spawn; but a
        # connection that goes back into a pool with room for it is only queued (the reset on
        # return is a no-op: no transaction was begun through SQLAlchemy), so the common case
        # skips the greenlet's cost. A full pool closes the connection (an overflow one): that awaits.
        if not succeeded and not self.connection.is_closed():
            # A statement interrupted by the request's cancellation (cut off at shutdown) is
            # cancelled on the server by a CancelRequest asyncpg sends from a task of its own,
            # which closing the connection now would abandon: the statement would run on (a
            # lock wait, then a commit) after the client was told 503. asyncpg sends a next
            # statement only once that cancellation is through.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.connection.execute("SELECT 1"), SETTLE_SECONDS)
        if self.connection.is_closed() or not succeeded or self.connection.is_in_transaction():
            # Also one whose request failed (a fault, a bug, cut off at shutdown: a statement may
            # have been interrupted mid-flight) or that is still in a transaction (an interrupted
            # delete): SQLAlchemy's reset on return only ends transactions begun through it.
            await greenlet_spawn(self._fairy.invalidate)
        elif self._pool.checkedin() < self._pool.size():
            self._fairy.close()
        else:
            await greenlet_spawn(self._fairy.close)


class PoolLender:
    """Lends connections from the service engine's pool: its size, overflow, checkout timeout and checks."""

    def __init__(self, engine: AsyncEngine) -> None:
        pool = engine.sync_engine.pool
        assert isinstance(pool, QueuePool)  # the service engine's (backend.db.engine.create_engine)
        self._pool = pool
        self._dialect = engine.dialect
        self._out: set[_Pooled] = set()
        self._all_back = asyncio.Event()
        self._all_back.set()

    async def lend(self) -> Lent:
        try:
            lent = _Pooled(await greenlet_spawn(self._pool.connect), self._pool, self._returned)
        except self._dialect.loaded_dbapi.Error as exc:
            # The dialect's adapter wraps the driver's connect errors in its own DB-API classes;
            # wrapped once more as the engine would (DBAPIError, the driver's error as the cause),
            # backend.db.errors reads them as it reads every other.
            raise DBAPIError.instance(None, None, exc, self._dialect.loaded_dbapi.Error, dialect=self._dialect) from exc
        self._out.add(lent)
        self._all_back.clear()
        return lent

    def _returned(self, lent: _Pooled) -> None:
        self._out.discard(lent)
        if not self._out:
            self._all_back.set()

    async def all_returned(self, timeout: float) -> bool:
        """Wait (up to ``timeout`` seconds) until every lent connection is back: at shutdown,
        uvicorn cancels requests past the grace and goes on without waiting for them, while
        their leases still settle their statements (see _Pooled.give_back)."""
        try:
            await asyncio.wait_for(self._all_back.wait(), timeout)
        except TimeoutError:
            return False
        return True


class NotStarted:
    """The lender of an app whose lifespan has not started: it has no engine yet."""

    async def lend(self) -> Lent:
        raise RuntimeError("no database connections before the app's lifespan has started")


class Lease:
    """One request's claim on a connection: taken on first use, so a request that sends no
    statement (a validation error, /health) never waits for the pool."""

    __slots__ = ("_lender", "_lent", "lent_at")

    def __init__(self, lender: Lender) -> None:
        self._lender = lender
        self._lent: Lent | None = None
        self.lent_at = 0.0  # time.monotonic() when the connection was lent

    async def connection(self) -> asyncpg.Connection:
        if self._lent is None:
            self._lent = await self._lender.lend()
            self.lent_at = time.monotonic()
        return self._lent.connection

    @property
    def used(self) -> bool:
        return self._lent is not None

    async def end(self, succeeded: bool) -> None:
        lent, self._lent = self._lent, None
        if lent is not None:
            await lent.give_back(succeeded)
