"""Lock-safe schema changes for revisions: what a busy table with millions of rows needs.

The service keeps reading and writing while a revision runs, so nothing here holds a lock that
stops it for longer than a moment:

- indexes are built and dropped ``CONCURRENTLY``, outside any transaction;
- foreign keys and check constraints are added ``NOT VALID`` (a catalog change under a brief
  lock) and validated in a later transaction, whose scan lets writes continue;
- a unique constraint is attached to a unique index built concurrently beforehand;
- a new table is created whole in one transaction, its foreign keys added after it as on an
  existing table, the referenced table locked first.

The checks that may refuse a revision (``refuse_violations``, ``refuse_data_loss``, the one in
``drop_table``) must run before its first commit, or a refusal would leave it half applied: one
placed after a commit refuses to run, online and offline.

Every lock wait is bounded by the session's ``lock_timeout`` (set by ``runner.py``); a revision
that hits it is rolled back and run again. Statements whose lock blocks no read or write (an index
built or dropped concurrently, a constraint validated) wait for older transactions instead, each
wait within a bound of its own (``LongWaits``), and log once a minute what they wait for.
So every helper is idempotent: on a database it looks at the catalog
first and does only what is missing, which also finishes a revision that was interrupted
half-way (an INVALID index left by a cancelled build is dropped and rebuilt). Each helper commits
when done, so its locks end with it.

Offline (``alembic upgrade --sql``) there is no database to look at: the helpers emit the SQL a
database at the previous revision needs, with ``COMMIT``/``BEGIN`` where the transaction splits.

Revisions import this module; it never imports the application's models, and changing what an
existing helper emits changes every revision that uses it, so keep it backwards compatible.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import re
import textwrap
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TextIO, cast

import sqlalchemy as sa
from alembic import op
from alembic.runtime.migration import MigrationContext
from alembic.util import CommandError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.util.concurrency import await_, greenlet_spawn, in_greenlet

from backend.migrations import backfills, wal
from backend.migrations.backfills import RUNNING_REVISION
from backend.migrations.moments import when

logger = logging.getLogger(__name__)

UNIQUE_VIOLATION = "23505"
LOCK_NOT_AVAILABLE = "55P03"
DATA_LOSS_FLAG = "-x allow_data_loss=true"
# pg_constraint.confdeltype codes.
_ON_DELETE = {None: "a", "NO ACTION": "a", "RESTRICT": "r", "CASCADE": "c", "SET NULL": "n", "SET DEFAULT": "d"}


# --- small pieces ----------------------------------------------------------------------------


def ident(name: str) -> str:
    """A quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def _columns(columns: Sequence[str]) -> str:
    return ", ".join(ident(c) for c in columns)


def literal(value: str) -> str:
    """A quoted SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def _context() -> MigrationContext:
    return op.get_context()


def _offline() -> bool:
    return bool(_context().as_sql)


def _bind() -> sa.Connection:
    return op.get_bind()


def _rows(query: str, **params: Any) -> list[sa.Row[Any]]:
    return list(_bind().execute(sa.text(query), params))


def _sqlstate(exc: DBAPIError) -> str | None:
    # Like backend.db.errors.sqlstate, repeated so revisions' helpers import no other backend module.
    orig = exc.orig
    return getattr(orig, "sqlstate", None) or getattr(getattr(orig, "__cause__", None), "sqlstate", None)


def _require_own_transactions(ctx: MigrationContext) -> None:
    # autocommit_block() can only end a transaction Alembic began; a connection handed to env.py
    # already inside a transaction would silently keep every lock to the end, or fail obscurely.
    if getattr(ctx, "_in_external_transaction", False):
        raise CommandError(
            "this revision commits part-way (lock-safe operations need their own transactions), but the "
            "connection handed to env.py is already inside a transaction; hand it a connection outside one"
        )


# --- a revision's steps: checks before the first commit ----------------------------------------


@dataclass
class _Step:
    """What the running revision (one step of a run) has done so far, as the checks need it."""

    revision: str | None = None
    committed: str | None = None  # the helper (or ops.commit()) whose commit ended its first transaction
    cleared: set[str] = dataclasses.field(default_factory=set)  # tables refuse_data_loss let it drop


# Per migration context, reset by ``new_step`` as each revision starts (env.py calls it; a context
# built by hand, as tests do, is one step).
_STEPS: weakref.WeakKeyDictionary[MigrationContext, _Step] = weakref.WeakKeyDictionary()


def new_step(ctx: MigrationContext, revision: str | None) -> None:
    """A revision starts on ``ctx`` (each attempt of a retried one too): nothing committed yet."""
    _STEPS[ctx] = _Step(revision)


def _step() -> _Step:
    ctx = _context()
    found = _STEPS.get(ctx)
    if found is None:
        found = _STEPS[ctx] = _Step()
    return found


def _caller() -> str:
    """The ops helper the revision called (the outermost frame of this module on the stack)."""
    frame, name = inspect.currentframe(), "ops.commit()"
    while frame is not None:
        if frame.f_globals.get("__name__") == __name__ and not frame.f_code.co_name.startswith("_"):
            name = f"ops.{frame.f_code.co_name}()"
        frame = frame.f_back
    return name


def _autocommit(ctx: MigrationContext) -> contextlib.AbstractContextManager[None]:
    """``ctx.autocommit_block()``, noted: from here on this revision is no longer all or nothing."""
    step = _step()
    if step.committed is None:
        step.committed = _caller()
    return ctx.autocommit_block()


def _refuse_after_commit(check: str, *, hint: str = "") -> None:
    """A check that could refuse must come before the revision's first commit: a refusal after it
    would stop a revision that has already changed the database."""
    step = _step()
    if step.committed is not None:
        revision = f"revision {step.revision}" if step.revision else "the revision"
        raise CommandError(
            f"{check} would run after {revision} already committed a step ({step.committed} commits): "
            "a refusal there would leave the database changed; move the check before the first change"
            + (f" ({hint})" if hint else "")
        )


def commit() -> None:
    """End the revision's current transaction here (releasing its locks) and begin a new one."""
    ctx = _context()
    if not ctx.as_sql:
        _require_own_transactions(ctx)
    with _autocommit(ctx):
        pass


def _static(text: str) -> None:
    """Raw text in the offline SQL (a comment for squawk, say); nothing online."""
    buffer = _context().impl.output_buffer
    if _offline() and buffer is not None:
        # Not static_output(): squawk applies an ignore comment only to the line right below it.
        buffer.write(text + "\n")


# --- waiving a lint rule for a statement ---------------------------------------------------------

_RULE_NAME = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")
# What squawk reads above a statement: the rules it skips there, and after " -- " our reason.
SQUAWK_IGNORE = "-- squawk-ignore "
_TRANSACTION_LINES = frozenset({"BEGIN;", "COMMIT;"})


def squawk_ignore(rules: Sequence[str], reason: str | None = None) -> str:
    """The comment line that makes squawk skip ``rules`` for the statement right below it."""
    line = SQUAWK_IGNORE + ", ".join(rules)
    return line if reason is None else f"{line} -- {reason}"


_QUOTE_START = re.compile(r"'|\"|\$[A-Za-z_]*\$|--")


def _quote_after(line: str, quote: str | None) -> str | None:
    """The quote (``'``, ``"`` or a dollar tag) still open at the end of ``line``, given the one
    open at its start."""
    at = 0
    while True:
        if quote is None:
            found = _QUOTE_START.search(line, at)
            if found is None or found.group() == "--":
                return None
            quote, at = found.group(), found.end()
        end = line.find(quote, at)
        if end < 0:
            return quote
        if quote in ("'", '"') and line.startswith(quote, end + 1):  # '' inside '...'
            at = end + 2
            continue
        at, quote = end + len(quote), None


def _commented(text: str, comment: str) -> str:
    """``comment`` above each line of a statement that starts outside a quoted string: squawk
    reads an ignore comment for the line right below it, and a finding points at a line."""
    lines, quote = [], None
    for line in text.split("\n"):
        if quote is None and line.strip():
            lines.append(comment)
        lines.append(line)
        quote = _quote_after(line, quote)
    return "\n".join(lines)


class Waiver:
    """A squawk rule waived, with its reason: for the next statement (``ops.waive(...)`` on its own
    line), or for every statement of a ``with ops.waive(...):`` block.

    Offline it stands in for the output while it lasts, and writes its comment above each line of
    each statement (BEGIN, COMMIT and comments pass as they are): squawk reads an ignore comment
    for the line right below it only, and points a finding at a line of a statement.
    """

    def __init__(self, ctx: MigrationContext, comment: str) -> None:
        self.ctx = ctx
        self.comment: str | None = comment
        self.once = True
        self.inner = ctx.impl.output_buffer
        if ctx.as_sql and self.inner is not None:
            ctx.impl.output_buffer = cast(TextIO, self)  # Alembic only writes and flushes it

    def write(self, text: str) -> int:
        assert self.inner is not None
        line = text.strip()
        if self.comment is not None and line and line not in _TRANSACTION_LINES and not line.startswith("--"):
            text = _commented(text, self.comment)
            if self.once:
                self._end()
        return int(self.inner.write(text) or 0)

    def flush(self) -> None:
        if self.inner is not None:
            self.inner.flush()

    def _end(self) -> None:
        self.comment = None  # passes everything on from now (if a later waiver wraps it)
        if cast(object, self.ctx.impl.output_buffer) is self:
            self.ctx.impl.output_buffer = self.inner

    def __enter__(self) -> Waiver:
        self.once = False
        return self

    def __exit__(self, *exc: object) -> None:
        self._end()


def waive(*rules: str, reason: str) -> Waiver:
    """Waive squawk ``rules`` (its names: ``prefer-text-field``) for the next statement, or, used as
    ``with ops.waive(...):``, for each statement in the block, saying why in ``reason`` (one line).

    Offline it writes ``-- squawk-ignore <rules> -- <reason>`` above each line of the statement(s)
    (but lines inside a quoted string), which squawk honours and ``kraken-migrations lint`` lists
    with the reason; online it does nothing.
    """
    if not rules or any(_RULE_NAME.fullmatch(rule) is None for rule in rules):
        raise ValueError(f"ops.waive{rules!r}: give squawk rule names, such as 'prefer-text-field'")
    if not reason.strip() or "\n" in reason:
        raise ValueError(f"ops.waive{rules!r}: give the reason, on one line")
    return Waiver(_context(), squawk_ignore(rules, reason.strip()))


# --- the catalog -----------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexInfo:
    table: str
    columns: tuple[str | None, ...]
    unique: bool
    valid: bool


_INDEX_QUERY = sa.text(
    "SELECT t.relname, i.indisunique, i.indisvalid AND i.indisready,"
    " array(SELECT a.attname::text FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)"
    "       LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
    "       WHERE k.n <= i.indnkeyatts ORDER BY k.n)"
    " FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid"
    " WHERE i.indexrelid = to_regclass(:name)"
)


def index_info(name: str) -> IndexInfo | None:
    row = _bind().execute(_INDEX_QUERY, {"name": ident(name)}).first()
    if row is None:
        return None
    table, unique, valid, columns = row
    return IndexInfo(table, tuple(columns), bool(unique), bool(valid))


@dataclass(frozen=True)
class ConstraintInfo:
    kind: str  # pg_constraint.contype: c(heck), f(oreign key), u(nique), p(rimary key)
    validated: bool
    columns: tuple[str, ...]
    ref_table: str | None
    ref_columns: tuple[str, ...]
    on_delete: str  # confdeltype
    on_update: str  # confupdtype


_CONSTRAINT_QUERY = sa.text(
    "SELECT c.contype::text, c.convalidated, nullif(c.confrelid, 0)::regclass::text,"
    " c.confdeltype::text, c.confupdtype::text,"
    " array(SELECT a.attname::text FROM unnest(c.conkey) WITH ORDINALITY AS k(attnum, n)"
    "       JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum ORDER BY k.n),"
    " array(SELECT a.attname::text FROM unnest(c.confkey) WITH ORDINALITY AS k(attnum, n)"
    "       JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.attnum ORDER BY k.n)"
    " FROM pg_constraint c WHERE c.conrelid = to_regclass(:table) AND c.conname = :name"
)


def constraint_info(name: str, table: str) -> ConstraintInfo | None:
    row = _bind().execute(_CONSTRAINT_QUERY, {"table": ident(table), "name": name}).first()
    if row is None:
        return None
    kind, validated, ref_table, on_delete, on_update, columns, ref_columns = row
    return ConstraintInfo(
        kind, bool(validated), tuple(columns), ref_table, tuple(ref_columns), on_delete.strip(), on_update.strip()
    )


