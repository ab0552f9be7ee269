"""Engines, sessions, and bringing the schema to head at boot.

``run_migrations()`` is built for many replicas booting at once: when the database is already
at head it costs one bare asyncpg connection and one query, and takes no lock. Otherwise it
hands a connection to Alembic (the connection-sharing recipe); env.py serializes runners with
an advisory lock and re-reads the version under it, so late arrivals find nothing to do.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Any

import asyncpg
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from fastapi import Depends, Request
from sqlalchemy import Connection, event
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool
from sqlalchemy.util import await_

from backend.config import Settings, get_settings
from backend.db_errors import describe, is_connection_error, is_retriable
from backend.db_url import DatabaseTarget
from backend.embedded_postgres import embedded_database

logger = logging.getLogger("backend.migrations")

ALEMBIC_DIR = Path(__file__).resolve().parent / "alembic"
SERVICE_APPLICATION_NAME = "kraken-backend"
MIGRATION_APPLICATION_NAME = "kraken-migrate"


class DatabaseUnavailable(Exception):
    """The database could not be reached (in time); the message is one line."""


class MigrationError(Exception):
    """Migrations could not bring the schema to head; the message is one line."""


class SchemaNotAtHead(Exception):
    """KRAKEN_MIGRATE_ON_STARTUP=check found the schema behind (or ahead of) the code."""


@dataclass(frozen=True)
class Revisions:
    """A script directory's revision graph: revision -> the revisions it follows."""

    graph: dict[str, tuple[str, ...]]

    @property
    def heads(self) -> frozenset[str]:
        parents = {down for downs in self.graph.values() for down in downs}
        return frozenset(rev for rev in self.graph if rev not in parents)


@dataclass(frozen=True)
class SchemaStatus:
    current: tuple[str, ...]
    revisions: Revisions

    @property
    def heads(self) -> frozenset[str]:
        return self.revisions.heads

    @property
    def at_head(self) -> bool:
        return frozenset(self.current) == self.heads

    @property
    def ahead(self) -> bool:
        """The database records a revision this code does not know (e.g. after a rollback)."""
        return any(rev not in self.revisions.graph for rev in self.current)

    @property
    def revision(self) -> str | None:
        return ",".join(sorted(self.current)) or None


# --- targets and engines -------------------------------------------------------------------


async def resolve_target(settings: Settings, *, migrations: bool = False) -> DatabaseTarget:
    """The configured database, or the embedded one when DATABASE_URL is unset."""
    target = settings.migrations_target() if migrations else settings.database_target()
    if target is None:
        target = await embedded_database(settings.embedded_pgdata)
    return target


def _connect_args(target: DatabaseTarget, application_name: str, statement_cache: bool = True) -> dict[str, Any]:
    args = dict(target.connect_args)
    # A name given in the URL wins; otherwise holders of locks are recognisable in pg_stat_activity.
    args["server_settings"] = {"application_name": application_name, **args.get("server_settings", {})}
    if not statement_cache:
        args["statement_cache_size"] = 0
    return args


def create_engine(target: DatabaseTarget, settings: Settings) -> AsyncEngine:
    """The service's engine: a bounded pool, connections checked before use."""
    url = target.url
    if not settings.db_statement_cache:
        # Behind a transaction-pooling proxy neither asyncpg's nor SQLAlchemy's cache may prepare.
        url = url.update_query_dict({"prepared_statement_cache_size": "0"})
    engine = create_async_engine(
        url,
        connect_args=_connect_args(target, SERVICE_APPLICATION_NAME, settings.db_statement_cache),
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_recycle=1800,
    )
    event.listen(engine.sync_engine, "checkin", _stamp_checkin)
    event.listen(engine.sync_engine, "checkout", _check_on_checkout)
    return engine


# A connection back in the pool for less than this is not pinged on checkout (HikariCP's "alive
# bypass window"): it answered a moment ago. One the server closed meanwhile is still caught,
# without a round trip: asyncpg marks a connection closed when its socket closes.
PING_AFTER_IDLE_SECONDS = 1.0


