"""The migration ledger: every step recorded in ``alembic_ledger``, and the checksums applied
revisions are validated against.

One row per step: an upgrade or downgrade of a revision, a stamp, an ``adopt`` (a revision found
applied with nothing on record: databases migrated before the ledger existed, or stamped) or a
``repair`` (an operator accepting an edited file). Who ran it (role, application_name, client
host, the service's version, its KRAKEN_ENV), when, how long, and how it ended.

An online step's row is opened on the lock connection (autocommit) as the step starts, and
closed in the step's own transaction, next to Alembic's update of ``alembic_version``: the two
commit together or not at all. A step that fails is closed as failed on the lock connection, so
its row survives the rollback; a runner killed mid-step leaves its row open, and the next run
(holding the lock, so no other runner is active) marks it interrupted.

A revision's checksum of record is that of its latest successful upgrade, adopt or repair row,
unless a later downgrade undid it. Stamps record the revision they stamp but are not a checksum
of record: what a stamp marks as applied is adopted at the end of its run. A revision whose file
no longer matches stops a run, but on a development database one that has not shipped (only
development runs ever applied it here: the revision being written) is let pass with a warning.

Offline (``--sql``) the table's creation, the run's id and one INSERT per step are written as one
line each, so SQL applied by hand is recorded too; the started_at of such a row is the start of the
step's last transaction (``now()``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import asyncpg
from alembic.runtime.migration import MigrationContext, MigrationInfo
from alembic.util import CommandError
from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from backend.db.errors import first_line, sqlstate
from backend.migrations.backfills import RUNNING_REVISION
from backend.migrations.moments import when
from backend.migrations.revisions import RevisionFile, Revisions, SchemaStatus

logger = logging.getLogger(__name__)

TABLE = "alembic_ledger"
REPAIR_COMMAND = "uv run kraken-migrations repair"
DIRECTIONS = ("upgrade", "downgrade", "stamp", "adopt", "repair")

# One line: the offline SQL must hold it on a single line (see the module docstring). The role,
# application name and client host default to the session's, so every writer records them alike.
CREATE_TABLE = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} ("
    "id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
    "run_id uuid NOT NULL, "
    "revision text NOT NULL, "
    "down_revisions text NOT NULL, "
    f"direction text NOT NULL CHECK (direction IN ({', '.join(repr(d) for d in DIRECTIONS)})), "
    "checksum text, "
    "started_at timestamptz NOT NULL DEFAULT clock_timestamp(), "
    "finished_at timestamptz, "
    "duration_ms bigint, "
    "success boolean, "
    "error text, "
    "db_role text NOT NULL DEFAULT current_user, "
    "application_name text NOT NULL DEFAULT current_setting('application_name'), "
    "client_host text NOT NULL DEFAULT coalesce(host(inet_client_addr()), 'local socket'), "
    "service_version text NOT NULL, "
    "environment text)"
)
# Ledgers created before the environment was recorded get the column (rows before it: NULL).
ENVIRONMENT_COLUMN = f"ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS environment text"
_HAS_ENVIRONMENT = (
    f"SELECT EXISTS (SELECT FROM pg_attribute WHERE attrelid = to_regclass('{TABLE}') AND attname = 'environment')"
)
# KRAKEN_ENV of the runs that wrote a row; NULL: unknown (SQL applied by hand, a row from before).
DEVELOPMENT = "development"


INTERRUPTED = "interrupted: the runner stopped before the step finished (killed, or its connection was lost)"
_CLOSE_INTERRUPTED = f"UPDATE {TABLE} SET success = false, error = :error WHERE success IS NULL"

# Each revision's checksum of record: its latest successful upgrade, adopt or repair row, unless
# a later downgrade undid it.
_RECORDS = (
    f"SELECT DISTINCT ON (revision) revision, checksum, direction, finished_at FROM {TABLE}"
    " WHERE success AND direction IN ('upgrade', 'downgrade', 'adopt', 'repair')"
    " ORDER BY revision, id DESC"
)
RECORDS_QUERY = (
    f"SELECT revision, checksum, direction, finished_at FROM ({_RECORDS}) AS r WHERE direction <> 'downgrade'"
)
# The boot's one query: the version table and the checksums of record together, as one row of
# text arrays, which costs about what reading the version alone does. When and how each checksum
# came on record is read only to explain a mismatch.
STATE_QUERY = (
    "SELECT array(SELECT version_num::text FROM alembic_version), array_agg(revision), array_agg(checksum)"
    f" FROM ({RECORDS_QUERY}) AS r"
)
SINCE_QUERY = f"SELECT revision, direction, finished_at FROM ({RECORDS_QUERY}) AS r WHERE revision = ANY($1::text[])"
VERSIONS_QUERY = "SELECT version_num FROM alembic_version"
LIST_QUERY = (
    "SELECT started_at, revision, direction, duration_ms, success, error, db_role, client_host,"
    f" application_name, service_version, run_id FROM {TABLE} ORDER BY id DESC LIMIT $1"
)

_COLUMNS = "run_id, revision, down_revisions, direction, checksum, service_version"
_VALUES = ":run_id, :revision, :down_revisions, :direction, :checksum, :version"
# Online rows also say which KRAKEN_ENV ran them; the offline INSERT leaves it NULL.
_ONLINE_COLUMNS = f"{_COLUMNS}, environment"
_ONLINE_VALUES = f"{_VALUES}, :environment"
_OPEN = f"INSERT INTO {TABLE} ({_ONLINE_COLUMNS}) VALUES ({_ONLINE_VALUES}) RETURNING id"
_CLOSE = (
    f"UPDATE {TABLE} AS l SET finished_at = c.now, success = :success, error = :error,"
    " duration_ms = round(extract(epoch FROM c.now - l.started_at) * 1000)"
    " FROM (SELECT clock_timestamp() AS now) AS c WHERE l.id = :id"
)
_DONE = (
    f"INSERT INTO {TABLE} ({_ONLINE_COLUMNS}, finished_at, duration_ms, success)"
    f" VALUES ({_ONLINE_VALUES}, clock_timestamp(), 0, true)"
)
# The revisions (of $1) that have shipped, as far as this database knows: applied, adopted or
# repaired by a run that was not a development one (KRAKEN_ENV=production, SQL applied by hand,
# a row from before environments were recorded), or adopted at all (applied by whoever, before
# anything recorded it). Any such row counts, however long ago and whatever undid it since.
SHIPPED_QUERY = (
    f"SELECT DISTINCT revision FROM {TABLE} WHERE revision = ANY($1::text[]) AND success AND (direction = 'adopt'"
    f" OR (direction IN ('upgrade', 'repair') AND environment IS DISTINCT FROM '{DEVELOPMENT}'))"
)


@cache
def service_version() -> str:
    """The backend package's version, recorded with every row."""
    try:
        return version("kraken-backend")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