def _holds_locks_worth_releasing() -> bool:
    """Has the current transaction changed anything, or locked a table against reads or writes?"""
    return (
        _bind()
        .execute(
            sa.text(
                "SELECT txid_current_if_assigned() IS NOT NULL OR EXISTS (SELECT FROM pg_locks"
                " WHERE pid = pg_backend_pid() AND locktype = 'relation'"
                " AND mode IN ('ShareLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock'))"
            )
        )
        .scalar_one()
        is True
    )


# --- waits that block no one ----------------------------------------------------------------

# Where runner.py leaves the LongWaits of a run, on the migration connection's ``info``.
LONG_WAITS = "kraken_long_waits"
# Seconds between two log lines of a statement that waits; ``-x index_build_log_interval=N`` changes it.
WAIT_LOG_INTERVAL = 60.0
LOG_INTERVAL_ARGUMENT = "index_build_log_interval"


@dataclass(frozen=True)
class LongWaits:
    """The ``lock_timeout`` of statements whose lock blocks no read or write, which only wait for
    other transactions: a concurrent index build waits for every transaction older than it, in any
    table, and the short DDL bound would cancel it (leaving an INVALID index) with nothing gained.

    runner.py puts one on the migration connection's ``info`` (``LONG_WAITS``); without it such
    statements keep the session's lock_timeout.
    """

    lock_timeout: str  # PostgreSQL's value, "1800000ms"; "0": no limit
    limit: str  # how a message names it: "KRAKEN_INDEX_BUILD_TIMEOUT (1800 s)"


def _log_interval() -> float:
    environment = _context().environment_context
    given = environment.get_x_argument(as_dictionary=True).get(LOG_INTERVAL_ARGUMENT) if environment else None
    if given is None:
        return WAIT_LOG_INTERVAL
    try:
        seconds = float(given)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        raise CommandError(f"-x {LOG_INTERVAL_ARGUMENT}={given}: give the seconds between log lines, more than 0")
    return seconds


_WAITING_FOR = sa.text(
    "SELECT (SELECT phase FROM pg_stat_progress_create_index WHERE pid = :pid), b.pid,"
    " coalesce(b.application_name, ''), coalesce(host(b.client_addr), 'local socket'), b.state,"
    " b.xact_start, b.query_start"
    " FROM (SELECT 1) AS one LEFT JOIN pg_stat_activity AS b ON b.pid = ANY (pg_blocking_pids(:pid))"
    " ORDER BY b.xact_start NULLS LAST"
)


def _at(moment: datetime | None) -> str:
    return when(moment) if moment is not None else "-"  # as the lock's holder is told


def _log_waits(conn: sa.Connection, pid: int, what: str, seconds: float) -> None:
    """One line: what the statement of backend ``pid`` waits for (the sessions blocking it, and
    since when their transaction and query run), or that it runs."""
    rows = conn.execute(_WAITING_FOR, {"pid": pid}).all()
    phase = f" (phase: {rows[0][0]})" if rows and rows[0][0] else ""
    blockers = [row for row in rows if row[1] is not None]
    if not blockers:
        logger.info("%s for %.0f s%s", what, seconds, phase)
        return
    sessions = "; ".join(
        f"pid {b_pid} (application_name '{app or '-'}', {client}, {state}, transaction since {_at(xact)}, "
        f"query since {_at(query)})"
        for _, b_pid, app, client, state, xact, query in blockers
    )
    logger.warning(
        "%s for %.0f s, now waiting for %d other session(s) to end their transaction%s: %s",
        what,
        seconds,
        len(blockers),
        phase,
        sessions,
    )


def _watch(engine: sa.Engine, pid: int, what: str, interval: float, stopped: Callable[[float], bool]) -> None:
    """Until ``stopped(interval)`` says so, log every ``interval`` s what backend ``pid`` waits for,
    each time on a short-lived connection of its own (in autocommit: it holds no snapshot that the
    statement would wait for). Never fails the statement it watches."""
    started = time.monotonic()
    try:
        while not stopped(interval):
            with engine.connect() as raw:
                _log_waits(raw.execution_options(isolation_level="AUTOCOMMIT"), pid, what, time.monotonic() - started)
    except Exception as exc:
        logger.warning("%s: cannot tell what it waits for: %s", what, str(exc).splitlines()[0] if str(exc) else exc)


async def _until(event: asyncio.Event, seconds: float) -> bool:
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        return False
    return True


async def _spawn(fn: Callable[..., None], *args: Any) -> asyncio.Future[None]:
    return asyncio.ensure_future(greenlet_spawn(fn, *args))


