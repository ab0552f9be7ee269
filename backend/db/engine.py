"""Engines and bare connections: the service's pooled engine (requests lease its connections:
backend.db.leases), the migration engine.

Every connection this service opens gets here, so each is recognisable in ``pg_stat_activity``
by its ``application_name`` and honours the same URL options.
"""

from __future__ import annotations

import time
from typing import Any

import asyncpg
from sqlalchemy import URL, event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool
from sqlalchemy.util import await_

from backend.db.url import DatabaseTarget

ASYNC_DRIVER = "postgresql+asyncpg"
SERVICE_APPLICATION_NAME = "kraken-backend"
MIGRATION_APPLICATION_NAME = "kraken-migrate"


def connect_kwargs(
    target: DatabaseTarget,
    application_name: str,
    statement_cache: bool = True,
    statement_timeout: float | None = None,
) -> dict[str, Any]:
    """``asyncpg.connect()`` arguments for ``target``: every connection this service opens, pooled or
    bare, is made from these, so a URL means the same everywhere."""
    kwargs: dict[str, Any] = {
        **target.asyncpg_arguments(),
        # A name given in the URL wins; otherwise holders of locks are recognisable in pg_stat_activity.
        "server_settings": {"application_name": target.application_name or application_name},
    }
    if target.connect_timeout is not None:
        kwargs["timeout"] = target.connect_timeout
    if not statement_cache:
        # Behind a transaction-pooling proxy (PgBouncer) a prepared statement lives on whichever
        # server connection the proxy lent for that transaction.
        kwargs["statement_cache_size"] = 0
    if statement_timeout:
        # Client-side: asyncpg cancels a statement that runs longer (the server rolls it back) and
        # raises TimeoutError. A server-side statement_timeout would be a startup parameter, which
        # PgBouncer refuses; this works through any proxy.
        kwargs["command_timeout"] = statement_timeout
    return kwargs


async def connect(
    target: DatabaseTarget, application_name: str = MIGRATION_APPLICATION_NAME, *, statement_cache: bool = False
) -> asyncpg.Connection:
    """One bare asyncpg connection, bypassing SQLAlchemy: for one-query paths and administration.

    No statement cache by default: a connection used for a query or two gains nothing from one,
    and without it works behind a transaction-pooling proxy too.
    """
    connection: asyncpg.Connection = await asyncpg.connect(**connect_kwargs(target, application_name, statement_cache))
    return connection


def _engine(target: DatabaseTarget, connect: dict[str, Any], statement_cache: bool, **options: Any) -> AsyncEngine:
    # The URL names only the dialect: where to connect is all in connect_kwargs (SQLAlchemy's URL
    # cannot hold libpq's host lists).
    query = {} if statement_cache else {"prepared_statement_cache_size": "0"}  # SQLAlchemy's own cache
    return create_async_engine(URL.create(ASYNC_DRIVER, query=query), connect_args=connect, **options)


def create_engine(
    target: DatabaseTarget,
    *,
    pool_size: int,
    max_overflow: int,
    pool_timeout: float,
    statement_cache: bool,
    statement_timeout: float | None,
) -> AsyncEngine:
    """The service's engine: a bounded pool, connections checked before use, statements bounded."""
    engine = _engine(
        target,
        connect_kwargs(target, SERVICE_APPLICATION_NAME, statement_cache, statement_timeout),
        statement_cache,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=pool_timeout,
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


def create_migration_engine(target: DatabaseTarget, *, statement_cache: bool = True) -> AsyncEngine:
    """A pool-less engine: migrations open two connections (lock + work) and close them after."""
    return _engine(
        target, connect_kwargs(target, MIGRATION_APPLICATION_NAME, statement_cache), statement_cache, poolclass=NullPool
    )
