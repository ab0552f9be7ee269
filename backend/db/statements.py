"""The one query path of domain SQL: statements written with ``:name`` parameters, sent by asyncpg.

A single statement goes out as one asyncpg statement on the session's connection: no BEGIN and
COMMIT round trips around it (a statement is atomic on its own), and inside the caller's
transaction when one is open (tests roll theirs back). Several statements that must hold
together run in ``transaction()``.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
from sqlalchemy.ext.asyncio import AsyncSession

from backend.db.errors import ConnectionLost, StatementTimeout, first_line, request_fault

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


async def driver(session: AsyncSession) -> asyncpg.Connection:
    """The asyncpg connection under the session: checked out (and pinged) by the pool as usual."""
    connection = await session.connection()
    raw = await connection.get_raw_connection()
    conn: asyncpg.Connection = raw.driver_connection
    return conn


async def _run(session: AsyncSession, statement: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """Run ``statement`` on the session's connection; a connection it leaves in doubt is not pooled again.

    The statement goes to asyncpg directly, past SQLAlchemy's error handling, which would otherwise
    invalidate a connection that failed under it. A connection the server closed, one whose
    statement timed out (asyncpg cancels it and raises TimeoutError), and one that failed other
    than with a server's error are invalidated here: the pool opens a new one for the next request.
    """
    connection = await session.connection()
    conn: asyncpg.Connection = (await connection.get_raw_connection()).driver_connection
    try:
        return await statement(conn)
    except TimeoutError:
        # Only the statement is awaited here (the connection was checked out above), so this is
        # the statement's timeout, never a connection attempt's.
        await connection.invalidate()
        raise StatementTimeout() from None
    except Exception as exc:
        if conn.is_closed():
            # The server went away: whatever asyncpg made of it (a connection error, or a protocol
            # still waiting on a server that sent its last message), the request met an outage.
            await connection.invalidate()
            raise ConnectionLost(first_line(exc)) from exc
        if not isinstance(exc, asyncpg.PostgresError) or request_fault(exc) == "unavailable":
            await connection.invalidate()
        raise


async def fetch_one(session: AsyncSession, statement: Statement, **params: Any) -> asyncpg.Record | None:
    return await _run(session, lambda conn: conn.fetchrow(statement.sql, *statement.args(params)))


async def fetch_all(session: AsyncSession, statement: Statement, **params: Any) -> list[asyncpg.Record]:
    return list(await _run(session, lambda conn: conn.fetch(statement.sql, *statement.args(params))))


async def execute(session: AsyncSession, statement: Statement, **params: Any) -> str:
    """Run a statement that returns no rows; its command tag (``DELETE 1``)."""
    status: str = await _run(session, lambda conn: conn.execute(statement.sql, *statement.args(params)))
    return status


@asynccontextmanager
async def transaction(session: AsyncSession) -> AsyncIterator[None]:
    """Run the block's statements in one transaction: the caller's when one is open, else one of its own."""
    conn = await driver(session)
    if conn.is_in_transaction():
        yield
        return
    async with conn.transaction():
        yield