@contextlib.contextmanager
def _watching(what: str) -> Iterator[None]:
    """``_watch`` the migration connection's backend while the block runs: as a task on the event
    loop when the connection is SQLAlchemy's sync facade of an asyncio driver (the block's waits
    for the database hand the loop over to it), else in a thread."""
    conn = _bind()
    pid = int(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())
    interval = _log_interval()
    if in_greenlet():
        event = asyncio.Event()
        task = await_(_spawn(_watch, conn.engine, pid, what, interval, lambda s: await_(_until(event, s))))
        try:
            yield
        finally:
            event.set()
            await_(task)
        return
    stop = threading.Event()
    thread = threading.Thread(target=_watch, args=(conn.engine, pid, what, interval, stop.wait), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def _waiting_patiently(what: str, after: str, *, in_transaction: bool = False) -> Iterator[None]:
    """Run the block's statement, whose lock blocks no read or write, under ``LongWaits`` instead of
    the DDL's short lock_timeout, logging what it waits for. When even that runs out, fail the
    revision with one line (``after``: what the next run does about it) rather than let the runner
    retry a statement that would start over and wait again.

    ``in_transaction``: the statement runs inside the revision's transaction (SET LOCAL: the bound
    ends with it); otherwise in autocommit, and the session's own bound comes back after it.
    """
    conn = _bind()
    waits = conn.info.get(LONG_WAITS)
    if not isinstance(waits, LongWaits):
        with _watching(what):
            yield
        return
    previous = conn.execute(sa.text("SELECT current_setting('lock_timeout')")).scalar_one()
    conn.execute(
        sa.text("SELECT set_config('lock_timeout', :bound, :local)"),
        {"bound": waits.lock_timeout, "local": in_transaction},
    )
    try:
        with _watching(what):
            yield
    except DBAPIError as exc:
        if _sqlstate(exc) != LOCK_NOT_AVAILABLE:
            raise
        raise CommandError(
            f"{what} waited longer than {waits.limit} for other transactions to end; {after}. The oldest "
            "open ones: SELECT pid, xact_start, state, query FROM pg_stat_activity WHERE xact_start IS NOT NULL "
            "ORDER BY xact_start"
        ) from None
    finally:
        if not in_transaction:
            with contextlib.suppress(DBAPIError):  # a lost connection is told by the error that ends the run
                conn.execute(sa.text("SELECT set_config('lock_timeout', :bound, false)"), {"bound": previous})


# --- indexes ---------------------------------------------------------------------------------


def create_index_concurrently(
    name: str,
    table: str,
    columns: Sequence[str],
    *,
    unique: bool = False,
    where: str | None = None,
    include: Sequence[str] = (),
) -> None:
    """``CREATE [UNIQUE] INDEX CONCURRENTLY IF NOT EXISTS``, outside the revision's transaction.

    Reads and writes continue during the build (it takes SHARE UPDATE EXCLUSIVE); the build waits
    for every transaction older than it, in any table, each wait within ``LongWaits``
    (KRAKEN_INDEX_BUILD_TIMEOUT), not the short DDL lock_timeout. A build that was cancelled (that
    bound, a killed runner) leaves an INVALID index behind, which IF NOT EXISTS alone
    would keep forever: it is dropped and built again; a valid one is kept. A unique build that finds duplicates
    drops what it left and says so. ``where`` makes a partial index (its predicate, as SQL);
    ``include`` adds non-key columns (``INCLUDE``), so queries that read only those can be answered
    from the index alone. An existing index is compared by table, key columns and uniqueness, not
    by predicate or included columns.
    """
    ddl = (
        f"CREATE {'UNIQUE ' if unique else ''}INDEX CONCURRENTLY IF NOT EXISTS {ident(name)}"
        f" ON {ident(table)} ({_columns(columns)})"
    )
    if include:
        ddl += f" INCLUDE ({_columns(include)})"
    if where is not None:
        ddl += f" WHERE {where}"

    def same(found: IndexInfo) -> bool:
        if (found.table, found.columns, found.unique) == (table, tuple(columns), unique):
            return True
        raise CommandError(
            f"index {name} already exists with another definition (on {found.table} "
            f"({', '.join(str(c) for c in found.columns)}), unique={found.unique}); give the new index "
            "another name or drop the old one first"
        )

    _build_index(name, ddl, same, f"{table} has rows with the same ({', '.join(columns)})")


def _build_index(name: str, ddl: str, same: Callable[[IndexInfo], bool], duplicates: str) -> None:
    """Run ``ddl`` (a ``CREATE [UNIQUE] INDEX CONCURRENTLY IF NOT EXISTS name ...``) outside the
    revision's transaction, unless a valid index ``name`` that is ``same`` exists already; an
    INVALID one is dropped and built again. A unique build over duplicates (``duplicates``: which)
    drops what it left and fails in one line."""
    ctx = _context()
    if ctx.as_sql:
        with _autocommit(ctx):
            op.execute(ddl)
        return
    _require_own_transactions(ctx)
    with _autocommit(ctx):
        found = index_info(name)
        if found is not None and same(found):
            if found.valid:
                return
            logger.warning("index %s is INVALID (an interrupted build left it); building it again", name)
            with _waiting_patiently(f"dropping INVALID index {name}", "the next run drops it again"):
                op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {ident(name)}")
        try:
            with _waiting_patiently(
                f"building index {name}", "it left an INVALID index, which the next run drops and builds again"
            ):
                op.execute(ddl)
        except DBAPIError as exc:
            if _sqlstate(exc) != UNIQUE_VIOLATION:
                raise  # a lock or statement timeout: the INVALID index is rebuilt by the next run
            # The failed build left an INVALID index that every write would still maintain.
            with _waiting_patiently(f"dropping index {name}", "the next run drops it again"):
                op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {ident(name)}")
            raise CommandError(f"cannot build unique index {name}: {duplicates}; nothing was left behind") from None


def drop_index_concurrently(name: str) -> None:
    """``DROP INDEX CONCURRENTLY IF EXISTS``, outside the revision's transaction: it waits for the
    transactions using the table, within ``LongWaits``, and blocks no read or write meanwhile."""
    ctx = _context()
    drop = f"DROP INDEX CONCURRENTLY IF EXISTS {ident(name)}"
    if ctx.as_sql:
        with _autocommit(ctx):
            op.execute(drop)
        return
    _require_own_transactions(ctx)
    with _autocommit(ctx), _waiting_patiently(f"dropping index {name}", "the next run drops it again"):
        op.execute(drop)


# --- columns ---------------------------------------------------------------------------------


def add_columns(table: str, columns: Mapping[str, str]) -> None:
    """``ADD COLUMN IF NOT EXISTS`` for each ``name: type``, in one statement, then commit.

    Nullable and without a default, a new column is a catalog change under a brief ACCESS
    EXCLUSIVE lock: no rewrite, no scan. A required column is not this helper's (add it nullable,
    backfill, then enforce it: backend/alembic/README.md, "Writing a revision").
    """
    for name, type_ in columns.items():
        if any(word in type_.upper().split() for word in ("NOT", "DEFAULT", "PRIMARY")):
            raise ValueError(f"add_columns({table!r}) adds nullable columns without a default; {name} is {type_!r}")
    additions = ", ".join(f"ADD COLUMN IF NOT EXISTS {ident(name)} {type_}" for name, type_ in columns.items())
    op.execute(f"ALTER TABLE {ident(table)} {additions}")
    commit()


def drop_columns(table: str, columns: Sequence[str]) -> None:
    """``DROP COLUMN IF EXISTS`` for each, in one statement (catalog only: a brief ACCESS EXCLUSIVE
    lock; the space is reclaimed as rows are rewritten), then commit. Call ``refuse_data_loss`` first."""
    drops = ", ".join(f"DROP COLUMN IF EXISTS {ident(name)}" for name in columns)
    op.execute(f"ALTER TABLE {ident(table)} {drops}")
    commit()


# --- constraints -----------------------------------------------------------------------------


def _on_delete_code(on_delete: str | None) -> str:
    key = on_delete.upper() if on_delete else None
    if key not in _ON_DELETE:
        raise ValueError(f"unsupported ON DELETE action {on_delete!r}")
    return _ON_DELETE[key]


def _fk_matches(
    found: ConstraintInfo | None,
    columns: Sequence[str],
    ref_table: str,
    ref_columns: Sequence[str],
    on_delete: str | None,
) -> bool:
    return (
        found is not None
        and found.kind == "f"
        and found.columns == tuple(columns)
        and found.ref_table == ref_table
        and found.ref_columns == tuple(ref_columns)
        and found.on_delete == _on_delete_code(on_delete)
        and found.on_update == "a"
    )


def _fk_sql(columns: Sequence[str], ref_table: str, ref_columns: Sequence[str], on_delete: str | None) -> str:
    sql = f"FOREIGN KEY ({_columns(columns)}) REFERENCES {ident(ref_table)} ({_columns(ref_columns)})"
    if on_delete and _on_delete_code(on_delete) != "a":
        sql += f" ON DELETE {on_delete.upper()}"
    return sql


def add_foreign_key_not_valid(
    name: str,
    table: str,
    columns: Sequence[str],
    ref_table: str,
    ref_columns: Sequence[str] = ("id",),
    *,
    on_delete: str | None = None,
) -> None:
    """Add a foreign key that checks new rows at once and existing rows only at ``validate_constraint``.

    Takes SHARE ROW EXCLUSIVE on both tables for a catalog change only, then commits.
    """
    if not _offline():
        found = constraint_info(name, table)
        if found is not None:
            if _fk_matches(found, columns, ref_table, ref_columns, on_delete):
                return
            raise CommandError(
                f"constraint {name} on {table} exists with another definition; replace it with replace_foreign_key()"
            )
    _lock_referenced_first(table, ref_table, "SHARE ROW EXCLUSIVE")
    op.execute(
        f"ALTER TABLE {ident(table)} ADD CONSTRAINT {ident(name)} "
        f"{_fk_sql(columns, ref_table, ref_columns, on_delete)} NOT VALID"
    )
    commit()


def _lock_referenced_first(table: str, ref_table: str, mode: str) -> None:
    """Adding or dropping a foreign key locks both tables, the referencing one first. The service
    writes the other way round (a conversation, then its turns): a transaction holding the parent
    and waiting for the child, against one holding the child and waiting for the parent, is a
    deadlock. Taking the parent first, in the service's order, avoids it."""
    if ref_table != table:
        op.execute(f"LOCK TABLE {ident(ref_table)} IN {mode} MODE")


def add_check_not_valid(name: str, table: str, condition: str) -> None:
    """Add a CHECK constraint that new rows must pass at once; existing rows wait for ``validate_constraint``.

    A catalog change under a brief ACCESS EXCLUSIVE lock, then commits.
    """
    if not _offline():
        found = constraint_info(name, table)
        if found is not None:
            if found.kind == "c":
                return
            raise CommandError(f"constraint {name} on {table} exists and is not a CHECK constraint")
    op.execute(f"ALTER TABLE {ident(table)} ADD CONSTRAINT {ident(name)} CHECK ({condition}) NOT VALID")
    commit()


def validate_constraint(name: str, table: str) -> None:
    """``VALIDATE CONSTRAINT`` in a transaction of its own: it scans the table under SHARE UPDATE
    EXCLUSIVE, which lets reads and writes continue (a foreign key also takes ROW SHARE on the
    referenced table), so it waits for those locks within ``LongWaits``."""
    validate = f"ALTER TABLE {ident(table)} VALIDATE CONSTRAINT {ident(name)}"
    if _offline():
        op.execute(validate)
        commit()
        return
    found = constraint_info(name, table)
    if found is None:
        raise CommandError(f"there is no constraint {name} on {table} to validate")
    if found.validated:
        return
    if _holds_locks_worth_releasing():
        # Never scan, nor wait long, while still holding the ACCESS EXCLUSIVE lock of an ADD in this transaction.
        commit()
    with _waiting_patiently(
        f"validating constraint {name} on {table}", "it stays NOT VALID until the next run", in_transaction=True
    ):
        op.execute(validate)
    commit()


def drop_constraint(name: str, table: str) -> None:
    """``DROP CONSTRAINT IF EXISTS`` (catalog only: a brief ACCESS EXCLUSIVE lock), then commit.

    Dropping a unique constraint drops its index too.
    """
    if not _offline():
        found = constraint_info(name, table)
        if found is None:
            return
        if found.kind == "f" and found.ref_table:
            _lock_referenced_first(table, found.ref_table, "ACCESS EXCLUSIVE")
    op.execute(f"ALTER TABLE {ident(table)} DROP CONSTRAINT IF EXISTS {ident(name)}")
    commit()


def add_unique_constraint(name: str, table: str, columns: Sequence[str]) -> None:
    """A UNIQUE constraint from a unique index built concurrently: the exclusive lock only attaches it.

    The index gets the constraint's name, as ``ADD CONSTRAINT ... UNIQUE USING INDEX`` would
    rename it to that anyway.
    """
    if not _offline():
        found = constraint_info(name, table)
        if found is not None:
            if found.kind == "u" and found.columns == tuple(columns):
                return
            raise CommandError(f"constraint {name} on {table} exists with another definition")
    create_index_concurrently(name, table, columns, unique=True)
    op.execute(f"ALTER TABLE {ident(table)} ADD CONSTRAINT {ident(name)} UNIQUE USING INDEX {ident(name)}")
    commit()


def _pending_name(name: str) -> str:
    # The replacement lives under this name until it takes over; PostgreSQL names have 63 bytes.
    return f"{name[:59]}_new"


def replace_foreign_key(
    name: str,
    table: str,
    columns: Sequence[str],
    ref_table: str,
    ref_columns: Sequence[str] = ("id",),
    *,
    on_delete: str | None = None,
) -> None:
    """Change a foreign key (its ON DELETE action, say) and keep its name, without a window in
    which the old rule is not enforced.

    The replacement is added NOT VALID under a temporary name and validated while the old key
    still holds; then, in one short transaction, the old key is dropped and the new one renamed.
    """
    pending = _pending_name(name)
    if not _offline():
        if _fk_matches(constraint_info(name, table), columns, ref_table, ref_columns, on_delete):
            validate_constraint(name, table)
            if constraint_info(pending, table) is not None:
                drop_constraint(pending, table)  # left over by a run that went the other way
            return
        leftover = constraint_info(pending, table)
        if leftover is not None and not _fk_matches(leftover, columns, ref_table, ref_columns, on_delete):
            drop_constraint(pending, table)
    add_foreign_key_not_valid(pending, table, columns, ref_table, ref_columns, on_delete=on_delete)
    validate_constraint(pending, table)
    # Dropping a foreign key takes ACCESS EXCLUSIVE on both tables, for a catalog change only.
    _lock_referenced_first(table, ref_table, "ACCESS EXCLUSIVE")
    # squawk warns about any dropped or renamed constraint; this one is replaced by an equal,
    # already validated key that takes over its name in the same transaction.
    _static(squawk_ignore(["ban-drop-constraint"]))
    op.execute(f"ALTER TABLE {ident(table)} DROP CONSTRAINT IF EXISTS {ident(name)}")
    _static(squawk_ignore(["renaming-object"]))
    op.execute(f"ALTER TABLE {ident(table)} RENAME CONSTRAINT {ident(pending)} TO {ident(name)}")
    commit()


# --- tables ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ForeignKey:
    """A foreign key of a new table (``create_table``): added NOT VALID, then validated."""

    name: str
    columns: Sequence[str]
    ref_table: str
    ref_columns: Sequence[str] = ("id",)
    on_delete: str | None = None


_REFERENCES = re.compile(r"\bREFERENCES\b", re.IGNORECASE)

# A table's definition as the catalog holds it, for telling whether an existing table is the one a
# revision creates: columns (type, NOT NULL, default, identity), constraints other than foreign
# keys, and indexes, each by name. Temporary tables live in a pg_temp_N schema that the text of
# their defaults and indexes names: it is left out, so a temporary copy compares equal.
_SHAPE = sa.text(
    "SELECT 'column ' || a.attname, format_type(a.atttypid, a.atttypmod)"
    " || CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END"
    " || coalesce(' DEFAULT ' || regexp_replace(pg_get_expr(d.adbin, d.adrelid), 'pg_temp_[0-9]+\\.', '', 'g'), '')"
    " || CASE a.attidentity WHEN 'a' THEN ' GENERATED ALWAYS AS IDENTITY'"
    "      WHEN 'd' THEN ' GENERATED BY DEFAULT AS IDENTITY' ELSE '' END"
    " FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum"
    " WHERE a.attrelid = CAST(:table AS regclass) AND a.attnum > 0 AND NOT a.attisdropped"
    " UNION ALL SELECT 'constraint ' || c.conname, pg_get_constraintdef(c.oid) FROM pg_constraint c"
    " WHERE c.conrelid = CAST(:table AS regclass) AND c.contype NOT IN ('f', 'n')"
    " UNION ALL SELECT 'index ' || i.relname,"
    " regexp_replace(pg_get_indexdef(x.indexrelid), '^.* USING ', CASE WHEN x.indisunique THEN 'UNIQUE ' ELSE '' END)"
    " FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid WHERE x.indrelid = CAST(:table AS regclass)"
)
_FOREIGN_KEYS_OF = sa.text(
    "SELECT conname FROM pg_constraint WHERE conrelid = CAST(:table AS regclass) AND contype = 'f' ORDER BY conname"
)
_REFERENCED_BY = sa.text(
    "SELECT conrelid::regclass::text || '.' || conname FROM pg_constraint"
    " WHERE confrelid = CAST(:table AS regclass) AND conrelid <> confrelid AND contype = 'f' ORDER BY 1"
)


def _table_sql(
    name: str,
    columns: Mapping[str, str],
    primary_key: Sequence[str],
    uniques: Mapping[str, Sequence[str]],
    checks: Mapping[str, str],
    *,
    temporary: bool = False,
    if_not_exists: bool = False,
) -> str:
    parts = [f"{ident(column)} {definition}" for column, definition in columns.items()]
    if primary_key:
        parts.append(f"CONSTRAINT {ident(name + '_pkey')} PRIMARY KEY ({_columns(primary_key)})")
    parts += [f"CONSTRAINT {ident(u)} UNIQUE ({_columns(cols)})" for u, cols in uniques.items()]
    parts += [f"CONSTRAINT {ident(c)} CHECK ({condition})" for c, condition in checks.items()]
    body = ",\n".join(f"    {part}" for part in parts)
    create = "CREATE TEMPORARY TABLE" if temporary else "CREATE TABLE"
    return f"{create}{' IF NOT EXISTS' if if_not_exists else ''} {ident(name)} (\n{body}\n)"


def _index_sql(name: str, table: str, columns: Sequence[str]) -> str:
    """A plain index of a new table (``table``: its name as SQL)."""
    return f"CREATE INDEX IF NOT EXISTS {ident(name)} ON {table} ({_columns(columns)})"


def _shape(table: str) -> dict[str, str]:
    return {str(what): str(how) for what, how in _bind().execute(_SHAPE, {"table": table}).all()}


def _differences(
    name: str, create: str, indexes: Mapping[str, Sequence[str]], foreign_keys: Sequence[ForeignKey]
) -> list[str]:
    """How the existing table ``name`` differs from what the revision would create: the revision's
    definition is created as a temporary table (in a savepoint, rolled back) and both are read
    back from the catalog, so no SQL is parsed here."""
    found = _shape(ident(name))
    savepoint = _bind().begin_nested()
    try:
        _bind().execute(sa.text(create))
        for index, columns in indexes.items():
            _bind().execute(sa.text(_index_sql(index, f"pg_temp.{ident(name)}", columns)))
        wanted = _shape(f"pg_temp.{ident(name)}")
    finally:
        savepoint.rollback()
    problems = [
        f"{what} is {found[what]}, not {how}" for what, how in wanted.items() if what in found and found[what] != how
    ]
    problems += [f"{what} is missing" for what in wanted if what not in found]
    problems += [f"{what} is not in the revision" for what in found if what not in wanted]
    declared = {fk.name: fk for fk in foreign_keys}
    for (existing,) in _bind().execute(_FOREIGN_KEYS_OF, {"table": ident(name)}).all():
        fk = declared.get(existing)
        if fk is None:
            problems.append(f"foreign key {existing} is not in the revision")
        elif not _fk_matches(constraint_info(existing, name), fk.columns, fk.ref_table, fk.ref_columns, fk.on_delete):
            problems.append(f"foreign key {existing} has another definition")
    return problems


def create_table(
    name: str,
    columns: Mapping[str, str],
    *,
    primary_key: Sequence[str] = (),
    uniques: Mapping[str, Sequence[str]] | None = None,
    checks: Mapping[str, str] | None = None,
    indexes: Mapping[str, Sequence[str]] | None = None,
    foreign_keys: Sequence[ForeignKey] = (),
) -> None:
    """Create a table, with its own constraints and indexes, then its foreign keys to existing tables.

    ``columns`` maps each column to its type and options (``"bigint NOT NULL"``, ``"text"``,
    ``"timestamptz NOT NULL DEFAULT now()"``); the primary key is named ``<table>_pkey``, as
    PostgreSQL names it; ``uniques``, ``checks`` and ``indexes`` map a name to columns or a condition.

    One transaction creates the table, its constraints and its indexes (a plain CREATE INDEX: the
    table is new and empty, and only this transaction sees it): it commits whole or not at all. If
    the table exists (a revision run again after a later step failed), it is compared with the
    definition, and one that differs (another table of that name, an older draft of the revision)
    is refused with its differences: ``IF NOT EXISTS`` alone would keep it silently.

    Each of ``foreign_keys`` then goes as on an existing table, one at a time, so only one busy
    table is ever locked: in a transaction of its own, the referenced table is locked first
    (SHARE ROW EXCLUSIVE, which waits within lock_timeout and holds writes to it back only for the
    catalog change; the service locks the referenced row before it writes a referencing one, so
    this order cannot deadlock with it), then the constraint is added NOT VALID (SHARE ROW
    EXCLUSIVE on the new table) and committed; then validated in a transaction of its own
    (SHARE UPDATE EXCLUSIVE on the new table, ROW SHARE on the referenced one: reads and writes go
    on), which on the new, empty table scans nothing. Inline ``REFERENCES`` are refused: they would
    take the referenced table's lock inside the creating transaction.

    Offline: ``CREATE TABLE IF NOT EXISTS`` (there is nothing to compare with), then the same steps.
    """
    uniques, checks, indexes = uniques or {}, checks or {}, indexes or {}
    for what, text in [*columns.items(), *checks.items()]:
        if _REFERENCES.search(text):
            raise ValueError(
                f"create_table({name!r}): {what} has an inline REFERENCES; give it in foreign_keys= "
                "(ops.ForeignKey(...)), which adds it NOT VALID after the table, locking the referenced table first"
            )
    create = _table_sql(name, columns, primary_key, uniques, checks, if_not_exists=_offline())
    if _offline() or _rows("SELECT to_regclass(:t)", t=ident(name))[0][0] is None:
        op.execute(create)
        for index, index_columns in indexes.items():
            op.execute(_index_sql(index, ident(name), index_columns))
    else:
        temporary = _table_sql(name, columns, primary_key, uniques, checks, temporary=True)
        problems = _differences(name, temporary, indexes, foreign_keys)
        if problems:
            raise CommandError(
                f"table {name} exists and differs from the one this revision creates: {'; '.join(problems)}. "
                "Drop it if nothing needs it, or give the new table another name"
            )
    commit()
    for fk in foreign_keys:
        add_foreign_key_not_valid(fk.name, name, fk.columns, fk.ref_table, fk.ref_columns, on_delete=fk.on_delete)
        validate_constraint(fk.name, name)


def drop_table(name: str) -> None:
    """Drop a table, refusing while it holds rows unless ``-x allow_data_loss=true`` (or an earlier
    ``refuse_data_loss`` of this revision covered it), and refusing while another table refers to it.

    Its foreign keys go first, one at a time, each in a transaction of its own that locks the
    referenced table first (ACCESS EXCLUSIVE, for the catalog change only), in the service's
    order; then ``DROP TABLE IF EXISTS``, which then locks no table but this one. Idempotent: a
    table already gone is nothing to do. Offline the foreign keys are found by a ``DO`` block,
    run between transactions, that commits after each (as the backfill's does).
    """
    if name not in _step().cleared:
        _refuse_after_commit(
            f"the data-loss check of ops.drop_table({name!r})",
            hint="call ops.refuse_data_loss(revision, tables=[...]) with every table it drops first",
        )
        refuse_data_loss(_step().revision or "this revision", tables=[name])
    if _offline():
        _emit_drop_foreign_keys(name)
    elif _rows("SELECT to_regclass(:t)", t=ident(name))[0][0] is None:
        return
    else:
        referenced_by = [row[0] for row in _rows(str(_REFERENCED_BY), table=ident(name))]
        if referenced_by:
            raise CommandError(
                f"cannot drop table {name}: foreign key(s) {', '.join(referenced_by)} refer to it; drop them first"
            )
        for (fk,) in _bind().execute(_FOREIGN_KEYS_OF, {"table": ident(name)}).all():
            drop_constraint(fk, name)
    op.execute(f"DROP TABLE IF EXISTS {ident(name)}")
    commit()


def _emit_drop_foreign_keys(name: str) -> None:
    # No % anywhere (see _emit_violation_guard); the variable's name is one no column has.
    table = literal(ident(name))
    refused = literal(f"cannot drop table {name}: other tables refer to it")
    with _autocommit(_context()):
        op.execute(
            "DO $drop_table$\nDECLARE\n    drop_table_fk record;\nBEGIN\n"
            f"    IF EXISTS (SELECT FROM pg_constraint WHERE confrelid = to_regclass({table})"
            " AND conrelid <> confrelid AND contype = 'f') THEN\n"
            f"        RAISE EXCEPTION USING MESSAGE = {refused};\n"
            "    END IF;\n"
            "    FOR drop_table_fk IN SELECT conname, confrelid::regclass::text AS referenced FROM pg_constraint\n"
            f"        WHERE conrelid = to_regclass({table}) AND contype = 'f' ORDER BY conname LOOP\n"
            "        EXECUTE 'LOCK TABLE ' || drop_table_fk.referenced || ' IN ACCESS EXCLUSIVE MODE';\n"
            f"        EXECUTE 'ALTER TABLE ' || {table} || ' DROP CONSTRAINT ' || quote_ident(drop_table_fk.conname);\n"
            "        COMMIT;\n"
            "    END LOOP;\nEND\n$drop_table$"
        )


# --- data ------------------------------------------------------------------------------------


def backfill_in_batches(statement: str) -> int:
    """Run an UPDATE/INSERT/DELETE that handles one batch, each batch in a transaction of its own,
    until a batch touches no row; returns the rows touched.

    The statement must pick only rows still to do, a bounded number of them, e.g.
    ``UPDATE t SET x = ... WHERE id IN (SELECT id FROM t WHERE x IS NULL LIMIT 5000)``: so each
    transaction locks a few thousand rows for a moment, and a run interrupted half-way resumes.
    Offline it is emitted once, with a comment saying to repeat it.
    """
    if _offline():
        _static("-- repeat the next statement until it reports 0 rows")
        op.execute(statement)
        commit()
        return 0
    total = 0
    while True:
        touched = _bind().execute(sa.text(statement)).rowcount
        commit()
        if not touched:
            return total
        total += touched


_KEYS = re.compile(r"(?<![:\w]):keys\b")


def _batch_scan(table: str, key: str, size: int | str, pending: str, *, upper: str, after: str | None) -> str:
    """The next batch's keys (``size`` of them: a number, or a parameter), up to ``upper`` and past
    ``after`` (none: from the first), each with whether it is still to do; read without locking anything."""
    lower = "" if after is None else f"{ident(key)} > {after} AND "
    return (
        f"SELECT {ident(key)}, ({pending}) FROM {ident(table)} WHERE {lower}{ident(key)} <= {upper}"
        f" ORDER BY {ident(key)} LIMIT {size if isinstance(size, str) else int(size)}"
    )


def _batch_lock(table: str, key: str, keys: str) -> str:
    """Lock the rows of ``keys`` in key order; the keys of those still there."""
    return (
        f"SELECT {ident(key)} FROM {ident(table)} WHERE {ident(key)} = ANY({keys})"
        f" ORDER BY {ident(key)} FOR NO KEY UPDATE"
    )


def _batch_claim(table: str, key: str, pending: str, *, first: bool) -> str:
    """One statement for the online walk: the next batch's keys (``:size`` of them, past ``:after``
    unless ``first``, up to ``:upper``), and of those, the rows still to do locked in key order.
    Returns how many keys the batch has, its last key, and the locked keys.

    The batch's keys are read from the key's index first (a CTE, read once); the rows are then
    fetched by those keys (an array: the planner looks them up in the index, never scans the
    table), ``pending`` is evaluated on each, and those it picks are locked. A row a writer changed
    meanwhile is locked once the writer is done and ``pending`` checked again on its latest
    version; rows it does not pick are read, never locked."""
    lower = "" if first else f"{ident(key)} > :after AND "
    name = ident(key)
    return (
        f"WITH backfill_batch AS MATERIALIZED (SELECT {name} AS backfill_key FROM {ident(table)}"
        f" WHERE {lower}{name} <= :upper ORDER BY {name} LIMIT :size)"
        " SELECT (SELECT count(*) FROM backfill_batch),"
        " (SELECT backfill_key FROM backfill_batch ORDER BY backfill_key DESC LIMIT 1),"
        f" ARRAY(SELECT {name} FROM {ident(table)}"
        f" WHERE {name} = ANY(ARRAY(SELECT backfill_key FROM backfill_batch)) AND ({pending})"
        f" ORDER BY {name} FOR NO KEY UPDATE)"
    )


# How long (seconds) a backfill waits for lock waiters on its table to go, or a standby to catch up,
# before it goes on anyway (with a warning): someone else's stuck lock must not stall a deploy forever.
MAX_PAUSE = 60.0
_PAUSE_STEP = 0.1

# Who waits for a lock on the table (not granted: a DDL in the queue, writers behind it, writers
# waiting for each other's rows), and the largest replay lag of a standby (NULL without one, or
# when the role may not read it). pg_locks and pg_stat_replication are read live, not from a
# snapshot. The look opens the transaction the next batch runs in, and sets its commit not to wait
# for the WAL flush (synchronous_commit = off, for that transaction only): see backfill_by_key.
_HOLD_BACK = sa.text(
    "SELECT array(SELECT DISTINCT l.pid FROM pg_locks AS l"
    " WHERE NOT l.granted AND l.relation = CAST(:table AS regclass)"
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) ORDER BY l.pid),"
    " (SELECT max(extract(epoch FROM r.replay_lag)) FROM pg_stat_replication AS r),"
    " set_config('synchronous_commit', 'off', true)"
)


