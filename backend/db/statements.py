"""The one query path of domain SQL: statements written with ``:name`` parameters, sent by asyncpg.

A single statement goes out as one asyncpg statement on the session's connection: no BEGIN and
COMMIT round trips around it (a statement is atomic on its own), and inside the caller's
transaction when one is open (tests roll theirs back). Several statements that must hold
together run in ``transaction()``.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncSession

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


async def fetch_one(session: AsyncSession, statement: Statement, **params: Any) -> asyncpg.Record | None:
    return await (await driver(session)).fetchrow(statement.sql, *statement.args(params))


async def fetch_all(session: AsyncSession, statement: Statement, **params: Any) -> list[asyncpg.Record]:
    return list(await (await driver(session)).fetch(statement.sql, *statement.args(params)))


async def execute(session: AsyncSession, statement: Statement, **params: Any) -> str:
    """Run a statement that returns no rows; its command tag (``DELETE 1``)."""
    status: str = await (await driver(session)).execute(statement.sql, *statement.args(params))
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
