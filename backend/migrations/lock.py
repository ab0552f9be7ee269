"""The advisory lock that serializes every migration runner (service replicas and the CLI).

A session-level lock on a dedicated autocommit connection: it survives revisions that commit
or leave the transaction (``CREATE INDEX CONCURRENTLY``), never holds a snapshot that such an
index build would wait for, and disappears with the session if the runner is killed.

The code is synchronous so env.py can use it on any connection it is handed; inside
SQLAlchemy's asyncio greenlet the waits yield to the event loop instead of blocking it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.util.concurrency import await_, in_greenlet

from backend.db.errors import first_line, is_pooler_symptom
from backend.migrations.moments import when

logger = logging.getLogger(__name__)

# A fixed 64-bit key derived from the project's name, so no other application collides with it.
LOCK_KEY = int.from_bytes(hashlib.sha256(b"kraken-backend migrations").digest()[:8], "big", signed=True)


class MigrationLockTimeout(Exception):
    """Waited too long for another runner; the message names who holds the lock."""


class TransactionPooler(Exception):
    """The migration connections go through a transaction-pooling proxy: the lock would serialize nothing."""

    def __init__(self) -> None:
        super().__init__(
            "migrations need a direct connection to PostgreSQL, and theirs goes through a transaction-pooling "
            "proxy (PgBouncer pool_mode=transaction?): two of its sessions shared one server connection, so the "
            "migration lock would serialize nothing and its timeouts would not hold; point MIGRATIONS_DATABASE_URL "
            "at the server itself (DATABASE_URL may stay on the proxy)"
        )


def sleep(seconds: float) -> None:
    """Wait without blocking an event loop that drives this code through a greenlet."""
    if in_greenlet():
        await_(asyncio.sleep(seconds))
    else:
        time.sleep(seconds)


# The migration lock's row in pg_locks: advisory locks are per database, so a session holding the
# same key in another database on the server is no runner of ours and blocks nothing.
_THE_LOCK = (
    "l.locktype = 'advisory' AND l.granted"
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND l.classid = ((CAST(:key AS bigint) >> 32) & 4294967295)::oid"
    " AND l.objid = (CAST(:key AS bigint) & 4294967295)::oid AND l.objsubid = 1"
)


def holder(conn: Connection) -> str | None:
    """Who holds the migration lock in this database, for an operator (None: nobody).

    Its pid, application_name and client, since when (a session lock is taken when the session
    starts its run, so its connection time; and the transaction it is in, if any), and what it is
    doing (its state since when, and the start of its current or last query).
    """
    row = conn.execute(
        text(
            "SELECT a.pid, coalesce(a.application_name, ''), coalesce(host(a.client_addr), 'local socket'),"
            " a.backend_start, a.xact_start, coalesce(a.state, 'unknown'), a.state_change,"
            " left(regexp_replace(coalesce(a.query, ''), '\\s+', ' ', 'g'), 80)"
            " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            f" WHERE {_THE_LOCK} LIMIT 1"
        ),
        {"key": LOCK_KEY},
    ).first()
    if row is None:
        return None
    pid, app, client, connected, xact, state, state_since, query = row
    since = f"connected since {when(connected)}" + (f", in a transaction since {when(xact)}" if xact else "")
    doing = state + (f" since {when(state_since)}" if state_since else "") + (f": {query}" if query else "")
    return f"pid {pid} (application_name '{app or '-'}', {client}, {since}; {doing})"


class MigrationLockLost(Exception):
    """The lock's session died, or no longer holds the lock: another runner may take it."""

    def __init__(self, why: str) -> None:
        super().__init__(
            f"the migration lock was lost ({why}): nothing further ran; what was applied before stays, "
            "and the next run resumes from there"
        )


def confirm_held(conn: Connection) -> None:
    """Raise MigrationLockLost unless this session (the lock connection) still holds the lock."""
    try:
        mine = conn.execute(
            text(f"SELECT EXISTS (SELECT FROM pg_locks l WHERE {_THE_LOCK} AND l.pid = pg_backend_pid())"),
            {"key": LOCK_KEY},
        ).scalar_one()
    except SQLAlchemyError as exc:
        raise MigrationLockLost(f"its connection failed: {first_line(exc)}") from None
    if not mine:
        raise MigrationLockLost("its session no longer holds it")