# --- what the ledger says --------------------------------------------------------------------


Checksums = dict[str, str]  # revision -> its checksum of record


def since(direction: str, at: datetime) -> str:
    """How a checksum came on record: 'applied on 2025-03-01 12:00:00 UTC'."""
    verb = {"upgrade": "applied", "adopt": "adopted", "repair": "repaired"}.get(direction, "recorded")
    return f"{verb} on {when(at)}"


async def fetch_state(conn: asyncpg.Connection) -> tuple[tuple[str, ...], Checksums | None]:
    """The database's version(s) and the checksums of record, in one query; ``None`` for the
    checksums when the ledger does not exist yet (the version table alone is read then)."""
    try:
        [(versions, revisions, checksums)] = await conn.fetch(STATE_QUERY)
    except asyncpg.UndefinedTableError:
        # No ledger (a database from before it), or no version table either (never migrated).
        try:
            return tuple(r[0] for r in await conn.fetch(VERSIONS_QUERY)), None
        except asyncpg.UndefinedTableError:
            return (), None
    return tuple(versions), dict(zip(revisions or (), checksums or (), strict=True))


async def fetch_since(conn: asyncpg.Connection, revisions: Iterable[str]) -> dict[str, str]:
    """How the checksums of record of ``revisions`` came on record (see ``since``)."""
    return {r[0]: since(r[1], r[2]) for r in await conn.fetch(SINCE_QUERY, list(revisions))}


def read_versions(conn: Connection) -> tuple[str, ...]:
    """The version table's revisions, on a migration connection; none when it does not exist."""
    if conn.execute(text("SELECT to_regclass('alembic_version')")).scalar() is None:
        return ()
    return tuple(row[0] for row in conn.execute(text(VERSIONS_QUERY)))