@dataclass
class _Walk:
    """Where a backfill is: what it walked and changed (in this run and before it), since when."""

    label: str
    total: int
    batch_size: int
    done: int = 0  # rows walked, runs before this one included
    changed: int = 0
    walked_now: int = 0  # in this run
    changed_now: int = 0
    locked: int = 0
    batches: int = 0
    largest: int = 0  # the largest batch
    longest_lock: float = 0.0  # what a writer of a locked row can wait for a batch, at most
    since_vacuum: int = 0  # rows changed since the walk started or the last VACUUM
    size: int = 0  # the table's main fork, in bytes, after the last batch
    grown_from: int = 0  # its size when the walk started or the last VACUUM ended
    base: int = 0  # its size when the walk started
    vacuums: int = 0
    paused: float = 0.0
    started: float = dataclasses.field(default_factory=time.monotonic)
    logged: float = dataclasses.field(default_factory=time.monotonic)

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.walked_now / elapsed if elapsed > 0 else 0.0

    def vacuum_due(self, every: int | None) -> bool:
        """Is a VACUUM due: every ``every`` rows changed (0: never), or without it once the table
        has grown by ``VACUUM_GROWTH`` of its first size (and at least ``VACUUM_AT_LEAST`` rows
        changed: a small table is not vacuumed after each batch)."""
        if every is not None:
            return every > 0 and self.since_vacuum >= every
        grown = self.size - self.grown_from
        return self.since_vacuum >= backfills.VACUUM_AT_LEAST and grown > backfills.VACUUM_GROWTH * self.base

    def report(self, *, force: bool = False) -> None:
        if force or time.monotonic() - self.logged >= backfills.PROGRESS_INTERVAL:
            self.logged = time.monotonic()
            logger.info(
                backfills.progress_line(self.label, self.done, self.total, self.changed, self.rate(), self.batch_size)
            )