def _keep_alive(conn: Connection) -> None:
    """The lock session sits idle through long steps: keep the server (and any middlebox on the way)
    from taking it for dead, which would release the lock silently."""
    # TCP keepalives from the server's side (ignored on a Unix socket): an idle flow stays open
    # through firewalls and NAT, and a runner that vanished is noticed within a minute or so.
    for statement in ("tcp_keepalives_idle = 30", "tcp_keepalives_interval = 10", "tcp_keepalives_count = 3"):
        conn.execute(text(f"SET {statement}"))
    if (conn.dialect.server_version_info or (0,)) >= (14,):
        conn.execute(text("SET idle_session_timeout = 0"))


def _release(conn: Connection) -> None:
    """Give the lock back; a failure is logged, never raised over the error that ended the run.
    (A session that is gone took its lock with it.)"""
    try:
        released = conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": LOCK_KEY}).scalar_one()
    except SQLAlchemyError as exc:
        logger.warning("could not release the migration lock (it goes with its session): %s", first_line(exc))
        return
    if not released:
        logger.warning("the migration lock was no longer held when the run ended (its session lost it)")


def _backend_pid(conn: Connection) -> int:
    return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def through_transaction_pooler(lock: Connection, work: Connection) -> bool:
    """Do these two client connections really have a server session each, for as long as they live?

    Connected directly, or through a session-pooling proxy, each keeps one server backend for life
    and no two share one. A transaction-pooling proxy lends a backend per transaction: ``lock``
    (autocommit) gives its backend back after each statement, and the transaction ``work`` then
    opens takes the most recently returned one (PgBouncer reuses them last-in, first-out), so
    ``work`` lands on ``lock``'s backend, and ``lock``'s next statement on another. A statement
    cache there fails on a prepared statement its backend does not have: that tells it too.
    """
    began = not work.in_transaction()
    try:
        first = _backend_pid(lock)
        working = _backend_pid(work)  # inside a transaction: pins work's backend until the rollback
        again = _backend_pid(lock)
    except DBAPIError as exc:
        if is_pooler_symptom(exc):
            return True
        raise
    finally:
        if began:
            work.rollback()
    return working == first or again != first


@contextmanager
def lock_session(engine: Engine, work: Connection | None = None) -> Iterator[Connection]:
    """An autocommit connection of its own, where the migration lock is taken or looked up.

    With ``work`` (the connection revisions run on), first make sure the two connections are not
    behind a transaction-pooling proxy, where a session lock means nothing.
    """
    with engine.connect() as raw:
        conn = raw.execution_options(isolation_level="AUTOCOMMIT")
        if work is not None and through_transaction_pooler(conn, work):
            raise TransactionPooler()
        yield conn


@contextmanager
def holding(
    conn: Connection, timeout: float, *, on_acquired: Callable[[float], None] | None = None
) -> Iterator[Connection]:
    """Hold the migration lock on ``conn`` (a ``lock_session``) for the block, polling
    pg_try_advisory_lock for up to ``timeout`` s. ``on_acquired`` is told how many seconds the
    polling waited for another runner.

    Yields ``conn``: what is written on it (the ledger's record of a step that failed) survives
    the rollback of the work connection's transaction, and ``confirm_held`` on it tells whether
    the lock is still this run's.
    """
    _keep_alive(conn)
    started = time.monotonic()
    deadline = started + timeout
    wait = 0.05
    while not conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": LOCK_KEY}).scalar_one():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise MigrationLockTimeout(
                f"gave up after {timeout:g} s waiting for the migration lock, held by "
                + (holder(conn) or "a session that has gone meanwhile (it is free now: run again)")
            )
        sleep(min(wait, remaining))
        wait = min(wait * 2, 1.0)
    if on_acquired is not None:
        on_acquired(time.monotonic() - started)
    lost = False
    try:
        yield conn
    except MigrationLockLost:
        lost = True  # nothing left to give back
        raise
    finally:
        if not lost:
            _release(conn)


@contextmanager
def migration_lock(
    engine: Engine,
    timeout: float,
    *,
    work: Connection | None = None,
    on_acquired: Callable[[float], None] | None = None,
) -> Iterator[Connection]:
    """``holding`` the lock on a ``lock_session`` of its own (``work``: see there)."""
    with lock_session(engine, work) as conn, holding(conn, timeout, on_acquired=on_acquired):
        yield conn