async def fetch_shipped(conn: asyncpg.Connection, revisions: Iterable[str]) -> frozenset[str] | None:
    """Which of ``revisions`` have shipped (``SHIPPED_QUERY``); None (all of them) when the ledger
    predates the environment column: the boot reads it without the lock, before ``prepare``."""
    try:
        return frozenset(r[0] for r in await conn.fetch(SHIPPED_QUERY, list(revisions)))
    except asyncpg.UndefinedColumnError:
        return None


def read_shipped(conn: Connection, revisions: Iterable[str]) -> frozenset[str]:
    """``fetch_shipped`` on a migration connection (the ledger exists: ``prepare`` ran)."""
    query = text(SHIPPED_QUERY.replace("$1::text[]", "CAST(:revisions AS text[])"))
    return frozenset(r[0] for r in conn.execute(query, {"revisions": list(revisions)}))


def read_records(conn: Connection) -> tuple[Checksums, dict[str, str]]:
    """The checksums of record and how each came on record, on a migration connection (the
    ledger exists: ``prepare`` ran)."""
    rows = conn.execute(text(RECORDS_QUERY)).all()
    return {r[0]: r[1] for r in rows}, {r[0]: since(r[2], r[3]) for r in rows}


# --- validation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mismatch:
    revision: str
    file: str
    recorded: str  # the checksum of record
    checksum: str  # the file's, now
    since: str  # how the recorded one came on record
    shipped: bool = True  # see SHIPPED_QUERY; unknown counts as shipped

    def describe(self) -> str:
        return (
            f"revision {self.revision} ({self.file}) changed since it was {self.since or 'recorded'}: "
            f"checksum {short(self.recorded)} recorded, {short(self.checksum)} now"
        )

    def problem(self) -> str:
        """The mismatch and how to fix it, in one line."""
        return f"{self.describe()}; undo the edit, or accept the file as it is with '{REPAIR_COMMAND}'"


@dataclass(frozen=True)
class Verdict:
    """Applied revisions against their files: which match, which changed, which have no record."""

    status: SchemaStatus
    matching: tuple[str, ...]
    mismatches: tuple[Mismatch, ...]
    unrecorded: tuple[str, ...]

    def refusal(self, mismatches: tuple[Mismatch, ...] | None = None) -> str:
        """One line for every mismatch (or those of ``mismatches``), with how to fix it."""
        mismatches = self.mismatches if mismatches is None else mismatches
        if len(mismatches) == 1:
            return mismatches[0].problem()
        problems = "; ".join(m.describe() for m in mismatches)
        return (
            f"{len(mismatches)} applied revisions changed: {problems}; undo the edits, "
            f"or accept the files as they are with '{REPAIR_COMMAND}'"
        )

    def refused(self, environment: str) -> tuple[Mismatch, ...]:
        """The mismatches that stop a run in ``environment`` (KRAKEN_ENV): all of them in
        production; elsewhere those of revisions that have shipped. An unshipped revision edited on
        a development database (the one being written: applied, edited, downgraded and applied
        again) is ``tolerated`` instead."""
        if environment != DEVELOPMENT:
            return self.mismatches
        return tuple(m for m in self.mismatches if m.shipped)

    def tolerated(self, environment: str) -> tuple[Mismatch, ...]:
        refused = self.refused(environment)
        return tuple(m for m in self.mismatches if m not in refused)


def tolerance(mismatch: Mismatch) -> str:
    """What a development run says of an edited revision it lets pass."""
    return (
        f"{mismatch.describe()}; carrying on: a development database, and {mismatch.revision} has not shipped "
        "(every run that applied it here was a development one)"
    )


def short(checksum: str) -> str:
    return checksum[:12]


def applied_revisions(status: SchemaStatus, recorded: Checksums) -> frozenset[str]:
    """The revisions a database has applied that this code knows.

    Those its version table names, and every one they follow. When it names a revision this code
    does not know (a deploy was rolled back), the known ones the ledger records as applied.
    """
    applied = status.revisions.applied(status.current)
    if status.ahead:
        applied |= {rev for rev in recorded if rev in status.revisions.graph}
    return applied


