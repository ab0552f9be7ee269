"""The service's database at startup and shutdown.

At startup: ``run_migrations()``, the hook that brings the schema to where
``KRAKEN_MIGRATE_ON_STARTUP`` says and gives its status; the status handed from `kraken-backend`
to its worker processes; the pool requests use. At shutdown: the pool closed once requests have
settled their connections, and the embedded server let go.

The migrations themselves are in ``backend/migrations`` (the runner, the lock, the ledger) and
``backend/alembic``; the request path's connections in ``backend/db``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os

import asyncpg

from backend import metrics
from backend.config import ConfigError, Settings
from backend.db.embedded import release_servers
from backend.db.pool import SETTLE_SECONDS, PoolLender, create_pool
from backend.db.url import DatabaseTarget
from backend.migrations.revisions import SchemaStatus, read_revisions
from backend.migrations.runner import (
    DatabaseUnavailable,
    MigrationError,
    SchemaNotAtHead,
    check_schema,
    migrations_target,
    read_schema_status,
    run_migrations_measured,
)

logger = logging.getLogger(__name__)

# What stops a boot without a traceback: each is reported as one line.
STARTUP_ERRORS = (ConfigError, DatabaseUnavailable, MigrationError, SchemaNotAtHead)


async def run_migrations(settings: Settings) -> SchemaStatus:
    """The startup hook: apply KRAKEN_MIGRATE_ON_STARTUP (upgrade to head, check that it is there,
    or only look) and return the schema's status. `kraken-backend` calls it once before starting
    its workers; the app's lifespan calls it when no one did (`uvicorn backend.main:app`).

    (``backend.migrations.runner.run_migrations`` is the upgrade itself, which this calls in the
    ``upgrade`` mode.)"""
    if settings.migrate_on_startup == "upgrade":
        run = await run_migrations_measured(settings)
        if settings.metrics:
            metrics.record_migration(run)
        return run.status
    if settings.migrate_on_startup == "check":
        status = await check_schema(settings)
    else:
        status = await read_schema_status(await migrations_target(settings), wait=settings.db_connect_timeout)
    if settings.metrics:
        metrics.record_schema(status)
    return status


# Where `kraken-backend` hands its workers the schema's status (hand_schema_to_workers); not a setting.
HANDED_SCHEMA = "KRAKEN_SUPERVISOR_SCHEMA"


def hand_schema_to_workers(status: SchemaStatus) -> None:
    """Worker processes started from now on, replacements included, take ``status`` instead of
    reading it from the database: a worker's start needs no database, so one started during an
    outage serves (503 until the database is back) rather than failing and stopping the service.

    In the environment: uvicorn's supervisor starts every worker with this process's, the channel
    their settings already come through; a file would have to be written, found and removed.
    """
    os.environ[HANDED_SCHEMA] = json.dumps(status.current)


def handed_schema_status() -> SchemaStatus | None:
    """The status `kraken-backend` handed this worker process; None outside one."""
    handed = os.environ.get(HANDED_SCHEMA)
    if handed is None or multiprocessing.parent_process() is None:
        return None
    return SchemaStatus(tuple(json.loads(handed)), read_revisions())


async def create_service_pool(target: DatabaseTarget, settings: Settings) -> asyncpg.Pool:
    """The pool requests use, sized and configured by the settings (no connection opened yet)."""
    return await create_pool(
        target,
        size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        statement_cache=settings.db_statement_cache,
        statement_timeout=settings.db_statement_timeout or None,
    )


def service_lender(pool: asyncpg.Pool, settings: Settings) -> PoolLender:
    """Lends ``pool``'s connections to requests, as the settings say (and counted, with metrics on)."""
    lender = PoolLender(pool, size=settings.db_pool_size, timeout=settings.db_pool_timeout)
    if settings.metrics:
        metrics.watch_pool(lender)
    return lender


async def close_service_pool(lender: PoolLender, settings: Settings) -> None:
    """At shutdown: requests cut off still settle their connections (their statements cancelled
    on the database) before the pool goes; then the embedded server, if it is the one in use."""
    if not await lender.all_returned(timeout=SETTLE_SECONDS + 1):
        logger.warning("closing the pool with connections still out (their requests did not settle)")
    await lender.close()
    if settings.database_url is None:
        await asyncio.to_thread(release_servers)
