"""Bringing the schema to head: at boot (``run_migrations()``), for the CLI (env.py), and the rules both follow.

``run_migrations()`` is built for many replicas booting at once: when the database is already
at head it costs one bare asyncpg connection and one query (the version and the ledger's
checksums together, validated here), and takes no lock. Otherwise it hands a connection to
Alembic (the connection-sharing recipe); env.py calls ``migrate_locked()``, which serializes
runners with an advisory lock and lets Alembic re-read the version under it, so late arrivals
find nothing to do.

Everything env.py decides lives here, importable and unit-tested: the lock, the timeouts, the
retries, the ledger and its validation (``ledger.py``), the "database ahead of the code" rule,
and how failures become one line.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import asyncpg
from alembic import command
from alembic.runtime.migration import MigrationContext, MigrationInfo
from alembic.util import CommandError
from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from backend.config import Settings, get_settings, postgres_ms, resolve_target
from backend.db.engine import connect, create_migration_engine
from backend.db.errors import describe, first_line, is_connection_error, is_pooler_symptom, is_retriable, sqlstate
from backend.db.url import DatabaseTarget
from backend.migrations import ledger, ops, wal
from backend.migrations.lock import (
    MigrationLockLost,
    MigrationLockTimeout,
    TransactionPooler,
    confirm_held,
    holder,
    holding,
    lock_session,
    sleep,
)
from backend.migrations.ops import LOCK_NOT_AVAILABLE
from backend.migrations.phases import POST_DEPLOY_COMMAND, SET_TIMEZONE
from backend.migrations.revisions import ALEMBIC_DIR, SchemaStatus, alembic_config, read_revisions

logger = logging.getLogger(__name__)

DEADLOCK_DETECTED = "40P01"
INSUFFICIENT_PRIVILEGE = "42501"

# Where an operator finds the two roles production runs as (the service's, which may only read and
# write, and the owner's, which migrates): the lines below of a role without what it needs name it.
TWO_ROLES_DOC = 'docs/production-postgresql.md ("Two roles")'
# Said after a migration's "permission denied": the role running it is not the tables' owner (the
# service's own role, say, booting with KRAKEN_MIGRATE_ON_STARTUP=upgrade).
MIGRATING_ROLE = (
    f"; migrations run as the role that owns the database and its tables (MIGRATIONS_DATABASE_URL, {TWO_ROLES_DOC})"
)


class DatabaseUnavailable(Exception):
    """The database could not be reached (in time); the message is one line."""


class MigrationError(Exception):
    """Migrations could not bring the schema to head; the message is one line."""


class SchemaNotAtHead(Exception):
    """KRAKEN_MIGRATE_ON_STARTUP=check found the schema behind (or ahead of) the code."""


# --- reading the schema revision -----------------------------------------------------------


async def open_connection(target: DatabaseTarget, *, wait: float = 0.0) -> asyncpg.Connection:
    """A bare connection, retried for up to ``wait`` seconds while the database is not reachable."""
    deadline = time.monotonic() + wait
    delay, attempt = 0.25, 1
    while True:
        try:
            return await connect(target)
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


async def read_schema_status(
    target: DatabaseTarget, *, wait: float = 0.0, script_location: Path = ALEMBIC_DIR
) -> SchemaStatus:
    """The database's recorded revision(s), connecting with retries for up to ``wait`` seconds."""
    conn = await open_connection(target, wait=wait)
    try:
        return await schema_status_on(conn, script_location)
    except asyncpg.InsufficientPrivilegeError as exc:
        raise await not_permitted(conn, exc) from None
    finally:
        await conn.close()


async def not_permitted(conn: asyncpg.Connection, exc: asyncpg.InsufficientPrivilegeError) -> MigrationError:
    """The connecting role may not read the version table or the ledger: the grants the docs give
    the service's role were skipped (or a table was created by a role other than the owner)."""
    role = await conn.fetchval("SELECT current_user")
    return MigrationError(
        f"role {role} may not read the migrations' tables: {first_line(exc)}; give it the grants of {TWO_ROLES_DOC}"
    )


async def schema_status_on(conn: asyncpg.Connection, script_location: Path = ALEMBIC_DIR) -> SchemaStatus:
    """The recorded revision(s) of the database ``conn`` is connected to (none: never migrated)."""
    try:
        rows = await conn.fetch(ledger.VERSIONS_QUERY)
    except asyncpg.UndefinedTableError:
        rows = []
    return SchemaStatus(tuple(row[0] for row in rows), read_revisions(script_location))