def _hold_back(table: str, label: str, max_replay_lag: float) -> float:
    """Wait, before a batch, while sessions wait for a lock on ``table`` or a standby lags by
    more than ``max_replay_lag`` s (up to ``MAX_PAUSE``); the seconds waited. Sleeps on the server
    (``pg_sleep``), so an asyncio driver's event loop runs meanwhile, outside any transaction (it
    holds no snapshot while it waits). Returns inside the transaction of its last look, which the
    batch goes on with."""
    waited = 0.0
    told = -backfills.PROGRESS_INTERVAL
    while True:
        waiters, lag, _ = _bind().execute(_HOLD_BACK, {"table": ident(table)}).one()
        lagging = lag is not None and lag > max_replay_lag
        if not waiters and not lagging:
            return waited
        if waited >= MAX_PAUSE:
            logger.warning("%s: paused for %.0f s, going on regardless", label, waited)
            return waited
        if waited - told >= backfills.PROGRESS_INTERVAL:
            told = waited
            why = (
                f"{len(waiters)} session(s) wait for a lock on {table} (pid {', '.join(map(str, waiters))})"
                if waiters
                else f"a standby replays {lag:.1f} s behind (more than {max_replay_lag:g} s)"
            )
            logger.info("%s: paused, %s", label, why)
        commit()
        _bind().execute(sa.text(f"SELECT pg_sleep({_PAUSE_STEP})"))
        commit()
        waited += _PAUSE_STEP


def _vacuum(table: str, label: str, *, last: bool = False) -> None:
    """A plain VACUUM of ``table``, so that the space of the row versions the batches replaced is
    used again by the next batches. Its lock blocks no read or write; SKIP_LOCKED: none while an
    autovacuum or a schema change holds the table (it waits for nothing); TRUNCATE OFF: no ACCESS
    EXCLUSIVE at the end. During the walk INDEX_CLEANUP OFF: freeing the heap's space needs no pass
    over the indexes, which on 1M turns took 40 s a time on a busy machine; the last one cleans the
    indexes too, and sets the visibility map that index-only scans read."""
    started = time.monotonic()
    options = "SKIP_LOCKED, TRUNCATE OFF" + ("" if last else ", INDEX_CLEANUP OFF")
    with _autocommit(_context()):
        _bind().execute(sa.text(f"VACUUM ({options}) {ident(table)}"))
    logger.debug("%s: VACUUM (%s) %s took %.1f s", label, options, table, time.monotonic() - started)


def _estimated_rows(table: str) -> int:
    """The table's rows as the planner estimates them (cheap on any size); counted when it has no
    estimate yet (a table never analyzed)."""
    estimate = _bind().execute(
        sa.text("SELECT reltuples FROM pg_class WHERE oid = CAST(:t AS regclass)"), {"t": ident(table)}
    )
    rows = estimate.scalar()
    if rows is not None and rows > 0:
        return int(rows)
    return int(_bind().execute(sa.text(f"SELECT count(*) FROM {ident(table)}")).scalar_one())


