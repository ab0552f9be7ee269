"""Bringing the schema to head: at boot (``run_migrations()``), for the CLI (env.py), and the rules both follow.

``run_migrations()`` is built for many replicas booting at once: when the database is already
at head it costs one bare asyncpg connection and one query, and takes no lock. Otherwise it
hands a connection to Alembic (the connection-sharing recipe); env.py calls ``migrate_locked()``,
which serializes runners with an advisory lock and lets Alembic re-read the version under it, so
late arrivals find nothing to do.

Everything env.py decides lives here, importable and unit-tested: the lock, the timeouts, the
retries, the "database ahead of the code" rule, and how failures become one line.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import asyncpg
from alembic import command
from alembic.runtime.migration import MigrationContext, MigrationInfo
from alembic.util import CommandError
from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from backend.config import Settings, get_settings, resolve_target
from backend.db.engine import connect, create_migration_engine
from backend.db.errors import describe, first_line, is_connection_error, is_pooler_symptom, is_retriable, sqlstate
from backend.db.url import DatabaseTarget
from backend.migrations.lock import MigrationLockTimeout, TransactionPooler, migration_lock, sleep
from backend.migrations.revisions import ALEMBIC_DIR, SchemaStatus, alembic_config, read_revisions

logger = logging.getLogger(__name__)

LOCK_NOT_AVAILABLE = "55P03"
DEADLOCK_DETECTED = "40P01"


class DatabaseUnavailable(Exception):
    """The database could not be reached (in time); the message is one line."""


class MigrationError(Exception):
    """Migrations could not bring the schema to head; the message is one line."""


class SchemaNotAtHead(Exception):
    """KRAKEN_MIGRATE_ON_STARTUP=check found the schema behind (or ahead of) the code."""


# --- reading the schema revision -----------------------------------------------------------


async def read_schema_status(
    target: DatabaseTarget, *, wait: float = 0.0, script_location: Path = ALEMBIC_DIR
) -> SchemaStatus:
    """The database's recorded revision(s), connecting with retries for up to ``wait`` seconds."""
    deadline = time.monotonic() + wait
    delay, attempt = 0.25, 1
    while True:
        try:
            conn = await connect(target)
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


# --- the database ahead of the code --------------------------------------------------------


# What each caller says after the shared sentence: (KRAKEN_SCHEMA_AHEAD=refuse, =serve).
_AHEAD_OUTCOME = {
    "start": (
        " (its head is {heads}); was a newer release rolled back? Refusing to start (KRAKEN_SCHEMA_AHEAD=refuse).",
        " (its head is {heads}); was a newer release rolled back? Serving anyway (KRAKEN_SCHEMA_AHEAD=serve).",
    ),
    "upgrade": (
        "; refusing to upgrade (KRAKEN_SCHEMA_AHEAD=refuse)",
        "; nothing to upgrade (KRAKEN_SCHEMA_AHEAD=serve)",
    ),
}


def schema_ahead(status: SchemaStatus, settings: Settings, *, action: Literal["start", "upgrade"]) -> None:
    """The database records a revision this code does not know (a deploy was rolled back).

    KRAKEN_SCHEMA_AHEAD=refuse: raise MigrationError. serve (the default): warn, and the caller
    carries on without migrating: revisions are additive, so the older code works on the newer
    schema, and refusing would turn a rollback into an outage. ``action`` is what the caller
    would refuse to do: "start" (the service) or "upgrade" (the CLI).
    """
    refused, served = _AHEAD_OUTCOME[action]
    message = f"database schema is at revision {','.join(status.unknown)}, which this code does not know"
    heads = ",".join(sorted(status.heads))
    if settings.schema_ahead == "refuse":
        raise MigrationError(message + refused.format(heads=heads))
    logger.warning("%s", message + served.format(heads=heads))


# --- migrating at boot ---------------------------------------------------------------------


async def migrations_target(settings: Settings) -> DatabaseTarget:
    """Where migrations connect: a server that accepts writes. Whatever the URL asks of
    target_session_attrs (libpq's default is any), DDL never goes to a standby."""
    target = await resolve_target(settings, migrations=True)
    if target.option("target_session_attrs") == "primary":
        return target
    return target.with_options(target_session_attrs="read-write")


async def run_on_connection(
    target: DatabaseTarget, work: Callable[[Connection], None], *, statement_cache: bool = True
) -> None:
    """Run ``work`` (Alembic, through env.py) on a migration connection of its own; an unreachable
    database becomes DatabaseUnavailable, one behind a transaction pooler MigrationError."""
    engine = create_migration_engine(target, statement_cache=statement_cache)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(work)
    except (OSError, DBAPIError) as exc:
        if is_pooler_symptom(exc):
            raise MigrationError(str(TransactionPooler())) from None
        if not is_connection_error(exc):
            raise
        raise DatabaseUnavailable(describe(exc, target)) from None
    finally:
        await engine.dispose()


async def run_migrations(settings: Settings | None = None, *, script_location: Path = ALEMBIC_DIR) -> SchemaStatus:
    """Bring the schema to head; return where it ended. Safe to call from many processes at once."""
    settings = settings or get_settings()
    target = await migrations_target(settings)
    status = await read_schema_status(target, wait=settings.db_connect_timeout, script_location=script_location)
    if status.at_head:
        return status
    if status.ahead:
        schema_ahead(status, settings, action="start")
        return status

    def upgrade(connection: Connection) -> None:
        cfg = alembic_config(script_location)
        cfg.attributes["settings"] = settings
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")

    started = time.monotonic()
    try:
        await run_on_connection(target, upgrade, statement_cache=settings.db_statement_cache)
    except CommandError as exc:
        raise MigrationError(str(exc).splitlines()[0]) from None
    status = await read_schema_status(target, script_location=script_location)
    logger.info("schema at revision %s (%.0f ms)", status.revision, (time.monotonic() - started) * 1000)
    return status