@dataclass(frozen=True)
class BootState:
    """The schema's status, and its applied revisions against the ledger (None: no ledger yet)."""

    status: SchemaStatus
    verdict: ledger.Verdict | None


async def read_boot_state(
    target: DatabaseTarget, *, wait: float = 0.0, script_location: Path = ALEMBIC_DIR
) -> BootState:
    """``read_schema_status`` and the ledger's checksums, in one query (a second one only to say
    when a revision that no longer matches its file was applied)."""
    conn = await open_connection(target, wait=wait)
    try:
        try:
            current, recorded = await ledger.fetch_state(conn)
        except asyncpg.InsufficientPrivilegeError as exc:
            raise await not_permitted(conn, exc) from None
        status = SchemaStatus(current, read_revisions(script_location))
        if recorded is None:
            return BootState(status, None)
        files = status.revisions.by_revision
        verdict = ledger.verify(status, recorded, files)
        if verdict.mismatches:
            edited = [m.revision for m in verdict.mismatches]
            since = await ledger.fetch_since(conn, edited)
            verdict = ledger.verify(status, recorded, files, since, await ledger.fetch_shipped(conn, edited))
        return BootState(status, verdict)
    finally:
        await conn.close()


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


def ahead_of_code(status: SchemaStatus) -> str:
    """The sentence every report of a database ahead of this code starts with."""
    return f"database schema is at revision {','.join(status.unknown)}, which this code does not know"


def schema_ahead(status: SchemaStatus, settings: Settings, *, action: Literal["start", "upgrade"]) -> None:
    """The database records a revision this code does not know (a deploy was rolled back).

    KRAKEN_SCHEMA_AHEAD=refuse: raise MigrationError. serve (the default): warn, and the caller
    carries on without migrating: pre-deploy revisions are additive, so the older code works on the
    newer schema, and refusing would turn a rollback into an outage (a rollback past a post-deploy
    revision downgrades it first). ``action`` is what the caller
    would refuse to do: "start" (the service) or "upgrade" (the CLI).
    """
    refused, served = _AHEAD_OUTCOME[action]
    message = ahead_of_code(status)
    heads = ",".join(sorted(status.heads))
    if settings.schema_ahead == "refuse":
        raise MigrationError(message + refused.format(heads=heads))
    logger.warning("%s", message + served.format(heads=heads))


# --- applied revisions edited since ----------------------------------------------------------


def enforce_checksums(verdict: ledger.Verdict | None, settings: Settings) -> None:
    """KRAKEN_MIGRATION_VALIDATE: an applied revision whose file changed since stops the run
    (error, the default), is logged (warn), or is not looked at (off). On a development database
    an edit of a revision that has not shipped (the one being written) is logged and passes
    (``Verdict.refused``): the edit loop needs no repair."""
    if verdict is None or not verdict.mismatches or settings.migration_validate == "off":
        return
    for mismatch in verdict.tolerated(settings.env):
        logger.warning("%s", ledger.tolerance(mismatch))
    refused = verdict.refused(settings.env)
    if not refused:
        return
    if settings.migration_validate == "error":
        raise MigrationError(verdict.refusal(refused) + " (KRAKEN_MIGRATION_VALIDATE=error)")
    logger.warning("%s", verdict.refusal(refused) + "; carrying on (KRAKEN_MIGRATION_VALIDATE=warn)")


# --- migrating at boot ---------------------------------------------------------------------


async def migrations_target(settings: Settings) -> DatabaseTarget:
    """Where migrations connect: a server that accepts writes. Whatever the URL asks of
    target_session_attrs (libpq's default is any), DDL never goes to a standby."""
    target = await resolve_target(settings, migrations=True)
    if target.option("target_session_attrs") == "primary":
        return target
    return target.with_options(target_session_attrs="read-write")


async def run_on_connection(
    target: DatabaseTarget, work: Callable[[Connection], None], *, statement_cache: bool
) -> None:
    """Run ``work`` (Alembic, through env.py) on a migration connection of its own; an unreachable
    database becomes DatabaseUnavailable, one behind a transaction pooler MigrationError.

    ``statement_cache`` is KRAKEN_DB_STATEMENT_CACHE, which every caller passes on (no default to forget)."""
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