def verify(
    status: SchemaStatus,
    recorded: Checksums,
    files: Mapping[str, RevisionFile],
    since: Mapping[str, str] | None = None,
    shipped: Collection[str] | None = None,
) -> Verdict:
    """The applied revisions' files against their checksums of record (``since`` explains them;
    ``shipped``: which have shipped, all of them when not known)."""
    matching: list[str] = []
    mismatches: list[Mismatch] = []
    unrecorded: list[str] = []
    for rev in sorted(applied_revisions(status, recorded)):
        found, checksum = files.get(rev), recorded.get(rev)
        if found is None:
            continue  # in the graph but unreadable as a file: nothing to compare
        if checksum is None:
            unrecorded.append(rev)
        elif checksum == found.checksum:
            matching.append(rev)
        else:
            mismatches.append(
                Mismatch(
                    rev,
                    found.file,
                    checksum,
                    found.checksum,
                    (since or {}).get(rev, ""),
                    shipped is None or rev in shipped,
                )
            )
    return Verdict(status, tuple(matching), tuple(mismatches), tuple(unrecorded))


# --- writing rows ----------------------------------------------------------------------------


def prepare(conn: Connection) -> None:
    """Create the ledger if needed (or add what an older one lacks), and mark the steps of runners
    that died as interrupted.

    Under the migration lock: no other runner is active, so an open row is a dead runner's.
    """
    conn.execute(text(CREATE_TABLE))
    if not conn.execute(text(_HAS_ENVIRONMENT)).scalar():
        conn.execute(text(ENVIRONMENT_COLUMN))
    conn.execute(text(_CLOSE_INTERRUPTED), {"error": INTERRUPTED})


def _done(
    conn: Connection,
    run_id: uuid.UUID,
    direction: str,
    revisions: Iterable[str],
    graph: Revisions,
    files: Mapping[str, RevisionFile],
    environment: str,
) -> list[str]:
    written = list(revisions)
    rows = [
        {
            "run_id": run_id,
            "revision": rev,
            "down_revisions": ",".join(graph.graph.get(rev, ())),
            "direction": direction,
            "checksum": files[rev].checksum,
            "version": service_version(),
            "environment": environment,
        }
        for rev in written
    ]
    if rows:
        conn.execute(text(_DONE), rows)
    return written


def adopt(
    conn: Connection,
    run_id: uuid.UUID,
    revisions: Iterable[str],
    graph: Revisions,
    files: Mapping[str, RevisionFile],
    environment: str,
) -> list[str]:
    """Record applied revisions that have no row yet, with their files' checksums as they are."""
    adopted = _done(conn, run_id, "adopt", revisions, graph, files, environment)
    if adopted:
        logger.info("ledger: adopted revision(s) %s, applied before they were recorded", ", ".join(adopted))
    return adopted


def repair(
    conn: Connection,
    run_id: uuid.UUID,
    mismatches: Iterable[Mismatch],
    graph: Revisions,
    files: Mapping[str, RevisionFile],
    environment: str,
) -> list[str]:
    """Accept edited files: their current checksums become those of record."""
    return _done(conn, run_id, "repair", (m.revision for m in mismatches), graph, files, environment)


@dataclass(frozen=True)
class Step:
    """What a row says about a step."""

    revision: str
    down_revisions: str
    direction: str
    checksum: str | None

    @classmethod
    def of(cls, info: MigrationInfo, files: Mapping[str, RevisionFile]) -> Step:
        if info.is_stamp:
            # The revision(s) the database is stamped at, and those it was at before.
            revision = ",".join(info.destination_revision_ids) or "base"
            known = files.get(revision)
            return cls(revision, ",".join(info.source_revision_ids), "stamp", known.checksum if known else None)
        revision = info.up_revision_id or ""
        known = files.get(revision)
        return cls(
            revision,
            ",".join(info.down_revision_ids),
            "upgrade" if info.is_upgrade else "downgrade",
            known.checksum if known else None,
        )


def one_line(exc: BaseException) -> str:
    """A failure as the ledger's error column holds it."""
    if isinstance(exc, DBAPIError):
        return f"{first_line(exc)} (SQLSTATE {sqlstate(exc)})"
    lines = str(exc).splitlines()
    if isinstance(exc, CommandError):
        return lines[0] if lines else "CommandError"
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