def _stamp_checkin(dbapi_connection: Any, connection_record: Any) -> None:
    connection_record.info["checked_in"] = time.monotonic()


def _check_on_checkout(dbapi_connection: Any, connection_record: Any, connection_proxy: Any) -> None:
    """Make sure a connection leaving the pool is alive; a dead one is replaced (the pool retries).

    Instead of ``pool_pre_ping``, which on asyncpg sends BEGIN, ``;`` and ROLLBACK on every
    checkout: as many round trips as the rest of a typical request. Here a connection idle for a
    while gets one simple-protocol query, as safe behind PgBouncer's transaction pooling (nothing
    is prepared); ``;`` would do, but asyncpg cannot read the empty command tag it returns.
    """
    driver = dbapi_connection.driver_connection
    if driver.is_closed():
        raise DisconnectionError("connection closed while in the pool")
    checked_in = connection_record.info.get("checked_in")  # None: just opened
    if checked_in is None or time.monotonic() - checked_in < PING_AFTER_IDLE_SECONDS:
        return
    try:
        await_(driver.execute("SELECT 1"))
    except Exception as exc:
        raise DisconnectionError(f"connection failed its check: {type(exc).__name__}") from exc


def create_migration_engine(target: DatabaseTarget) -> AsyncEngine:
    """A pool-less engine: migrations open two connections (lock + work) and close them after."""
    return create_async_engine(
        target.url, connect_args=_connect_args(target, MIGRATION_APPLICATION_NAME), poolclass=NullPool
    )


def create_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One session per request: committed if the handler succeeds, rolled back if it raises.

    The conversation service sends single statements straight through the session's asyncpg
    connection (no BEGIN): each commits on its own, and joins the transaction when one is open.
    """
    factory: async_sessionmaker[AsyncSession] = request.app.state.session_factory
    async with factory() as session:
        try:
            yield session
            await session.commit()
        except BaseException:
            await session.rollback()
            raise


# scope="function": commit before the response is sent. With FastAPI's default ("request") the
# client could get 201 for a write that is not committed yet (or never will be), and a next
# request could miss it.
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]


# --- the script directory, read cheaply ----------------------------------------------------

_REVISION = re.compile(r"^revision(?:\s*:\s*[^=]+)?\s*=\s*['\"]([^'\"]+)['\"]", re.MULTILINE)
_DOWN = re.compile(r"^down_revision(?:\s*:\s*[^=]+)?\s*=\s*(.+)$", re.MULTILINE)
_QUOTED = re.compile(r"['\"]([^'\"]+)['\"]")


def alembic_config(settings: Settings | None = None, script_location: Path = ALEMBIC_DIR) -> Config:
    """An Alembic config for in-process use: no alembic.ini, so no logging set-up."""
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    if settings is not None:
        cfg.attributes["settings"] = settings
    return cfg


@cache
def read_revisions(script_location: Path = ALEMBIC_DIR) -> Revisions:
    """The revision graph, read from the files' text without importing them.

    Importing every revision module costs about a millisecond per file, and a boot at head needs
    only the ids. Falls back to Alembic when a file does not declare them as plain literals.
    """
    graph: dict[str, tuple[str, ...]] = {}
    for path in sorted((script_location / "versions").glob("*.py")):
        source = path.read_text(encoding="utf-8")
        rev, down = _REVISION.search(source), _DOWN.search(source)
        # A value spread over lines ("down_revision = (\n") is beyond this reader: ask Alembic.
        if rev is None or down is None or down.group(1).count("(") != down.group(1).count(")"):
            script = ScriptDirectory.from_config(alembic_config(script_location=script_location))
            return Revisions({s.revision: tuple(s._all_down_revisions) for s in script.walk_revisions()})
        graph[rev.group(1)] = tuple(_QUOTED.findall(down.group(1)))
    return Revisions(graph)


# --- reading the schema revision -----------------------------------------------------------


async def read_schema_status(
    target: DatabaseTarget, *, wait: float = 0.0, script_location: Path = ALEMBIC_DIR
) -> SchemaStatus:
    """The database's recorded revision(s), connecting with retries for up to ``wait`` seconds."""
    deadline = time.monotonic() + wait
    delay, attempt = 0.25, 1
    while True:
        try:
            conn = await asyncpg.connect(
                **{**target.asyncpg_connect_kwargs(), **_connect_args(target, MIGRATION_APPLICATION_NAME)}
            )
            break
        except Exception as exc:
            if not is_connection_error(exc):
                raise
            remaining = deadline - time.monotonic()
            if not is_retriable(exc) or remaining <= 0:
                waited = f" (waited {wait:g} s)" if wait and is_retriable(exc) else ""
                raise DatabaseUnavailable(describe(exc, target) + waited) from None
            pause = min(delay, remaining)
            logger.warning(
                "database not reachable (attempt %d): %s; retrying in %.1f s",
                attempt,
                describe(exc, target),
                pause,
            )
            await asyncio.sleep(pause)
            delay, attempt = min(delay * 2, 5.0), attempt + 1
    try:
        rows = await conn.fetch("SELECT version_num FROM alembic_version")
    except asyncpg.UndefinedTableError:
        rows = []
    finally:
        await conn.close()
    return SchemaStatus(tuple(row[0] for row in rows), read_revisions(script_location))