@dataclass(frozen=True)
class MigrationRun:
    """What a boot's ``run_migrations_measured()`` did, for the caller to report (the metrics)."""

    status: SchemaStatus  # where the schema ended
    seconds: float  # the whole call: reaching the database, waiting for the lock, applying
    lock_wait_seconds: float  # waiting for another runner's migration lock; 0 when no lock was needed
    applied: int  # revisions this call applied (0 when the schema was at head, or another runner did it)


# Where migrate_locked() leaves the seconds it waited for the lock and the number of revisions it
# applied, on the work connection's info: env.py sits between the two, and Alembic hands nothing back.
LOCK_WAIT = "kraken_migration_lock_wait"
APPLIED = "kraken_revisions_applied"


async def run_migrations(settings: Settings | None = None, *, script_location: Path = ALEMBIC_DIR) -> SchemaStatus:
    """Bring the schema to head; return where it ended. Safe to call from many processes at once."""
    return (await run_migrations_measured(settings, script_location=script_location)).status


async def run_migrations_measured(
    settings: Settings | None = None, *, script_location: Path = ALEMBIC_DIR
) -> MigrationRun:
    """``run_migrations()``, with what it took."""
    started = time.monotonic()
    settings = settings or get_settings()
    target = await migrations_target(settings)
    state = await read_boot_state(target, wait=settings.db_connect_timeout, script_location=script_location)
    status, verdict = state.status, state.verdict
    if status.ahead:
        enforce_checksums(verdict, settings)
        schema_ahead(status, settings, action="start")
        return MigrationRun(status, time.monotonic() - started, 0.0, 0)
    # With nothing left for the boot's phase (pre-deploy) and every applied revision on record, only
    # validation is left; no lock is needed to read. A database without the ledger, or with
    # revisions not on record, is adopted under it.
    if not status.behind and verdict is not None and not verdict.unrecorded:
        enforce_checksums(verdict, settings)
        log_post_deploy_pending(status)
        return MigrationRun(status, time.monotonic() - started, 0.0, 0)
    facts: dict[str, Any] = {}

    def upgrade(connection: Connection) -> None:
        cfg = alembic_config(script_location)
        cfg.attributes["settings"] = settings
        cfg.attributes["connection"] = connection
        try:
            command.upgrade(cfg, "head")
        finally:
            facts.update((key, connection.info.pop(key, 0)) for key in (LOCK_WAIT, APPLIED))

    upgrading = time.monotonic()
    try:
        await run_on_connection(target, upgrade, statement_cache=settings.db_statement_cache)
    except CommandError as exc:
        line = str(exc).splitlines()[0]
        if line.endswith(MIGRATING_ROLE):
            line += "; a service role that may only read and write boots with KRAKEN_MIGRATE_ON_STARTUP=check"
        raise MigrationError(line) from None
    status = await read_schema_status(target, script_location=script_location)
    logger.info("schema at revision %s (%.0f ms)", status.revision, (time.monotonic() - upgrading) * 1000)
    return MigrationRun(status, time.monotonic() - started, float(facts[LOCK_WAIT]), int(facts[APPLIED]))


async def check_schema(settings: Settings, *, script_location: Path = ALEMBIC_DIR) -> SchemaStatus:
    """KRAKEN_MIGRATE_ON_STARTUP=check: refuse unless the database is at head, and its applied
    revisions match the ledger (those not on record yet are adopted by the pipeline's upgrade)."""
    target = await migrations_target(settings)
    state = await read_boot_state(target, wait=settings.db_connect_timeout, script_location=script_location)
    status = state.status
    enforce_checksums(state.verdict, settings)
    if not status.behind and not status.ahead:
        log_post_deploy_pending(status)
        return status
    if status.ahead:
        schema_ahead(status, settings, action="start")
        return status
    raise SchemaNotAtHead(
        f"database schema is at revision {status.revision or 'none'}, code expects "
        f"{','.join(sorted(status.heads))}; run 'uv run alembic upgrade head' (KRAKEN_MIGRATE_ON_STARTUP=check)"
    )


def log_post_deploy_pending(status: SchemaStatus) -> None:
    """Say so when the schema serves this code but waits for its post-deploy phase."""
    if status.post_deploy_pending:
        logger.info(
            "post-deploy revision(s) %s not applied yet: run '%s' once this release serves",
            ", ".join(status.post_deploy_pending),
            POST_DEPLOY_COMMAND,
        )


