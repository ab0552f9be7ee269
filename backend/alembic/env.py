"""Alembic environment: async (asyncpg), online and offline. Wiring only: the policy it applies
(lock, timeouts, retries, numbering, the "database ahead of the code" rule) lives in
``backend.migrations.runner``, where the service and the tests use it too.

Started from Alembic's async template. Additions:
- the URL comes from backend.config, the same settings code the service uses (DATABASE_URL,
  MIGRATIONS_DATABASE_URL, or the embedded PostgreSQL when neither is set);
- a connection handed in through ``config.attributes["connection"]`` (sync ``Connection`` or
  ``AsyncConnection``) is used instead of opening one: Alembic's connection-sharing recipe;
- every online run goes through ``runner.migrate_locked()``: one that moves the database holds the
  migration lock, is recorded in the ledger (``alembic_ledger``) and validates the applied
  revisions' checksums first; read-only ones (current, check) take no lock;
- ``history`` (like ``heads``, ``branches``, ``show``) needs no database;
- ``--sql`` output creates the ledger and records each step, one line each;
- a run applies one deploy phase (``backend.migrations.phases``): pre-deploy unless
  ``-x phase=post-deploy``;
- ``revision`` numbers files 00N after the head, and an autogenerate that finds nothing
  writes no file; one that finds changes writes them as calls of the lock-safe helpers
  (``backend.migrations.autogenerate``), or no file when it cannot;
- logging is configured from alembic.ini only when run from the alembic CLI, so running
  in-process never replaces the service's logging configuration.
"""

from __future__ import annotations

import asyncio
from logging.config import fileConfig
from pathlib import Path
from typing import Any

from alembic import command as alembic_command
from alembic import context
from alembic.operations import ops as alembic_ops
from alembic.runtime.migration import MigrationContext, MigrationInfo
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from pydantic import ValidationError
from sqlalchemy import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.util.concurrency import in_greenlet

from backend.config import ConfigError, Settings, get_settings
from backend.migrations import autogenerate, ledger, ops, phases, runner
from backend.migrations.revisions import next_revision_id, read_revisions
from backend.models import Base

config = context.config
# Only the alembic CLI sets cmd_opts: in-process callers keep their own logging configuration.
if config.cmd_opts is not None and config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _command() -> Any:
    """The alembic command function being run (None in-process, where cmd_opts is unset)."""
    cmd: tuple[Any, ...] = getattr(config.cmd_opts, "cmd", None) or (None,)
    return cmd[0]


def _settings(*, offline: bool = False) -> Settings:
    """The caller's settings, else the environment's; a mistake in them is one FAILED line."""
    settings = config.attributes.get("settings")
    if isinstance(settings, Settings):
        return settings
    if offline:
        try:
            return Settings()  # --sql needs no database: a missing DATABASE_URL is fine
        except ValidationError:
            pass  # a bad timeout is still reported, by get_settings() in one line
    try:
        return get_settings()
    except ConfigError as exc:
        raise CommandError(str(exc)) from None


def _include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    # Other applications' tables in the same database are none of our business.
    if type_ == "table":
        return name is not None and (name in target_metadata.tables or name.startswith("kraken_"))
    if type_ in ("column", "index"):
        # A type change's copy of a column (and its indexes) lives beside the model's until its contract.
        return not ops.helper_owned(name)
    return True


def _process_revision_directives(ctx: MigrationContext, revision: Any, directives: list[Any]) -> None:
    script: alembic_ops.MigrationScript = directives[0]
    cmd_opts = config.cmd_opts
    if cmd_opts is not None and getattr(cmd_opts, "autogenerate", False):
        upgrade_ops = script.upgrade_ops
        if upgrade_ops is not None and upgrade_ops.is_empty():
            directives[:] = []
            print("No changes in schema detected: no revision file written.")  # noqa: T201
            return
        # The files call the lock-safe helpers, not op.*: a pre-deploy revision for what the models
        # add, a post-deploy one after it for what they take away (the template writes its phase).
        directives[:] = autogenerate.lock_safe(script, target_metadata, ctx.bind)
    if directives and (cmd_opts is None or not getattr(cmd_opts, "rev_id", None)):
        directives[0].rev_id = next_revision_id(ScriptDirectory.from_config(config))
    for before, after in zip(directives, directives[1:], strict=False):
        after.rev_id = f"{int(before.rev_id) + 1:03d}"
        after.head = before.rev_id


def _plain_revision() -> bool:
    """`alembic revision` without --autogenerate, or `merge`: env.py runs only to number the file."""
    if _command() is alembic_command.merge:
        return True
    return _command() is alembic_command.revision and not getattr(config.cmd_opts, "autogenerate", False)


def _scripts_only() -> bool:
    """`alembic history` without --indicate-current or a range from `current`: Alembic runs env.py for
    it (revision_environment), but it reads the script directory only. (`heads`, `branches` and
    `show <rev>` do not run env.py at all.)"""
    if _command() is not alembic_command.history:
        return False
    ends = (getattr(config.cmd_opts, "rev_range", None) or ":").split(":")
    return not getattr(config.cmd_opts, "indicate_current", False) and "current" not in ends


def _phase() -> str:
    """The deploy phase this run applies: ``-x phase=post-deploy``, else pre-deploy."""
    return phases.requested(context.get_x_argument(as_dictionary=True), config.attributes)


def run_migrations_offline() -> None:
    """Emit SQL to stdout: no database, no DATABASE_URL, no embedded server."""
    files = read_revisions(Path(context.script.dir)).by_revision
    context.configure(
        dialect_name="postgresql",
        target_metadata=target_metadata,
        literal_binds=True,
        transaction_per_migration=True,
        include_name=_include_name,
        process_revision_directives=_process_revision_directives,
        on_version_apply=ledger.offline_recorder(files),
        as_sql=True,
    )
    ctx = context.get_context()
    timezone = phases.offline_timezone(ctx)

    def before_step(info: MigrationInfo) -> None:
        ops.new_step(ctx, info.up_revision_id)
        timezone(info)

    phases.limit_to_phase(ctx, _phase(), files, before_step=before_step)
    if context.is_offline_mode():
        # The bounds an online run sets, so SQL applied by hand (psql -f) waits no longer for locks.
        for statement in runner.timeout_statements(_settings(offline=True)):
            context.execute(statement)
        # SQL applied by hand is recorded in the ledger too.
        ledger.emit_start(context.get_context())
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    def configure(on_version_apply: runner.OnVersionApply) -> MigrationContext:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            compare_type=True,
            transaction_per_migration=True,
            include_name=_include_name,
            process_revision_directives=_process_revision_directives,
            on_version_apply=on_version_apply,
        )
        ctx = context.get_context()
        phases.limit_to_phase(
            ctx,
            _phase(),
            read_revisions(Path(context.script.dir)).by_revision,
            before_step=lambda info: ops.new_step(ctx, info.up_revision_id),
        )
        return ctx

    runner.migrate_locked(
        connection,
        _settings(),
        configure=configure,
        run=context.run_migrations,
        upgrading=_command() is alembic_command.upgrade,
        script_location=Path(context.script.dir),
    )


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
        target = await runner.migrations_target(settings)
        await runner.run_on_connection(target, do_run_migrations, statement_cache=settings.db_statement_cache)
    except (ConfigError, runner.DatabaseUnavailable, runner.MigrationError) as exc:
        raise CommandError(str(exc)) from None


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


if context.is_offline_mode() or _plain_revision() or _scripts_only():
    # No database: --sql, numbering a new file, or listing the revisions.
    run_migrations_offline()
else:
    run_migrations_online()