def backfill_by_key(
    table: str,
    key: str,
    batch_sql: str,
    batch_size: int = 1000,
    *,
    pending: str = "true",
    key_type: str = "uuid",
    label: str | None = None,
    target_seconds: float | None = backfills.TARGET_BATCH_SECONDS,
    max_batch_size: int = backfills.MAX_BATCH_SIZE,
    vacuum_every: int | None = None,
    max_replay_lag: float = 10.0,
) -> int:
    """Walk ``table`` in the order of its unique ``key``, a batch of rows at a time, and run
    ``batch_sql`` on each batch's rows still to do; returns the rows ``batch_sql`` changed, and logs
    it with the longest a batch held its locks (its wait for them included): the longest a writer
    of those rows can have waited for the walk.

    The walk ends: its upper bound is the highest key when it starts, so rows written meanwhile
    (after that key, or behind the walk) never keep it going, and only that bound ends it (a batch
    that changes nothing does not). Each batch is one short transaction of two statements. The
    first reads the batch's keys and locks, ``FOR NO KEY UPDATE`` and in key order, the rows still
    to do, those ``pending`` picks (a condition on the row, its columns named as in ``SELECT ...
    FROM table``; default: every row): rows it does not pick are read, never locked, and a row a
    writer holds is locked once the writer is done, ``pending`` checked again on its latest
    version. Writers of those rows wait for the batch, never the reverse, so it cannot deadlock
    with them. The second, ``batch_sql``, finds their keys in ``:keys`` (an array of
    ``key_type``). Under READ COMMITTED it takes a new snapshot once the locks are granted, so it
    sees everything committed to those rows (and to other tables), and nothing can change them
    before the commit: ``batch_sql`` checks again what it changes, as ``pending`` only picked the
    rows to lock. ``FOR NO KEY UPDATE`` still lets rows that reference them be inserted (a foreign
    key check takes KEY SHARE). ``batch_sql`` must touch only the rows of ``:keys``, and only those
    still to do.

    A batch commits without waiting for its WAL to be flushed (``synchronous_commit = off`` for
    that transaction; the last commit of the walk waits, as the session says): a flush per batch
    made the writers' own commits queue behind it. It is safe because the batch and its progress
    row commit together and the WAL is flushed in order: a crash of the server can lose only the
    last few batches, with their progress, never a batch whose progress survives or the other way
    round, and the next run walks them again; and any commit that waits for its flush (a writer's,
    one that read the batch's values) makes every batch before it durable too.

    Online, the engine around the walk:

    - the batch size starts at ``batch_size`` and is tuned after each batch so that a batch takes
      about ``target_seconds`` (between ``MIN_BATCH_SIZE`` and ``max_batch_size`` rows); it halves
      when a session waited for the batch's rows. ``target_seconds=None``: every batch is
      ``batch_size`` rows;
    - before each batch it pauses while sessions wait for a lock on the table, or a standby replays
      more than ``max_replay_lag`` s behind (nothing to wait for without standbys), up to ``MAX_PAUSE``;
    - it runs a plain ``VACUUM`` of the table (the indexes cleaned only the last time) when the
      table has grown by ``VACUUM_GROWTH`` of its first size since the walk started or the last
      VACUUM (and at least ``VACUUM_AT_LEAST`` rows changed), or every ``vacuum_every`` rows
      changed when it is given (0: never), and at the end: the next batches reuse the space of the
      row versions the earlier ones replaced instead of growing the table. A walk by random keys
      seldom needs one during the walk (see ``VACUUM_GROWTH``), and each costs a pass over the
      table and WAL that the writers wait behind;
    - its progress (rows walked of the estimated total, rate, time to go) is logged every
      ``PROGRESS_INTERVAL`` s and kept in ``alembic_backfill`` (backend/migrations/backfills.py),
      updated in each batch's transaction: a run killed half-way is continued, by the next run of
      the same revision, after the last batch that committed (``key_type`` must read back from
      text: uuid, integers, text).

    Offline, the walk is one ``DO`` block between transactions, which commits after each batch
    (run it outside a transaction block: ``psql`` does, unless given ``-1``); it counts against
    ``statement_timeout`` as a whole, and says how many rows it changed in a NOTICE. It keeps the
    first ``batch_size`` throughout and records no progress.
    """
    if batch_size < 1:
        raise ValueError(f"backfill_by_key({table!r}): batch_size must be at least 1, not {batch_size}")
    label = label or f"backfill of {table} by {key}"
    if _offline():
        _emit_backfill_by_key(table, key, batch_sql, batch_size, pending, key_type, label)
        return 0
    smallest = min(batch_size, backfills.MIN_BATCH_SIZE)
    largest = max(batch_size, max_batch_size)
    if wal.uncompressed(_bind()):
        logger.info("%s: %s", label, wal.ADVICE)
    row_key = {"revision": _bind().info.get(RUNNING_REVISION, ""), "table": table, "label": label}
    _bind().execute(sa.text(backfills.CREATE_TABLE))
    commit()
    paused = _hold_back(table, label, max_replay_lag)
    resumed = _bind().execute(sa.text(backfills.RESUME.format(key_type=key_type)), row_key).first()
    if resumed is not None:
        upper, after, done, changed, since = resumed
        walk = _Walk(label, max(done, _estimated_rows(table)), batch_size, done=done, changed=changed)
        logger.info(
            "%s: continuing a walk started %s, after key %s (%d row(s) walked)",
            label,
            f"{since:%Y-%m-%d %H:%M:%S%z}",
            after,
            done,
        )
    else:
        highest = sa.text(f"SELECT {ident(key)} FROM {ident(table)} ORDER BY {ident(key)} DESC LIMIT 1")
        upper, after = _bind().execute(highest).scalar(), None
        walk = _Walk(label, _estimated_rows(table), batch_size)
        start = {
            **row_key,
            "upper": None if upper is None else str(upper),
            "total": walk.total,
            "batch_size": batch_size,
        }
        _bind().execute(sa.text(backfills.START), start)
    size_now = sa.text("SELECT pg_relation_size(CAST(:t AS regclass))")
    walk.paused = paused
    walk.size = walk.grown_from = walk.base = int(_bind().execute(size_now, {"t": ident(table)}).scalar_one())
    commit()
    claims = {first: sa.text(_batch_claim(table, key, pending, first=first)) for first in (True, False)}
    advance = sa.text(backfills.ADVANCE)
    while upper is not None:
        # In one transaction: the look for lock waiters (done by _hold_back before the first batch,
        # and after each), the keys of the batch with its rows to do locked, batch_sql, progress.
        began = time.monotonic()
        bounds = {"upper": upper, "size": walk.batch_size} | ({} if after is None else {"after": after})
        walked, last, keys = _bind().execute(claims[after is None], bounds).one()
        if not walked:
            break
        touched = _bind().execute(sa.text(batch_sql), {"keys": keys}).rowcount if keys else 0
        progress = {"last": str(last), "walked": walked, "changed": touched, "batch_size": walk.batch_size}
        waiters, walk.size = _bind().execute(advance, {**row_key, **progress, "walked_table": ident(table)}).one()
        commit()
        after = last
        elapsed = time.monotonic() - began
        if keys:
            walk.longest_lock = max(walk.longest_lock, elapsed)
        walk.locked += len(keys)
        walk.batches += 1
        walk.largest = max(walk.largest, walked)
        walk.done += walked
        walk.walked_now += walked
        walk.changed += touched
        walk.changed_now += touched
        walk.since_vacuum += touched
        if target_seconds is not None:
            tuned = backfills.next_batch_size(walk.batch_size, elapsed, target_seconds, smallest, largest)
            walk.batch_size = max(smallest, walk.batch_size // 2) if waiters else tuned
        logger.debug(
            "%s: batch of %d key(s), %d changed, %.0f ms%s; next %d",
            label, walked, touched, elapsed * 1000,
            f", {waiters} session(s) waited" if waiters else "", walk.batch_size,
        )  # fmt: skip
        if walk.vacuum_due(vacuum_every):
            _vacuum(table, label)
            walk.vacuums += 1
            walk.since_vacuum = 0
            walk.grown_from = int(_bind().execute(size_now, {"t": ident(table)}).scalar_one())
            commit()
        walk.report()
        walk.paused += _hold_back(table, label, max_replay_lag)
    commit()
    # In a transaction of its own, with the session's synchronous_commit: once it is durable, so is
    # every batch before it (the WAL is flushed in order).
    _bind().execute(sa.text(backfills.FINISH), row_key)
    commit()
    if walk.changed_now and vacuum_every != 0:
        _vacuum(table, label, last=True)
    logger.info(
        "%s: %d of %d row(s) changed (%d to do), in %d batch(es) of up to %d (%.1f s; locks held %.0f ms at most;"
        " %.0f rows/s%s%s)",
        label, walk.changed_now, walk.walked_now, walk.locked, walk.batches, walk.largest,
        time.monotonic() - walk.started, walk.longest_lock * 1000, walk.rate(),
        f"; {walk.vacuums} VACUUM(s) during the walk" if walk.vacuums else "",
        f"; paused {walk.paused:.1f} s" if walk.paused else "",
    )  # fmt: skip
    return walk.changed_now


def _emit_backfill_by_key(
    table: str, key: str, batch_sql: str, batch_size: int, pending: str, key_type: str, label: str
) -> None:
    # The variables' names are ones no column has (PL/pgSQL refuses a name that could be either);
    # no % anywhere (see _emit_violation_guard). Each statement of a DO block takes its own snapshot.
    scan = (
        "SELECT array_agg(batch.{key} ORDER BY batch.{key}),"
        " array_agg(batch.{key} ORDER BY batch.{key}) FILTER (WHERE batch.backfill_pending)"
        " INTO backfill_batch, backfill_keys FROM ({query}) AS batch ({key}, backfill_pending);"
    )
    first, following = (
        scan.format(
            key=ident(key),
            query=_batch_scan(table, key, batch_size, pending, upper="backfill_upper", after=after),
        )
        for after in (None, "backfill_after")
    )
    lock = (
        f"SELECT array_agg(locked.{ident(key)}) INTO backfill_keys"
        f" FROM ({_batch_lock(table, key, 'backfill_keys')}) AS locked;"
    )
    with _autocommit(_context()):
        op.execute(
            "DO $backfill$\nDECLARE\n"
            f"    backfill_upper {key_type};\n    backfill_after {key_type};\n"
            f"    backfill_batch {key_type}[];\n    backfill_keys {key_type}[];\n"
            "    backfill_changed bigint;\n    backfill_touched bigint := 0;\nBEGIN\n"
            f"    SELECT {ident(key)} INTO backfill_upper FROM {ident(table)} ORDER BY {ident(key)} DESC LIMIT 1;\n"
            f"    {first}\n"
            "    WHILE backfill_batch IS NOT NULL LOOP\n"
            "        COMMIT;\n"
            "        IF backfill_keys IS NOT NULL THEN\n"
            f"            {lock}\n"
            f"{textwrap.indent(_KEYS.sub('backfill_keys', batch_sql.strip()), ' ' * 12)};\n"
            "            GET DIAGNOSTICS backfill_changed = ROW_COUNT;\n"
            "            backfill_touched := backfill_touched + backfill_changed;\n"
            "            COMMIT;\n"
            "        END IF;\n"
            "        backfill_after := backfill_batch[cardinality(backfill_batch)];\n"
            f"        {following}\n"
            "    END LOOP;\n"
            f"    RAISE NOTICE USING MESSAGE = {literal(label + ': ')} || backfill_touched || ' row(s) changed';\n"
            "END\n$backfill$"
        )


# --- refusing to run -------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """A rule a revision is about to enforce, and how to find the rows that already break it."""

    label: str
    table: str
    violation: str  # SQL condition, on the table aliased ``t``, true for a row that breaks the rule
    show: str = "t.*"  # what the listing query selects
    order: str = "1"

    @classmethod
    def check(cls, table: str, condition: str, show: Iterable[str] = ()) -> Rule:
        shown = ", ".join(f"t.{ident(c)}" for c in ("id", *show))
        return cls(f"{table}: {condition}", table, f"NOT ({condition})", shown)

    @classmethod
    def unique(cls, table: str, columns: Sequence[str]) -> Rule:
        cols = _columns(columns)
        tcols = ", ".join(f"t.{ident(c)}" for c in columns)
        return cls(
            f"{table}: unique ({', '.join(columns)})",
            table,
            f"({tcols}) IN (SELECT {cols} FROM {ident(table)} GROUP BY {cols} HAVING count(*) > 1)",
            f"t.{ident('id')}, {tcols}",
            ", ".join(str(n) for n in range(2, len(columns) + 2)),
        )

    @classmethod
    def references(cls, table: str, column: str, ref_table: str, ref_column: str = "id") -> Rule:
        return cls(
            f"{table}.{column} references {ref_table}",
            table,
            f"t.{ident(column)} IS NOT NULL AND NOT EXISTS "
            f"(SELECT 1 FROM {ident(ref_table)} AS r WHERE r.{ident(ref_column)} = t.{ident(column)})",
            f"t.{ident('id')}, t.{ident(column)}",
        )

    def list_sql(self) -> str:
        return f"SELECT {self.show} FROM {ident(self.table)} AS t WHERE {self.violation} ORDER BY {self.order}"

    def count_sql(self) -> str:
        return f"SELECT count(*) FROM {ident(self.table)} AS t WHERE {self.violation}"


def _count_violations(rules: Sequence[Rule]) -> list[tuple[Rule, int]]:
    """One scan per table: each rule is a FILTER of the same count."""
    found: list[tuple[Rule, int]] = []
    by_table: dict[str, list[Rule]] = {}
    for rule in rules:
        by_table.setdefault(rule.table, []).append(rule)
    for table, table_rules in by_table.items():
        filters = ", ".join(f"count(*) FILTER (WHERE {rule.violation})" for rule in table_rules)
        counts = _bind().execute(sa.text(f"SELECT {filters} FROM {ident(table)} AS t")).one()
        found += [(rule, int(n)) for rule, n in zip(table_rules, counts, strict=True) if n]
    return found


def refuse_violations(revision: str, rules: Sequence[Rule]) -> None:
    """Stop the revision, before it changes anything, if existing rows break rules it adds.

    A revision never changes or deletes rows to make a rule pass. The message (one line, so the
    CLI prints one ``FAILED:`` line and the service logs all of it) counts the rows per rule and
    gives a query that lists them. Offline, the same check is emitted as a DO block that raises.
    """
    _refuse_after_commit("ops.refuse_violations()")
    if _offline():
        _emit_violation_guard(revision, rules)
        return
    found = _count_violations(rules)
    if not found:
        return
    total = sum(n for _, n in found)
    details = "; ".join(f"{rule.label}: {n} row(s), list them with: {rule.list_sql()}" for rule, n in found)
    raise CommandError(
        f"revision {revision} changed nothing: {total} violation(s) of rules it adds. {details}. "
        "A revision never changes or deletes rows to make a rule pass: correct or remove these rows, "
        "then run the upgrade again."
    )


def _emit_violation_guard(revision: str, rules: Sequence[Rule]) -> None:
    # No % anywhere: offline SQL is compiled with a paramstyle that would double it. The variables'
    # names are ones no column has, as PL/pgSQL refuses a name that could be either.
    checks = "\n".join(
        f"    SELECT count(*) INTO guard_rows FROM {ident(rule.table)} AS t WHERE {rule.violation};\n"
        f"    IF guard_rows > 0 THEN\n"
        f"        guard_found := guard_found || {literal('; ' + rule.label + ': ')} || guard_rows || ' row(s)';\n"
        "    END IF;"
        for rule in rules
    )
    message = literal(f"revision {revision} changed nothing: rows break rules it adds")
    op.execute(
        "DO $guard$\nDECLARE\n    guard_rows bigint;\n    guard_found text := '';\nBEGIN\n"
        f"{checks}\n"
        f"    IF guard_found <> '' THEN\n        RAISE EXCEPTION USING MESSAGE = {message} || guard_found;\n"
        "    END IF;\nEND\n$guard$"
    )


def allow_data_loss() -> bool:
    """Whether the operator passed ``-x allow_data_loss=true``."""
    environment = _context().environment_context
    if environment is None:
        return False
    value = environment.get_x_argument(as_dictionary=True).get("allow_data_loss", "")
    return str(value).strip().lower() == "true"


def refuse_data_loss(
    revision: str, tables: Sequence[str] = (), columns: Mapping[str, Sequence[str]] | None = None
) -> None:
    """Stop a downgrade that would drop tables holding rows (or columns holding values), unless the
    operator passed ``-x allow_data_loss=true``. The message says how much would be lost."""
    columns = columns or {}
    _refuse_after_commit("ops.refuse_data_loss()")
    _step().cleared.update(tables)  # a drop_table() after this one need not count them again
    if allow_data_loss():
        logger.warning("downgrade of %s may drop data: -x allow_data_loss=true was given", revision)
        return
    if _offline():
        _emit_data_loss_guard(revision, tables, columns)
        return
    losses: list[str] = []
    rows = values = 0
    for table in tables:
        if _rows("SELECT to_regclass(:t)", t=ident(table))[0][0] is None:
            continue
        n = int(_rows(f"SELECT count(*) FROM {ident(table)}")[0][0])
        if n:
            losses.append(f"{table} ({n} row(s))")
            rows += n
    for table, names in columns.items():
        for column in names:
            n = int(_rows(f"SELECT count({ident(column)}) FROM {ident(table)}")[0][0])
            if n:
                losses.append(f"{table}.{column} ({n} value(s))")
                values += n
    if losses:
        lost = " and ".join(part for part in (rows and f"{rows} row(s)", values and f"{values} value(s)") if part)
        raise CommandError(
            f"downgrade of {revision} would drop {', '.join(losses)}: {lost} would be lost, "
            f"so {revision} was not reverted (revisions after it were). Back up what you need, "
            f"then run it again with {DATA_LOSS_FLAG} before the command "
            f"(uv run alembic {DATA_LOSS_FLAG} downgrade ...)"
        )


def _emit_data_loss_guard(revision: str, tables: Sequence[str], columns: Mapping[str, Sequence[str]]) -> None:
    checks = [f"EXISTS (SELECT 1 FROM {ident(t)})" for t in tables]
    checks += [
        f"EXISTS (SELECT 1 FROM {ident(table)} WHERE {ident(c)} IS NOT NULL)"
        for table, names in columns.items()
        for c in names
    ]
    if not checks:
        return
    conditions = "\n        OR ".join(f"({c})" for c in checks)
    message = f"downgrade of {revision} would drop data; to drop it, generate the SQL with {DATA_LOSS_FLAG}"
    op.execute(
        f"DO $guard$\nBEGIN\n    IF {conditions} THEN\n"
        f"        RAISE EXCEPTION USING MESSAGE = {literal(message)};\n    END IF;\nEND\n$guard$"
    )


# --- column types ----------------------------------------------------------------------------

# While a type changes by expand/contract, the column's copy in the other type lives beside it
# under the column's name with one of these suffixes (its indexes likewise): ``<column>__new``
# from the expand to the swap, ``<column>__old`` from the swap to the contract.
NEW_SUFFIX = "__new"
OLD_SUFFIX = "__old"
_TIMESTAMPS = {"timestamp without time zone", "timestamp with time zone"}
_INDEX_DEFINITION = re.compile(r"^CREATE (?P<unique>UNIQUE )?INDEX (?P<name>\S+) ON (?P<table>.+?) (?P<rest>USING .*)$")
_QUOTED = re.compile(r"('(?:[^']|'')*')")


def _suffixed(name: str, suffix: str) -> str:
    # PostgreSQL names have 63 bytes: the suffix survives a long name.
    return name[: 63 - len(suffix)] + suffix


def helper_owned(name: str | None) -> bool:
    """A column or index that a type change keeps beside the model's (``<name>__new``,
    ``<name>__old``): autogenerate and ``alembic check`` leave them alone."""
    return name is not None and name.endswith((NEW_SUFFIX, OLD_SUFFIX))


def _timestamp_kind(type_: str) -> str | None:
    """``type_`` as PostgreSQL names a timestamp type (precision dropped), or None."""
    spelled = re.sub(r"\s*\(\s*\d+\s*\)", "", type_.strip().lower())
    spelled = re.sub(r"\s+", " ", spelled)
    return {
        "timestamp": "timestamp without time zone",
        "timestamp without time zone": "timestamp without time zone",
        "timestamptz": "timestamp with time zone",
        "timestamp with time zone": "timestamp with time zone",
    }.get(spelled)


def _renamed_in(definition: str, column: str, target: str) -> str:
    """``definition`` (SQL) with every reference to the column ``column`` made one to ``target``:
    the name alone or quoted, not in a string literal, nor a type after ``::`` or a function's name."""
    bare = (
        re.compile(rf'(?<![\w$".:]){re.escape(column)}(?![\w$"(])')
        if re.fullmatch(r"[a-z_][a-z0-9_$]*", column)
        else None
    )
    parts = _QUOTED.split(definition)
    for i in range(0, len(parts), 2):  # the odd ones are literals
        parts[i] = parts[i].replace(ident(column), ident(target))
        if bare is not None:
            parts[i] = bare.sub(ident(target), parts[i])
    return "".join(parts)


def _unquoted(name: str) -> str:
    return name[1:-1].replace('""', '"') if name.startswith('"') else name


@dataclass(frozen=True)
class _Index:
    """An index on the column, as ``pg_get_indexdef`` prints it."""

    name: str
    definition: str

    @classmethod
    def parse(cls, definition: str) -> _Index:
        found = _INDEX_DEFINITION.match(definition.strip())
        if found is None:
            raise ValueError(f"not an index definition as pg_get_indexdef prints it: {definition!r}")
        return cls(_unquoted(found["name"]), definition.strip())

    def on(self, column: str, target: str, suffix: str) -> tuple[str, str]:
        """This index's copy on ``target`` instead of ``column``: its name and the statement that
        builds it concurrently (the same method, keys, expressions, INCLUDE list, predicate and
        uniqueness)."""
        found = _INDEX_DEFINITION.match(self.definition)
        assert found is not None
        name = _suffixed(self.name, suffix)
        ddl = (
            f"CREATE {found['unique'] or ''}INDEX CONCURRENTLY IF NOT EXISTS {ident(name)} ON {found['table']} "
            f"{_renamed_in(found['rest'], column, target)}"
        )
        return name, ddl


_COLUMN_QUERY = sa.text(
    "SELECT a.attnum, format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(d.adbin, d.adrelid),"
    " a.attgenerated <> '' OR a.attidentity <> '',"
    " array(SELECT c.conname::text FROM pg_constraint AS c WHERE c.conrelid = a.attrelid"
    "       AND a.attnum = ANY(c.conkey) AND c.contype <> 'n' ORDER BY c.conname)"
    " FROM pg_attribute AS a LEFT JOIN pg_attrdef AS d ON d.adrelid = a.attrelid AND d.adnum = a.attnum"
    " WHERE a.attrelid = to_regclass(:table) AND a.attname = :column AND a.attnum > 0 AND NOT a.attisdropped"
)


def _type_change_refusal(where: str, generated: bool, constraints: Sequence[str]) -> str | None:
    """Why ColumnTypeChange does not change the type of column ``where`` (None: it does)."""
    if generated:
        return f"{where} is a generated or identity column; its type is not changed here"
    if constraints:
        return (
            f"{where} is part of constraint(s) {', '.join(constraints)}: ColumnTypeChange copies indexes, NOT NULL "
            "and the default, not constraints. For a unique constraint, build a unique index on the same columns "
            "concurrently in a revision before (ops.create_index_concurrently(..., unique=True)) and drop the "
            "constraint there: the change then copies the index; otherwise drop the constraint first, or change "
            "the type another way"
        )
    return None


def type_change_refusal(connection: sa.Connection, table: str, column: str) -> str | None:
    """Why ColumnTypeChange would refuse to change ``table.column``'s type (None: it would not, or
    there is no such column): what autogenerate asks before it writes a type change."""
    row = connection.execute(_COLUMN_QUERY, {"table": ident(table), "column": column}).first()
    return None if row is None else _type_change_refusal(f"{table}.{column}", row[4], row[5])


# The indexes that use the column: as a key, in INCLUDE, in an expression or in the predicate.
_COLUMN_INDEXES = sa.text(
    "SELECT c.relname::text, pg_get_indexdef(i.indexrelid), i.indisvalid AND i.indisready"
    " FROM pg_index AS i JOIN pg_class AS c ON c.oid = i.indexrelid"
    " WHERE i.indrelid = to_regclass(:table) AND (:attnum = ANY(i.indkey::int2[]) OR EXISTS ("
    "   SELECT FROM pg_depend AS d WHERE d.classid = 'pg_class'::regclass AND d.objid = i.indexrelid"
    "   AND d.refclassid = 'pg_class'::regclass AND d.refobjid = i.indrelid AND d.refobjsubid = :attnum))"
    " ORDER BY c.relname"
)
# A probe's table: its relation's and its indexes' files, to tell what an ALTER rewrote or rebuilt.
_FILES = sa.text(
    "SELECT c.relname::text, pg_relation_filenode(c.oid)::text FROM pg_class AS c"
    " WHERE c.oid = CAST(:probe AS regclass) OR c.oid IN (SELECT indexrelid FROM pg_index"
    " WHERE indrelid = CAST(:probe AS regclass)) ORDER BY 1"
)


@dataclass(frozen=True)
class _Column:
    attnum: int
    type: str
    not_null: bool
    default: str | None
    indexes: tuple[tuple[str, str, bool], ...]  # (name, pg_get_indexdef, valid)


@dataclass(frozen=True)
class ColumnTypeChange:
    """A column's type changed without a lock that stops the service, in three steps, one per
    revision and deploy phase, each with its downgrade:

    - ``expand()`` (pre-deploy): a copy of the column in the new type (``<column>__new``), kept
      equal to it by a trigger on every write, filled on the rows already there by
      ``backfill_by_key``, indexed like the column (each index rebuilt concurrently from its
      definition, the column swapped for the copy), NOT NULL like it (through a validated CHECK);
    - ``swap()`` (post-deploy): in one short transaction under ``lock_timeout``, the copy takes the
      column's name, default and index names, the old column becomes ``<column>__old``, and the
      trigger now keeps that one equal to the new column, for a rollback until the contract;
    - ``contract()`` (post-deploy, in a later release than the swap): the trigger and the old
      column (with its indexes) dropped.

    ``undo_contract()``, ``undo_swap()`` and ``undo_expand()`` walk back, keeping every value
    (undo_contract builds the old column again the way expand built the new one). Each takes the
    column back from wherever it stands: a revision that changes several columns commits after
    each, so one that stopped part-way is not recorded, and the downgrade that runs next is the
    step's before it (undo_expand finds a column swapped, undo_swap one contracted). Online only:
    ``--sql`` cannot look, so its downgrade SQL is for the state the version table records.

    Online the plan comes from PostgreSQL itself: the conversion is tried on an empty copy of the
    table (``LIKE ... INCLUDING INDEXES``, a temporary table) and, when that rewrote neither the
    table nor an index, the change is made in place by the swap (one ``ALTER ... TYPE ... USING``,
    a catalog change), and expand and contract do nothing. Offline (``--sql``) nothing can be
    asked, so the SQL is always expand/contract's, which suits every conversion. Apply a change's
    steps all online or all from ``--sql``.

    ``using`` converts the old value (``{column}`` in it) to the new type, ``reverse`` the new to
    the old; by default an assignment (PostgreSQL's assignment cast: a value that does not fit
    fails rather than being cut). Between ``timestamp`` and ``timestamptz`` both default to
    ``{column} AT TIME ZONE 'UTC'`` and must name a zone: the session's zone must never decide
    what a stored instant means.

    The rest describes the column as it is before the change, for the offline SQL: ``not_null``,
    ``default`` (SQL), ``indexes`` (each index that uses the column, as ``pg_get_indexdef`` prints
    it). Online the catalog decides: a NOT NULL, default or set of index names that differs from
    the declaration is refused by ``expand`` before anything changes, with what the catalog says;
    an index whose definition reads differently (another server version) is built from the
    catalog's, with a warning. ``key``/``key_type``: the table's unique key that the backfill walks.

    Not handled (refused, or failed by PostgreSQL): a column in a constraint (primary key, foreign
    key, unique constraint, check), a generated or identity column, and an expression index whose
    expression is not immutable for the new type (``date_trunc`` of a ``timestamptz``).
    """

    table: str
    column: str
    old_type: str
    new_type: str
    not_null: bool = False
    default: str | None = None
    indexes: Sequence[str] = ()
    using: str | None = None
    reverse: str | None = None
    key: str = "id"
    key_type: str = "uuid"

    def __post_init__(self) -> None:
        kinds = {_timestamp_kind(self.old_type), _timestamp_kind(self.new_type)}
        for name, given in (("using", self.using), ("reverse", self.reverse)):
            if given is not None and "{column}" not in given:
                raise ValueError(f"{self.table}.{self.column}: {name} must use the old value as {{column}}")
            if kinds == _TIMESTAMPS and given is not None and "at time zone" not in given.lower():
                raise ValueError(
                    f"{self.table}.{self.column}: {name} converts between timestamp and timestamptz, so it must name "
                    f"the zone ({{column}} AT TIME ZONE 'UTC'): a bare cast takes the session's zone"
                )
        for definition in self.indexes:
            _Index.parse(definition)

    # --- the pieces ------------------------------------------------------------------------

    def _expression(self, forward: bool) -> str:
        given = self.using if forward else self.reverse
        if given is None:
            given = (
                "{column} AT TIME ZONE 'UTC'"
                if {_timestamp_kind(self.old_type), _timestamp_kind(self.new_type)} == _TIMESTAMPS
                else "{column}"
            )
        return given

    def _of(self, forward: bool, column: str) -> str:
        """The conversion (forward: old type to new) of the value of ``column`` (SQL)."""
        return self._expression(forward).replace("{column}", column)

    def _name(self, suffix: str) -> str:
        return _suffixed(self.column, suffix)

    def _sync_name(self) -> str:
        return _suffixed(f"{self.table}_{self.column}", "__sync")

    def _check_name(self, target: str) -> str:
        return _suffixed(f"{self.table}_{target}", "_not_null")

    def _label(self, target: str) -> str:
        return f"{self.table}.{target} from {self.column}"

    def _column(self, name: str, *, itself: bool = False) -> _Column | None:
        """The column ``name`` of the table, or None; ``itself``: the column whose type changes,
        refused when its type cannot change this way."""
        row = _bind().execute(_COLUMN_QUERY, {"table": ident(self.table), "column": name}).first()
        if row is None:
            return None
        attnum, type_, not_null, default, generated, constraints = row
        refusal = _type_change_refusal(f"{self.table}.{name}", generated, constraints)
        if itself and refusal is not None:
            raise CommandError(refusal)
        found = _bind().execute(_COLUMN_INDEXES, {"table": ident(self.table), "attnum": attnum}).all()
        return _Column(attnum, type_, bool(not_null), default, tuple((n, d, bool(v)) for n, d, v in found))

    def _types(self) -> tuple[str, str]:
        """The old and the new type as PostgreSQL spells them (format_type)."""
        probe = "kraken_type_change_types"
        _bind().execute(sa.text(f"CREATE TEMP TABLE {probe} (old {self.old_type}, new {self.new_type}) ON COMMIT DROP"))
        spelled = _bind().execute(
            sa.text(
                "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
                " WHERE attrelid = CAST(:probe AS regclass) AND attnum > 0 ORDER BY attnum"
            ),
            {"probe": probe},
        )
        old, new = spelled.scalars().all()
        commit()
        return old, new

    def _alter_in_place(self, forward: bool, table: str) -> str:
        """The in-place change of the column's type on ``table`` (SQL): what the probe tries and the swap runs."""
        target_type = self.new_type if forward else self.old_type
        return (
            f"ALTER TABLE {table} ALTER COLUMN {ident(self.column)} TYPE {target_type}"
            f" USING {self._of(forward, ident(self.column))}"
        )

    def _in_place(self, forward: bool) -> bool:
        """Would ``ALTER ... TYPE`` rewrite neither the table nor an index? Asked of PostgreSQL on an
        empty temporary copy of the table (its columns and indexes), in this session's time zone."""
        target_type = self.new_type if forward else self.old_type
        domain = _bind().execute(
            sa.text(f"SELECT typtype = 'd' FROM pg_type WHERE oid = CAST({literal(target_type)} AS regtype)")
        )
        if domain.scalar_one():
            return False  # its constraints are checked on every row, which an empty copy does not show
        probe = "kraken_type_change_probe"
        _bind().execute(
            sa.text(f"CREATE TEMP TABLE {probe} (LIKE {ident(self.table)} INCLUDING INDEXES) ON COMMIT DROP")
        )
        before = _bind().execute(_FILES, {"probe": probe}).all()
        try:
            with _bind().begin_nested():
                _bind().execute(sa.text(self._alter_in_place(forward, probe)))
                after = _bind().execute(_FILES, {"probe": probe}).all()
        except DBAPIError as exc:
            logger.info("%s.%s: not in place (%s)", self.table, self.column, str(exc.orig).splitlines()[0])
            after = []
        commit()
        return after == before

    def _state(self) -> tuple[str, _Column]:
        """Where the change stands: ``before``, ``expanded`` (the copy exists), ``swapped`` (the old
        column is beside the new one) or ``done``; and the column as it is."""
        found = self._column(self.column, itself=True)
        if found is None:
            raise CommandError(f"there is no column {self.column} on {self.table}")
        old, new = self._types()
        if old == new:
            raise CommandError(f"{self.table}.{self.column}: old_type and new_type are both {old}")
        if found.type == new:
            return ("swapped" if self._column(self._name(OLD_SUFFIX)) is not None else "done"), found
        if found.type != old:
            raise CommandError(
                f"{self.table}.{self.column} is {found.type}, neither {old} (old_type) nor {new} (new_type)"
            )
        return ("expanded" if self._column(self._name(NEW_SUFFIX)) is not None else "before"), found

    def _declared(self, found: _Column) -> None:
        """Refuse a declaration the catalog contradicts, before anything changes."""
        names = sorted(_Index.parse(d).name for d in self.indexes)
        problems = []
        if found.not_null != self.not_null:
            problems.append(f"not_null={found.not_null}")
        if found.default != self.default:
            problems.append(f"default={found.default!r}")
        if [name for name, _, _ in found.indexes] != names:
            problems.append(f"indexes={[definition for _, definition, _ in found.indexes]!r}")
        if problems:
            raise CommandError(
                f"{self.table}.{self.column} is not as the revision declares it (its offline SQL would do something "
                f"else); the catalog says: {', '.join(problems)}. Declare that; nothing was changed"
            )
        for (name, definition, _), declared in zip(
            found.indexes, sorted(self.indexes, key=lambda d: _Index.parse(d).name), strict=True
        ):
            if definition != declared.strip():
                logger.warning(
                    "%s: index %s is %s here, declared as %s (the offline SQL builds that)",
                    self.table,
                    name,
                    definition,
                    declared,
                )

    def _sync(self, target: str, forward: bool) -> None:
        """The trigger that sets ``target`` from the column on every insert and update."""
        name = self._sync_name()
        op.execute(
            f"CREATE OR REPLACE FUNCTION {ident(name)}() RETURNS trigger LANGUAGE plpgsql AS $sync$\nBEGIN\n"
            f"    NEW.{ident(target)} := {self._of(forward, 'NEW.' + ident(self.column))};\n"
            "    RETURN NEW;\nEND\n$sync$"
        )

    def _copy(
        self, target: str, target_type: str, forward: bool, indexes: Sequence[_Index], not_null: bool, suffix: str
    ) -> None:
        """The column's copy in ``target``: added, kept in sync, filled, indexed, made NOT NULL."""
        table = ident(self.table)
        if not _offline():
            existing = self._column(target)
            if existing is not None and existing.type != (self._types()[1 if forward else 0]):
                raise CommandError(f"{self.table}.{target} exists as {existing.type}; drop it or rename it first")
        if not forward:
            rules = ["prefer-timestamp-tz", "prefer-text-field", "prefer-bigint-over-int"]
            _static(squawk_ignore(rules, "the way back: the column's type as it was before the change"))
        op.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {ident(target)} {target_type}")
        commit()
        self._sync(target, forward)
        op.execute(
            f"CREATE OR REPLACE TRIGGER {ident(self._sync_name())} BEFORE INSERT OR UPDATE ON {table}"
            f" FOR EACH ROW EXECUTE FUNCTION {ident(self._sync_name())}()"
        )
        commit()
        value = self._of(forward, ident(self.column))
        differs = f"{ident(target)} IS DISTINCT FROM {value}"
        backfill_by_key(
            self.table,
            self.key,
            f"UPDATE {table} SET {ident(target)} = {value}"
            f" WHERE {ident(self.key)} = ANY(CAST(:keys AS {self.key_type}[])) AND {differs}",
            pending=differs,
            key_type=self.key_type,
            label=self._label(target),
        )
        for index in indexes:
            name, ddl = index.on(self.column, target, suffix)
            _build_index(name, ddl, self._on_this_table, f"{self.table} has rows with the same values")
        # Statistics for the copy, so that queries on it are planned well from the swap on.
        op.execute(f"ANALYZE {table} ({ident(target)})")
        commit()
        if not not_null:
            return
        check = self._check_name(target)
        if not _offline():
            copy = self._column(target)
            if copy is not None and copy.not_null:
                drop_constraint(check, self.table)
                return
        add_check_not_valid(check, self.table, f"{ident(target)} IS NOT NULL")
        validate_constraint(check, self.table)
        # PostgreSQL proves NOT NULL from the validated check: no scan under the ACCESS EXCLUSIVE lock.
        op.execute(f"ALTER TABLE {table} ALTER COLUMN {ident(target)} SET NOT NULL")
        _static(squawk_ignore(["ban-drop-constraint"], "NOT NULL now guarantees what the check did"))
        op.execute(f"ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {ident(check)}")
        commit()

    def _on_this_table(self, found: IndexInfo) -> bool:
        if found.table != self.table:
            raise CommandError(f"the name of a copy's index on {self.table} is taken by an index on {found.table}")
        return True

    def _drop_copy(self, target: str, index_names: Sequence[str]) -> None:
        """The trigger and the copy ``target`` (its indexes first, concurrently) dropped."""
        for name in index_names:
            drop_index_concurrently(name)
        table = ident(self.table)
        if not _offline():
            left = _bind().execute(
                sa.text("SELECT to_regprocedure(:sync) IS NOT NULL"), {"sync": ident(self._sync_name()) + "()"}
            )
            if not left.scalar_one() and self._column(target) is None:
                return  # done already: take no lock for nothing
        op.execute(f"DROP TRIGGER IF EXISTS {ident(self._sync_name())} ON {table}")
        _static(squawk_ignore(["ban-drop-function"], "the type change's trigger function, which nothing else calls"))
        op.execute(f"DROP FUNCTION IF EXISTS {ident(self._sync_name())}()")
        _static(squawk_ignore(["ban-drop-column"], "a copy of the column in the other type: nothing is lost"))
        op.execute(f"ALTER TABLE {table} DROP COLUMN IF EXISTS {ident(target)}")
        commit()

    def _swap(self, out: str, in_: str, forward: bool, default: str | None, index_names: Sequence[str]) -> None:
        """In one transaction: the column becomes ``<column><out>``, ``<column><in_>`` becomes the
        column (with its default and its indexes' names), and the trigger keeps the one that left
        equal to it (``forward``: converting new to old)."""
        table = ident(self.table)
        leaving, coming = self._name(out), self._name(in_)
        # The one lock the swap needs, taken first and waited for within lock_timeout; the runner
        # retries the revision when it runs out. Every statement after it is a catalog change.
        op.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        # The previous release no longer serves (post-deploy), and the new one reads both types.
        swapping = "the swap of a type change (post-deploy): the copy takes the column's name"
        _static(squawk_ignore(["renaming-column"], swapping))
        op.execute(f"ALTER TABLE {table} RENAME COLUMN {ident(self.column)} TO {ident(leaving)}")
        _static(squawk_ignore(["renaming-column"], swapping))
        op.execute(f"ALTER TABLE {table} RENAME COLUMN {ident(coming)} TO {ident(self.column)}")
        if default is not None:
            _static(squawk_ignore(["ban-drop-default"], "the default moves to the column that takes the name"))
            op.execute(
                f"ALTER TABLE {table} ALTER COLUMN {ident(leaving)} DROP DEFAULT,"
                f" ALTER COLUMN {ident(self.column)} SET DEFAULT {default}"
            )
        for name in index_names:
            # Each index name goes with the column name: the same index, on the column of that name.
            _static(squawk_ignore(["renaming-object"], swapping))
            op.execute(f"ALTER INDEX {ident(name)} RENAME TO {ident(_suffixed(name, out))}")
            _static(squawk_ignore(["renaming-object"], swapping))
            op.execute(f"ALTER INDEX {ident(_suffixed(name, in_))} RENAME TO {ident(name)}")
        self._sync(leaving, not forward)
        commit()

    def _declared_indexes(self) -> list[_Index]:
        return sorted((_Index.parse(d) for d in self.indexes), key=lambda i: i.name)

    def _indexes(self, found: _Column | None) -> list[_Index]:
        if found is None:
            return self._declared_indexes()
        return [_Index(name, definition) for name, definition, _ in found.indexes]

    def _ready(self, copy_suffix: str, found: _Column) -> None:
        """Refuse to swap onto a copy that is not complete: every index copied and valid, NOT NULL."""
        name = self._name(copy_suffix)
        copy = self._column(name)
        assert copy is not None
        lacking = [
            f"index {_suffixed(index, copy_suffix)}"
            for index, _, _ in found.indexes
            if not getattr(index_info(_suffixed(index, copy_suffix)), "valid", False)
        ]
        if found.not_null and not copy.not_null:
            lacking.append("NOT NULL")
        if lacking:
            raise CommandError(
                f"{self.table}.{name} lacks {', '.join(lacking)}: the step that builds it did not finish; run that "
                "step again (the expand's upgrade, or the contract's downgrade on the way back), then this one"
            )

    # --- the steps ---------------------------------------------------------------------------

    def expand(self) -> None:
        """Pre-deploy: the column's copy in the new type, in sync, filled, indexed."""
        if _offline():
            self._copy(self._name(NEW_SUFFIX), self.new_type, True, self._declared_indexes(), self.not_null, NEW_SUFFIX)
            return
        state, found = self._state()
        if state in ("swapped", "done"):
            return
        if state == "before":
            self._declared(found)
            if self._in_place(forward=True):
                logger.info(
                    "%s.%s: PostgreSQL changes it to %s in place (no rewrite, no index rebuilt): the swap step"
                    " alone changes it",
                    self.table,
                    self.column,
                    self.new_type,
                )
                return
        self._copy(self._name(NEW_SUFFIX), self.new_type, True, self._indexes(found), found.not_null, NEW_SUFFIX)

    def swap(self) -> None:
        """Post-deploy: the copy takes the column's place (or the type changes in place)."""
        if _offline():
            names = [i.name for i in self._declared_indexes()]
            self._swap(OLD_SUFFIX, NEW_SUFFIX, True, self.default, names)
            return
        state, found = self._state()
        if state in ("swapped", "done"):
            return
        if state == "before":
            if not self._in_place(forward=True):
                raise CommandError(
                    f"{self.table}.{self.column} has no copy in {self.new_type} to swap in, and PostgreSQL cannot "
                    "change it in place without a rewrite: its expand step has not run"
                )
            op.execute(self._alter_in_place(True, ident(self.table)))
            commit()
            return
        self._ready(NEW_SUFFIX, found)
        self._swap(OLD_SUFFIX, NEW_SUFFIX, True, found.default, [name for name, _, _ in found.indexes])

    def contract(self) -> None:
        """Post-deploy, a release after the swap: the old column and the trigger dropped."""
        if _offline():
            self._drop_copy(self._name(OLD_SUFFIX), [_suffixed(i.name, OLD_SUFFIX) for i in self._declared_indexes()])
            return
        state, found = self._state()
        if state in ("before", "expanded"):
            raise CommandError(
                f"{self.table}.{self.column} has not been swapped yet: its swap step runs before the contract"
            )
        self._drop_copy(self._name(OLD_SUFFIX), [_suffixed(name, OLD_SUFFIX) for name, _, _ in found.indexes])

    def undo_contract(self) -> None:
        """The old column built again beside the new one, in sync, as the swap left it."""
        if _offline():
            self._copy(
                self._name(OLD_SUFFIX), self.old_type, False, self._declared_indexes(), self.not_null, OLD_SUFFIX
            )
            return
        state, found = self._state()
        if state in ("before", "expanded"):
            return
        if state == "done" and self._in_place(forward=False):
            return
        self._copy(self._name(OLD_SUFFIX), self.old_type, False, self._indexes(found), found.not_null, OLD_SUFFIX)

    def undo_swap(self) -> None:
        """The old column back in its place (or the type changed back in place)."""
        if _offline():
            names = [i.name for i in self._declared_indexes()]
            self._swap(NEW_SUFFIX, OLD_SUFFIX, False, self.default, names)
            return
        state, found = self._state()
        if state in ("before", "expanded"):
            return
        if state == "done":
            if self._in_place(forward=False):
                op.execute(self._alter_in_place(False, ident(self.table)))
                commit()
                return
            # No old column beside it: the contract ran on this column though its revision is not
            # recorded (it stopped after this column), or the swap changed it in place and the way
            # back needs a rewrite. Either way the old column is built again first, as the
            # contract's downgrade would (a walk over the table).
            logger.info(
                "%s.%s: contracted already (or changed in place, with no way back in place); building the %s"
                " column again first",
                self.table,
                self.column,
                self.old_type,
            )
            self.undo_contract()
            state, found = self._state()
        self._ready(OLD_SUFFIX, found)
        self._swap(NEW_SUFFIX, OLD_SUFFIX, False, found.default, [name for name, _, _ in found.indexes])

    def undo_expand(self) -> None:
        """The copy and its trigger dropped (it held the column's values: nothing is lost)."""
        if _offline():
            self._drop_copy(self._name(NEW_SUFFIX), [_suffixed(i.name, NEW_SUFFIX) for i in self._declared_indexes()])
            return
        state, found = self._state()
        if state in ("swapped", "done"):
            # The swap's revision stopped after this column (a swap commits per column), so it is
            # not recorded and its downgrade does not run: the swap is undone here first.
            logger.info("%s.%s: swapped already; swapping it back first", self.table, self.column)
            self.undo_swap()
            state, found = self._state()
            if state == "before":  # the swap had changed it in place: there is no copy
                return
        self._drop_copy(self._name(NEW_SUFFIX), [_suffixed(name, NEW_SUFFIX) for name, _, _ in found.indexes])