# --- what env.py runs under the lock ----------------------------------------------------------


def timeout_statements(settings: Settings) -> list[str]:
    """The DDL bounds: set on every online run's session, and at the top of the offline SQL."""
    return [
        f"SET lock_timeout = '{postgres_ms(settings.ddl_lock_timeout)}ms'",
        f"SET statement_timeout = '{postgres_ms(settings.ddl_statement_timeout)}ms'",
    ]


def long_waits(settings: Settings) -> ops.LongWaits:
    """The bound of each wait of statements whose lock blocks no read or write (index builds):
    KRAKEN_INDEX_BUILD_TIMEOUT, as PostgreSQL's lock_timeout ("0": no limit)."""
    seconds = settings.index_build_timeout
    return ops.LongWaits(f"{postgres_ms(seconds)}ms", f"KRAKEN_INDEX_BUILD_TIMEOUT ({seconds:g} s)")


def _set_session_bounds(connection: Connection, settings: Settings) -> None:
    """Session-level bounds for DDL, the session's time zone (UTC, whatever the server's or the
    database's default) and its WAL's full-page images compressed (backend/migrations/wal.py), set
    once the advisory lock is held; a revision may SET LOCAL its own."""
    began = not connection.in_transaction()
    for statement in [*timeout_statements(settings), SET_TIMEZONE]:
        connection.execute(text(statement))
    connection.info[ops.LONG_WAITS] = long_waits(settings)
    wal.compress_full_page_images(connection)
    if (connection.dialect.server_version_info or (0,)) >= (14,):
        # If the runner dies during a long statement, the server notices within a second and
        # rolls the revision back, instead of finishing it for nobody while holding the lock.
        connection.execute(text("SET client_connection_check_interval = '1s'"))
        # Between steps the session is idle for a moment: a server-wide idle_session_timeout must not end the run.
        connection.execute(text("SET idle_session_timeout = 0"))
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


OnVersionApply = Callable[[MigrationContext, MigrationInfo, Collection[Any], Mapping[str, Any]], None]


def _all(hooks: list[Callable[..., None]]) -> OnVersionApply:
    """Several ``on_version_apply`` hooks as one (Alembic's type takes one; it is called with keywords).
    Hooks added to the list later are called too."""

    def on_version_apply(*args: Any, **kwargs: Any) -> None:
        for hook in hooks:
            hook(*args, **kwargs)

    return on_version_apply


def count_applied(info: dict[Any, Any]) -> Callable[..., None]:
    """An ``on_version_apply`` hook counting the revisions applied in ``info[APPLIED]``."""

    def on_version_apply(*, ctx: MigrationContext, step: MigrationInfo, heads: set[str], run_args: Any) -> None:
        if step.is_upgrade and not step.is_stamp:
            info[APPLIED] = info.get(APPLIED, 0) + 1

    return on_version_apply


def log_applied() -> Callable[..., None]:
    """Alembic's ``on_version_apply`` hook: one log line per revision applied or reverted (with its
    duration) or stamp."""
    started = time.monotonic()

    def on_version_apply(*, ctx: MigrationContext, step: MigrationInfo, heads: set[str], run_args: Any) -> None:
        nonlocal started
        now = time.monotonic()
        if step.is_stamp:
            logger.info("stamped the database at revision %s", ",".join(step.destination_revision_ids) or "base")
        else:
            doc = getattr(step.up_revision, "doc", "")
            verb = "applied" if step.is_upgrade else "reverted"
            logger.info("%s revision %s (%s) in %.0f ms", verb, step.up_revision_id, doc, (now - started) * 1000)
        started = now

    return on_version_apply


def _verify_applied(connection: Connection, ctx: MigrationContext, script_location: Path) -> ledger.Verdict:
    """Under the lock: the database's applied revisions (as Alembic reads them) against the ledger."""
    revisions = read_revisions(script_location)
    status = SchemaStatus(tuple(ctx.get_current_heads()), revisions)
    recorded, since = ledger.read_records(connection)
    verdict = ledger.verify(status, recorded, revisions.by_revision, since)
    if not verdict.mismatches:
        return verdict
    shipped = ledger.read_shipped(connection, (m.revision for m in verdict.mismatches))
    return ledger.verify(status, recorded, revisions.by_revision, since, shipped)


