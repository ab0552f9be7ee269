"""How this service connects: the arguments of every connection, bare connections, the migration
engine (requests lend theirs from asyncpg's pool: backend.db.pool).

Every connection this service opens gets here, so each is recognisable in ``pg_stat_activity``
by its ``application_name`` and honours the same URL options.
"""

from __future__ import annotations

from typing import Any

import asyncpg
from sqlalchemy import URL
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from backend.db.url import DatabaseTarget

ASYNC_DRIVER = "postgresql+asyncpg"
SERVICE_APPLICATION_NAME = "kraken-backend"
MIGRATION_APPLICATION_NAME = "kraken-migrate"
# The session the service's SQL is written for (backend.conversations.service), whatever the
# server's or the database's default: UTC. Times are written and read in it as UTC whether a
# column is `timestamp` or `timestamptz` (an assignment between the two, to_char of a
# timestamptz, a cast to date and a comparison across the types all go by the session's zone).
# A startup parameter, not a SET: PgBouncer tracks TimeZone per client and sets it on whichever
# server connection it lends, so it holds through a transaction-pooling proxy too.
SERVICE_SESSION = {"TimeZone": "UTC"}


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


def service_session(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` (from ``connect_kwargs``) for a connection that runs the service's SQL: in SERVICE_SESSION."""
    return {**kwargs, "server_settings": {**kwargs["server_settings"], **SERVICE_SESSION}}


async def connect(
    target: DatabaseTarget, application_name: str = MIGRATION_APPLICATION_NAME, *, statement_cache: bool = False
) -> asyncpg.Connection:
    """One bare asyncpg connection, bypassing SQLAlchemy: for one-query paths and administration.

    No statement cache by default: a connection used for a query or two gains nothing from one,
    and without it works behind a transaction-pooling proxy too.
    """
    connection: asyncpg.Connection = await asyncpg.connect(**connect_kwargs(target, application_name, statement_cache))
    return connection


def sqlalchemy_engine(connect: dict[str, Any], statement_cache: bool, **options: Any) -> AsyncEngine:
    """A SQLAlchemy engine on connections made from ``connect`` (``connect_kwargs``): migrations, and
    the write-path benchmark's session baselines."""
    # The URL names only the dialect: where to connect is all in connect_kwargs (SQLAlchemy's URL
    # cannot hold libpq's host lists).
    query = {} if statement_cache else {"prepared_statement_cache_size": "0"}  # SQLAlchemy's own cache
    return create_async_engine(URL.create(ASYNC_DRIVER, query=query), connect_args=connect, **options)


def create_migration_engine(target: DatabaseTarget, *, statement_cache: bool = True) -> AsyncEngine:
    """A pool-less engine: migrations open two connections (lock + work) and close them after."""
    return sqlalchemy_engine(
        connect_kwargs(target, MIGRATION_APPLICATION_NAME, statement_cache), statement_cache, poolclass=NullPool
    )
