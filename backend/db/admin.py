"""Creating and dropping databases on a server: the embedded server's first boot, test runs and
benchmarks' scratch databases all use these."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import asyncpg

from backend.db.engine import connect
from backend.db.url import DatabaseTarget


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def create_database(server: DatabaseTarget, name: str) -> DatabaseTarget:
    """Create database ``name`` on ``server`` unless it exists; safe when processes race."""
    conn = await connect(server)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            try:
                await conn.execute(f"CREATE DATABASE {_quoted(name)}")
            except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
                pass  # another process created it between our check and our CREATE
    finally:
        await conn.close()
    return server.with_database(name)


async def copy_database(server: DatabaseTarget, template: str, name: str) -> DatabaseTarget:
    """Create database ``name`` on ``server`` as a copy of database ``template``, which must have
    no connections meanwhile (the server waits a few seconds for ones closing, then refuses)."""
    conn = await connect(server)
    try:
        await conn.execute(f"CREATE DATABASE {_quoted(name)} TEMPLATE {_quoted(template)}")
    finally:
        await conn.close()
    return server.with_database(name)


async def drop_databases(server: DatabaseTarget, names: Iterable[str], *, at_once: int = 8) -> None:
    """Drop each database, disconnecting whoever still uses it.

    ``at_once`` on as many connections: each DROP DATABASE waits for a checkpoint, and the server
    serves the drops waiting together with one (on a busy disk a checkpoint takes seconds: a test
    run's hundreds of databases took minutes one by one)."""
    pending = list(names)

    async def drop_pending() -> None:
        conn = await connect(server)
        try:
            while pending:
                await conn.execute(f"DROP DATABASE IF EXISTS {_quoted(pending.pop())} WITH (FORCE)")
        finally:
            await conn.close()

    await asyncio.gather(*(drop_pending() for _ in range(min(at_once, len(pending)))))


@asynccontextmanager
async def scratch_database(server: DatabaseTarget, prefix: str) -> AsyncIterator[DatabaseTarget]:
    """A new database ``<prefix>_<random hex>`` on ``server`` for the block, dropped after it."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    target = await create_database(server, name)
    try:
        yield target
    finally:
        await drop_databases(server, [name])