async def check_schema(settings: Settings) -> SchemaStatus:
    """KRAKEN_MIGRATE_ON_STARTUP=check: refuse unless the database is at head."""
    status = await read_schema_status(await migrations_target(settings), wait=settings.db_connect_timeout)
    if status.at_head:
        return status
    if status.ahead:
        schema_ahead(status, settings, action="start")
        return status
    raise SchemaNotAtHead(
        f"database schema is at revision {status.revision or 'none'}, code expects "
        f"{','.join(sorted(status.heads))}; run 'uv run alembic upgrade head' (KRAKEN_MIGRATE_ON_STARTUP=check)"
    )


# --- what env.py runs under the lock ----------------------------------------------------------


def timeout_statements(settings: Settings) -> list[str]:
    """The DDL bounds: set on every online run's session, and at the top of the offline SQL."""
    return [
        f"SET lock_timeout = '{int(settings.ddl_lock_timeout * 1000)}ms'",
        f"SET statement_timeout = '{int(settings.ddl_statement_timeout * 1000)}ms'",
    ]


def _set_session_bounds(connection: Connection, settings: Settings) -> None:
    """Session-level bounds for DDL, set once the advisory lock is held; a revision may SET LOCAL its own."""
    began = not connection.in_transaction()
    for statement in timeout_statements(settings):
        connection.execute(text(statement))
    if (connection.dialect.server_version_info or (0,)) >= (14,):
        # If the runner dies during a long statement, the server notices within a second and
        # rolls the revision back, instead of finishing it for nobody while holding the lock.
        connection.execute(text("SET client_connection_check_interval = '1s'"))
    if began:
        # Leave no transaction open, so Alembic manages one per revision (and autocommit blocks work).
        connection.commit()


def run_with_retries(run: Callable[[], None], settings: Settings) -> None:
    """Run pending revisions; a revision whose transaction hit lock_timeout, or was picked as a
    deadlock victim, is rolled back and retried from scratch."""
    attempts = settings.ddl_lock_retries + 1
    for attempt in range(1, attempts + 1):
        try:
            run()
            return
        except DBAPIError as exc:
            state = sqlstate(exc)
            if state not in (LOCK_NOT_AVAILABLE, DEADLOCK_DETECTED):
                raise
            if attempt == attempts:
                problem = (
                    f"could not get its table lock within lock_timeout ({settings.ddl_lock_timeout:g} s)"
                    if state == LOCK_NOT_AVAILABLE
                    else "deadlocked with another session"
                )
                raise CommandError(
                    f"a revision {problem} in {attempts} attempts; another session holds a conflicting lock "
                    "on a table it changes. Its current transaction was rolled back (a revision that commits "
                    "part-way resumes on the next run)."
                ) from None
            wait = min(0.5 * 2 ** (attempt - 1), 10.0)
            logger.warning(
                "revision %s (attempt %d of %d); rolled back, retrying in %.1f s",
                "hit lock_timeout" if state == LOCK_NOT_AVAILABLE else "was picked as a deadlock victim",
                attempt,
                attempts,
                wait,
            )
            sleep(wait)


def log_applied() -> Callable[..., None]:
    """Alembic's ``on_version_apply`` hook: one log line per revision applied or reverted, with its duration."""
    started = time.monotonic()

    def on_version_apply(*, ctx: MigrationContext, step: MigrationInfo, heads: set[str], run_args: Any) -> None:
        nonlocal started
        now = time.monotonic()
        doc = getattr(step.up_revision, "doc", "")
        verb = "applied" if step.is_upgrade else "reverted"
        logger.info("%s revision %s (%s) in %.0f ms", verb, step.up_revision_id, doc, (now - started) * 1000)
        started = now

    return on_version_apply


def migrate_locked(
    connection: Connection,
    settings: Settings,
    *,
    configure: Callable[[], MigrationContext],
    run: Callable[[], None],
    upgrading: bool,
    script_location: Path,
) -> None:
    """An online run: hold the migration lock, bound the session, then ``configure`` Alembic's
    context (which reads the version table, under the lock) and ``run`` the revisions with retries.

    ``upgrading``: an ``alembic upgrade`` on a database ahead of this code follows
    KRAKEN_SCHEMA_AHEAD; with 'serve' it changes nothing, so a rollback's deploy reaches its restart.
    Failures become a ``CommandError`` of one line (Alembic prints ``FAILED: <line>``).
    """
    try:
        with migration_lock(connection.engine, settings.migration_lock_timeout, work=connection):
            _set_session_bounds(connection, settings)
            ctx = configure()
            if upgrading:
                status = SchemaStatus(tuple(ctx.get_current_heads()), read_revisions(script_location))
                if status.ahead:
                    schema_ahead(status, settings, action="upgrade")
                    return
            run_with_retries(run, settings)
    except (MigrationLockTimeout, TransactionPooler, MigrationError) as exc:
        raise CommandError(str(exc)) from None
    except DBAPIError as exc:
        if is_pooler_symptom(exc):
            raise CommandError(str(TransactionPooler())) from None
        if is_connection_error(exc):
            raise
        # A revision's SQL failed (permission denied, statement_timeout, ...): its transaction is
        # rolled back; say what failed in one line instead of a traceback.
        raise CommandError(f"a revision failed: {first_line(exc)} (SQLSTATE {sqlstate(exc)})") from None