def _adopt(
    connection: Connection, run_id: uuid.UUID, verdict: ledger.Verdict, script_location: Path, environment: str
) -> None:
    revisions = read_revisions(script_location)
    ledger.adopt(connection, run_id, verdict.unrecorded, revisions, revisions.by_revision, environment)
    # Leave no transaction open, so Alembic manages one per revision.
    connection.commit()


def _before_first_step(
    connection: Connection, ctx: MigrationContext, settings: Settings, run_id: uuid.UUID, script_location: Path
) -> ledger.Verdict:
    """Create the ledger, validate the applied revisions (KRAKEN_MIGRATION_VALIDATE), adopt those not on record."""
    ledger.prepare(connection)
    connection.commit()
    verdict = _verify_applied(connection, ctx, script_location)
    enforce_checksums(verdict, settings)
    _adopt(connection, run_id, verdict, script_location, settings.env)
    return verdict


def migrate_locked(
    connection: Connection,
    settings: Settings,
    *,
    configure: Callable[[OnVersionApply], MigrationContext],
    run: Callable[[], None],
    upgrading: bool,
    script_location: Path,
) -> None:
    """An online run: ``configure`` Alembic's context (with the hook to pass as
    ``on_version_apply``), then run it.

    A command that moves the database (upgrade, downgrade, stamp: Alembic gives them a
    destination) holds the migration lock, bounds the session, is validated and recorded in the
    ledger, and runs its revisions with retries, confirming before each step that the lock is
    still its own (Alembic reads the version table under the lock). Read-only ones (current,
    check, autogenerate) take no lock: ``read_only``.

    ``upgrading``: an ``alembic upgrade`` on a database ahead of this code follows
    KRAKEN_SCHEMA_AHEAD; with 'serve' it changes nothing, so a rollback's deploy reaches its restart.
    Failures become a ``CommandError`` of one line (Alembic prints ``FAILED: <line>``).
    """
    hooks = [log_applied(), count_applied(connection.info)]
    moves = True
    try:
        # The pooler check first, for every command: behind a transaction pooler nothing else is tried.
        with lock_session(connection.engine, work=connection) as session:
            ctx = configure(_all(hooks))
            moves = "destination_rev" in ctx.opts
            if not moves:
                read_only(session, connection, settings, run)
                return
            with holding(
                session,
                settings.migration_lock_timeout,
                on_acquired=lambda waited: connection.info.__setitem__(LOCK_WAIT, waited),
            ) as lock:
                _set_session_bounds(connection, settings)
                recorder = ledger.Recorder(lock, read_revisions(script_location).by_revision, settings.env)
                hooks.append(recorder.on_version_apply)
                verdict = _before_first_step(connection, ctx, settings, recorder.run_id, script_location)
                if upgrading and verdict.status.ahead:
                    schema_ahead(verdict.status, settings, action="upgrade")
                    return
                recorder.track(ctx, before_each=lambda: confirm_held(lock))
                run_with_retries(recorder.around(run), settings)
                if recorder.stamped:
                    # What a stamp marked as applied is adopted, with the files as they are.
                    verdict = _verify_applied(connection, ctx, script_location)
                    _adopt(connection, recorder.run_id, verdict, script_location, settings.env)
    except (MigrationLockTimeout, MigrationLockLost, TransactionPooler, MigrationError) as exc:
        raise CommandError(str(exc)) from None
    except DBAPIError as exc:
        if is_pooler_symptom(exc):
            raise CommandError(str(TransactionPooler())) from None
        if is_connection_error(exc):
            raise
        # A revision's SQL failed (permission denied, statement_timeout, ...): its transaction is
        # rolled back; say what failed in one line instead of a traceback.
        failed = "a revision failed: " if moves else ""
        hint = MIGRATING_ROLE if sqlstate(exc) == INSUFFICIENT_PRIVILEGE else ""
        raise CommandError(f"{failed}{first_line(exc)} (SQLSTATE {sqlstate(exc)}){hint}") from None


def read_only(session: Connection, connection: Connection, settings: Settings, run: Callable[[], None]) -> None:
    """A command that only reads (current, check, autogenerate): no migration lock, so it answers
    while a migration runs; when one does, the log says who runs it and since when (``session``:
    the ``lock_session`` beside ``connection``)."""
    running = holder(session)
    if running is not None:
        logger.info("a migration is running: the migration lock is held by %s", running)
    _set_session_bounds(connection, settings)
    run()
