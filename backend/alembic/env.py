"""Alembic environment: async (asyncpg), online and offline, serialized by an advisory lock.

Started from Alembic's async template. Additions:
- the URL comes from backend.config, the same settings code the service uses (DATABASE_URL,
  MIGRATIONS_DATABASE_URL, or the embedded PostgreSQL when neither is set);
- a connection handed in through ``config.attributes["connection"]`` (sync ``Connection`` or
  ``AsyncConnection``) is used instead of opening one: Alembic's connection-sharing recipe;
- every online run holds the migration advisory lock (backend.migration_lock) before it reads
  the version table, sets lock_timeout/statement_timeout after that, and retries a revision
  whose transaction hit the lock timeout;
- one log line per applied revision with its duration;
- ``revision`` numbers files 00N after the head, and an autogenerate that finds nothing
  writes no file;
- logging is configured from alembic.ini only when run from the alembic CLI, so running
  in-process never replaces the service's logging configuration.
"""

from __future__ import annotations

import asyncio
import logging
import time
from logging.config import fileConfig
from typing import Any

from alembic import command as alembic_command
from alembic import context
from alembic.operations import ops
from alembic.runtime.migration import MigrationContext, MigrationInfo
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from pydantic import ValidationError
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.util.concurrency import in_greenlet

from backend import database
from backend.config import ConfigError, Settings, get_settings
from backend.db_errors import describe, first_line, is_connection_error, sqlstate
from backend.migration_lock import MigrationLockTimeout, migration_lock, sleep
from backend.models import Base

config = context.config
# Only the alembic CLI sets cmd_opts: in-process callers keep their own logging configuration.
if config.cmd_opts is not None and config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

logger = logging.getLogger("backend.migrations")
target_metadata = Base.metadata
LOCK_NOT_AVAILABLE = "55P03"
DEADLOCK_DETECTED = "40P01"


def _settings() -> Settings:
    settings = config.attributes.get("settings")
    if isinstance(settings, Settings):
        return settings
    try:
        return get_settings()
    except ConfigError as exc:
        raise CommandError(str(exc)) from None


def _include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    # Other applications' tables in the same database are none of our business.
    if type_ == "table":
        return name is not None and (name in target_metadata.tables or name.startswith("kraken_"))
    return True


def _process_revision_directives(ctx: MigrationContext, revision: Any, directives: list[Any]) -> None:
    script: ops.MigrationScript = directives[0]
    cmd_opts = config.cmd_opts
    if cmd_opts is not None and getattr(cmd_opts, "autogenerate", False):
        upgrade_ops = script.upgrade_ops
        if upgrade_ops is not None and upgrade_ops.is_empty():
            directives[:] = []
            print("No changes in schema detected: no revision file written.")  # noqa: T201
            return
    if cmd_opts is None or not getattr(cmd_opts, "rev_id", None):
        script.rev_id = _next_revision_id()


def _next_revision_id() -> str:
    """Revisions are numbered 001, 002, ... like the baseline."""
    # All revisions, not only the heads: after `alembic merge` the head has a random id.
    revisions = ScriptDirectory.from_config(config).walk_revisions()
    numbers = [int(script.revision) for script in revisions if script.revision.isdigit()]
    return f"{max(numbers, default=0) + 1:03d}"


def _log_applied() -> Any:
    started = time.monotonic()

    def on_version_apply(*, ctx: MigrationContext, step: MigrationInfo, heads: set[str], run_args: Any) -> None:
        nonlocal started
        now = time.monotonic()
        doc = getattr(step.up_revision, "doc", "")
        verb = "applied" if step.is_upgrade else "reverted"
        logger.info("%s revision %s (%s) in %.0f ms", verb, step.up_revision_id, doc, (now - started) * 1000)
        started = now

    return on_version_apply


def _plain_revision() -> bool:
    """`alembic revision` without --autogenerate, or `merge`: env.py runs only to number the file."""
    opts = config.cmd_opts
    cmd: tuple[Any, ...] = getattr(opts, "cmd", None) or (None,)
    if cmd[0] is alembic_command.merge:
        return True
    return cmd[0] is alembic_command.revision and not getattr(opts, "autogenerate", False)


def run_migrations_offline() -> None:
    """Emit SQL to stdout: no database, no DATABASE_URL, no embedded server."""
    context.configure(
        dialect_name="postgresql",
        target_metadata=target_metadata,
        literal_binds=True,
        transaction_per_migration=True,
        include_name=_include_name,
        process_revision_directives=_process_revision_directives,
        as_sql=True,
    )
    if context.is_offline_mode():
        # The bounds an online run sets, so SQL applied by hand (psql -f) waits no longer for locks.
        for statement in _timeout_statements(_offline_settings()):
            context.execute(statement)
    with context.begin_transaction():
        context.run_migrations()


def _offline_settings() -> Settings:
    """--sql needs no database: a missing DATABASE_URL is fine, a bad timeout is still reported."""
    settings = config.attributes.get("settings")
    if isinstance(settings, Settings):
        return settings
    try:
        return Settings()
    except ValidationError:
        return _settings()  # get_settings() names the bad variable in one line