class Recorder:
    """One online run's rows: opened on the lock connection as each step starts, closed in the
    step's transaction when it succeeds, or on the lock connection when it fails."""

    def __init__(self, lock: Connection, files: Mapping[str, RevisionFile], environment: str) -> None:
        self.run_id = uuid.uuid4()
        self.lock = lock
        self.files = files
        self.environment = environment
        self.open_row: int | None = None
        self.stamped = False

    def track(self, ctx: MigrationContext, before_each: Callable[[], None]) -> None:
        """Call ``before_each`` (the runner checks that it still holds the lock), then open a row,
        as each step starts, before its transaction begins.

        Alembic calls back when a step has been applied (``on_version_apply``), but has no hook
        for a step starting: its plan (the command's function, which yields the steps) is wrapped
        instead. A failure test, the killed-runner test and the killed-lock-session test fail if
        this stops working.
        """
        plan = ctx._migrations_fn
        assert plan is not None

        def steps(heads: Any, context: MigrationContext) -> Iterator[Any]:
            for step in plan(heads, context):
                before_each()
                self._open(step.info)
                if context.connection is not None:  # a backfill's progress is kept by revision
                    context.connection.info[RUNNING_REVISION] = step.info.up_revision_id or ""
                yield step

        ctx._migrations_fn = steps

    def _open(self, info: MigrationInfo) -> None:
        step = Step.of(info, self.files)
        self.stamped |= step.direction == "stamp"
        params = {**asdict(step), "run_id": self.run_id, "version": service_version(), "environment": self.environment}
        self.open_row = self.lock.execute(text(_OPEN), params).scalar_one()

    def on_version_apply(self, *, ctx: MigrationContext, step: MigrationInfo, heads: Any, run_args: Any) -> None:
        """Alembic's hook, called in the step's transaction right after it updated the version table."""
        if self.open_row is None:
            return
        assert ctx.connection is not None
        ctx.connection.execute(text(_CLOSE), {"id": self.open_row, "success": True, "error": None})
        self.open_row = None

    def failed(self, exc: BaseException) -> None:
        """Close the step that was running as failed, outside its (rolled back) transaction."""
        if self.open_row is None:
            return
        row, self.open_row = self.open_row, None
        try:
            self.lock.execute(text(_CLOSE), {"id": row, "success": False, "error": one_line(exc)})
        except Exception as write_error:  # the connection went with the failure: the next run marks it interrupted
            logger.warning("ledger: could not record the failed step: %s", one_line(write_error))

    def around(self, run: Callable[[], None]) -> Callable[[], None]:
        """``run``, recording a failed step before the failure goes on (each retry is a step of its own)."""

        def recorded() -> None:
            try:
                run()
            except BaseException as exc:
                self.failed(exc)
                raise

        return recorded


# --- offline (--sql) -------------------------------------------------------------------------


def _literal(value: str | None) -> str:
    return "NULL" if value is None else "'" + value.replace("'", "''") + "'"


def _write(ctx: MigrationContext, line: str) -> None:
    # Straight to the output, one line with no blank line after it, as op.execute() would add:
    # the ledger's lines can then be told from the revisions' own SQL line by line.
    buffer = ctx.impl.output_buffer
    if ctx.as_sql and buffer is not None:
        buffer.write(line + "\n")


# The run id of SQL applied by hand is drawn when it is applied, not when it is generated, so the
# same --sql output is the same text every time and each application of it is a run of its own.
_OFFLINE_RUN = "alembic_ledger.run_id"
_OFFLINE_RUN_ID = f"coalesce(nullif(current_setting('{_OFFLINE_RUN}', true), ''), gen_random_uuid()::text)::uuid"


def emit_start(ctx: MigrationContext) -> None:
    """The --sql output's first ledger lines: the table, and the run id of this application."""
    _write(ctx, CREATE_TABLE + ";")
    _write(ctx, f"SELECT set_config('{_OFFLINE_RUN}', gen_random_uuid()::text, false) AS alembic_ledger_run;")


def offline_recorder(files: Mapping[str, RevisionFile]) -> Callable[..., None]:
    """Alembic's hook for --sql: one INSERT per step, in the step's transaction."""

    def on_version_apply(*, ctx: MigrationContext, step: MigrationInfo, heads: Any, run_args: Any) -> None:
        row = Step.of(step, files)
        values = ", ".join(
            _literal(v) for v in (row.revision, row.down_revisions, row.direction, row.checksum, service_version())
        )
        _write(
            ctx,
            f"INSERT INTO {TABLE} ({_COLUMNS}, started_at, finished_at, duration_ms, success)"
            f" VALUES ({_OFFLINE_RUN_ID}, {values},"
            " now(), clock_timestamp(), round(extract(epoch FROM clock_timestamp() - now()) * 1000), true);",
        )

    return on_version_apply
