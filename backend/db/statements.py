"""The one query path of domain SQL: statements written with ``:name`` parameters, sent by asyncpg.

A single statement goes out as one asyncpg statement on the request's connection
(``backend.db.leases``): no BEGIN and COMMIT round trips around it (a statement is atomic on its
own), and inside the caller's transaction when one is open (tests roll theirs back). Several statements that must hold
together run in ``transaction()``.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg

from backend.db.errors import ConnectionLost, StatementTimeout, first_line, request_fault
from backend.db.pool import close_politely, closed, settle

T = TypeVar("T")
_NAMED = re.compile(r"(?<![:\w]):([a-z_]+)")


@dataclass(frozen=True)
class Statement:
    """SQL written with ``:name`` parameters, sent to asyncpg with ``$n`` ones."""

    named: str  # as written; ``text(named)`` runs it through SQLAlchemy (the benchmark does)
    sql: str
    names: tuple[str, ...]

    @classmethod
    def of(cls, named: str) -> Statement:
        names: list[str] = []

        def number(match: re.Match[str]) -> str:
            if match[1] not in names:
                names.append(match[1])
            return f"${names.index(match[1]) + 1}"

        return cls(named, _NAMED.sub(number, named), tuple(names))

    def args(self, params: dict[str, Any]) -> list[Any]:
        return [params[name] for name in self.names]


async def _run(conn: asyncpg.Connection, statement: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """Run ``statement`` on ``conn``; a connection it leaves broken is not pooled again.

    A connection stays pooled after a failed statement unless it is broken: closed (the server went
    away), or on a server that is going away or cannot take writes (a standby after a fail-over).
    Anything else, ``another operation is in progress`` included (the connection used by two
    statements at once: a bug), is the request's error, raised as it is.
    """
    try:
        return await statement(conn)
    except TimeoutError:
        # Only the statement is awaited here (the connection was lent before), so this is the
        # statement's timeout, never a connection attempt's. asyncpg has sent the server a
        # cancellation: wait for it, so that the statement stops there too (a lock wait included)
        # before the client hears 504.
        await settle(conn)
        raise StatementTimeout() from None
    except Exception as exc:
        if closed(conn):
            # The server went away: whatever asyncpg made of it (a connection error, or a protocol
            # error when the server's farewell, a FATAL sent to an idle connection, is read as the
            # next statement starts: asyncpg then closes the connection itself).
            raise ConnectionLost(first_line(exc)) from exc
        if isinstance(exc, asyncpg.PostgresError) and request_fault(exc) == "unavailable":
            await close_politely(conn)
        raise


async def fetch_one(conn: asyncpg.Connection, statement: Statement, **params: Any) -> asyncpg.Record | None:
    return await _run(conn, lambda conn: conn.fetchrow(statement.sql, *statement.args(params)))


async def fetch_all(conn: asyncpg.Connection, statement: Statement, **params: Any) -> list[asyncpg.Record]:
    return list(await _run(conn, lambda conn: conn.fetch(statement.sql, *statement.args(params))))


async def execute(conn: asyncpg.Connection, statement: Statement, **params: Any) -> str:
    """Run a statement that returns no rows; its command tag (``DELETE 1``)."""
    status: str = await _run(conn, lambda conn: conn.execute(statement.sql, *statement.args(params)))
    return status


@asynccontextmanager
async def transaction(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """Run the block's statements in one transaction: the caller's when one is open, else one of its own."""
    if conn.is_in_transaction():
        yield
        return
    async with conn.transaction():
        yield
