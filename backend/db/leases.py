"""A request's database connection: lent on its first statement, given back when the request ends.

Requests use a pooled asyncpg connection itself, without an ORM session or a SQLAlchemy
``Connection`` around it: every statement the service sends goes to asyncpg directly
(``backend.db.statements``) and commits on its own, so a request has nothing to commit or roll
back at its end, only a connection to return. The lender is asyncpg's own pool
(``backend.db.pool``) in the service; tests lend their own transaction's connection.

``RequestContext`` (the outermost middleware) holds one ``Lease`` per request and ends it after
the response is sent; routes reach the connection through ``backend.api.deps.ConnectionDep``.
"""

from __future__ import annotations

import time
from typing import Protocol

import asyncpg


class Lent(Protocol):
    """A connection out of its lender, and how it goes back."""

    connection: asyncpg.Connection

    async def give_back(self, succeeded: bool) -> None:
        """Return the connection; ``succeeded``: the request ended without a server or database error."""


class Lender(Protocol):
    async def lend(self) -> Lent: ...


class NotStarted:
    """The lender of an app whose lifespan has not started: it has no pool yet."""

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