# --- migrating -----------------------------------------------------------------------------


def _upgrade(connection: Connection, cfg: Config) -> None:
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "head")


async def run_migrations(settings: Settings | None = None, *, script_location: Path = ALEMBIC_DIR) -> SchemaStatus:
    """Bring the schema to head; return where it ended. Safe to call from many processes at once."""
    settings = settings or get_settings()
    target = await resolve_target(settings, migrations=True)
    status = await read_schema_status(target, wait=settings.db_connect_timeout, script_location=script_location)
    if status.at_head:
        return status
    if status.ahead:
        return _schema_ahead(status, settings)

    started = time.monotonic()
    engine = create_migration_engine(target)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_upgrade, alembic_config(settings, script_location))
    except CommandError as exc:
        raise MigrationError(str(exc).splitlines()[0]) from None
    except (OSError, DBAPIError) as exc:
        if not is_connection_error(exc):
            raise
        raise DatabaseUnavailable(describe(exc, target)) from None
    finally:
        await engine.dispose()
    status = await read_schema_status(target, script_location=script_location)
    logger.info("schema at revision %s (%.0f ms)", status.revision, (time.monotonic() - started) * 1000)
    return status


def _schema_ahead(status: SchemaStatus, settings: Settings) -> SchemaStatus:
    message = (
        f"database schema is at revision {status.revision}, which this code does not know "
        f"(its head is {','.join(sorted(status.heads))}); was a newer release rolled back?"
    )
    if settings.schema_ahead == "refuse":
        raise MigrationError(message + " Refusing to start (KRAKEN_SCHEMA_AHEAD=refuse).")
    logger.warning("%s Serving anyway (KRAKEN_SCHEMA_AHEAD=serve).", message)
    return status


async def check_schema(settings: Settings) -> SchemaStatus:
    """KRAKEN_MIGRATE_ON_STARTUP=check: refuse unless the database is at head."""
    target = await resolve_target(settings, migrations=True)
    status = await read_schema_status(target, wait=settings.db_connect_timeout)
    if status.at_head:
        return status
    if status.ahead:
        return _schema_ahead(status, settings)
    raise SchemaNotAtHead(
        f"database schema is at revision {status.revision or 'none'}, code expects "
        f"{','.join(sorted(status.heads))}; run 'uv run alembic upgrade head' (KRAKEN_MIGRATE_ON_STARTUP=check)"
    )