def _timeout_statements(settings: Settings) -> list[str]:
    return [
        f"SET lock_timeout = '{int(settings.ddl_lock_timeout * 1000)}ms'",
        f"SET statement_timeout = '{int(settings.ddl_statement_timeout * 1000)}ms'",
    ]


def _set_timeouts(connection: Connection, settings: Settings) -> None:
    """Session-level bounds for DDL, set once the advisory lock is held; a revision may SET LOCAL its own."""
    began = not connection.in_transaction()
    for statement in _timeout_statements(settings):
        connection.execute(text(statement))
    if (connection.dialect.server_version_info or (0,)) >= (14,):
        # If the runner dies during a long statement, the server notices within a second and
        # rolls the revision back, instead of finishing it for nobody while holding the lock.
        connection.execute(text("SET client_connection_check_interval = '1s'"))
    if began:
        # Leave no transaction open, so Alembic manages one per revision (and autocommit blocks work).
        connection.commit()


def _run_with_retries(settings: Settings) -> None:
    """Run pending revisions; a revision whose transaction hit lock_timeout, or was picked as a
    deadlock victim, is rolled back and retried from scratch."""
    attempts = settings.ddl_lock_retries + 1
    for attempt in range(1, attempts + 1):
        try:
            context.run_migrations()
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


def do_run_migrations(connection: Connection) -> None:
    settings = _settings()
    try:
        with migration_lock(connection.engine, settings.migration_lock_timeout):
            _set_timeouts(connection, settings)
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                compare_type=True,
                transaction_per_migration=True,
                include_name=_include_name,
                process_revision_directives=_process_revision_directives,
                on_version_apply=_log_applied(),
            )
            if _upgrading_past_unknown_revision(settings):
                return
            _run_with_retries(settings)
    except MigrationLockTimeout as exc:
        raise CommandError(str(exc)) from None
    except DBAPIError as exc:
        if is_connection_error(exc):
            raise
        # A revision's SQL failed (permission denied, statement_timeout, ...): its transaction is
        # rolled back; say what failed in one line instead of a traceback.
        raise CommandError(f"a revision failed: {first_line(exc)} (SQLSTATE {sqlstate(exc)})") from None


def _upgrading_past_unknown_revision(settings: Settings) -> bool:
    """`alembic upgrade` on a database ahead of this code (a deploy rolled back): apply KRAKEN_SCHEMA_AHEAD.

    With 'serve' the upgrade is a no-op with a warning, so the rollback's deploy can restart the
    service (which serves the newer schema the same way); with 'refuse' it fails in one line.
    """
    cmd: tuple[Any, ...] = getattr(config.cmd_opts, "cmd", None) or (None,)
    if cmd[0] is not alembic_command.upgrade:
        return False
    known = {script.revision for script in context.script.walk_revisions()}
    unknown = sorted(set(context.get_context().get_current_heads()) - known)
    if not unknown:
        return False
    message = f"database schema is at revision {','.join(unknown)}, which this code does not know"
    if settings.schema_ahead == "refuse":
        raise CommandError(f"{message}; refusing to upgrade (KRAKEN_SCHEMA_AHEAD=refuse)")
    logger.warning("%s; nothing to upgrade (KRAKEN_SCHEMA_AHEAD=serve)", message)
    return True


def _run_on_async_connection(connection: AsyncConnection) -> None:
    if not in_greenlet():
        # Sync code cannot wait on the event loop that owns the connection.
        raise CommandError(
            "an AsyncConnection was handed to env.py outside AsyncConnection.run_sync(); run the alembic "
            "command through 'await connection.run_sync(...)' so env.py can use it"
        )
    # Inside run_sync() the connection's sync facade works in this greenlet.
    do_run_migrations(connection.sync_connection)  # type: ignore[arg-type]


async def run_async_migrations(engine: AsyncEngine | None = None) -> None:
    """Run on a connection of our own: from ``engine`` if one was handed in, else from the settings."""
    if engine is not None:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
        return
    settings = _settings()
    try:
        target = await database.resolve_target(settings, migrations=True)
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    engine = database.create_migration_engine(target)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
    except (OSError, DBAPIError) as exc:
        if not is_connection_error(exc):
            raise
        raise CommandError(describe(exc, target)) from None
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    # Tools hand in a Connection or AsyncConnection (Alembic's recipe) or an Engine or
    # AsyncEngine (pytest-alembic); the CLI hands in nothing.
    connectable = config.attributes.get("connection")
    if connectable is None:
        asyncio.run(run_async_migrations())
    elif isinstance(connectable, AsyncEngine):
        asyncio.run(run_async_migrations(connectable))
    elif isinstance(connectable, AsyncConnection):
        _run_on_async_connection(connectable)
    elif isinstance(connectable, Engine):
        with connectable.connect() as connection:
            do_run_migrations(connection)
    else:
        do_run_migrations(connectable)


if context.is_offline_mode() or _plain_revision():
    run_migrations_offline()
else:
    run_migrations_online()
