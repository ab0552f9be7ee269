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
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.util.concurrency import await_, in_greenlet

from backend.db.errors import is_pooler_symptom

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


def _holder(conn: Connection) -> str:
    row = conn.execute(
        text(
            "SELECT a.pid, coalesce(a.application_name, ''), a.backend_start, a.state,"
            " coalesce(a.client_addr::text, 'local socket')"
            " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted"
            " AND l.classid = ((CAST(:key AS bigint) >> 32) & 4294967295)::oid"
            " AND l.objid = (CAST(:key AS bigint) & 4294967295)::oid AND l.objsubid = 1"
            " LIMIT 1"
        ),
        {"key": LOCK_KEY},
    ).first()
    if row is None:
        return "a session that has since gone"
    pid, app, since, state, client = row
    return (
        f"pid {pid} (application_name '{app or '-'}', {client}, connected since {since:%Y-%m-%d %H:%M:%S%z}, {state})"
    )


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
def migration_lock(
    engine: Engine,
    timeout: float,
    *,
    work: Connection | None = None,
    on_acquired: Callable[[float], None] | None = None,
) -> Iterator[Connection]:
    """Hold the migration lock for the block, polling pg_try_advisory_lock for up to ``timeout`` s.

    With ``work`` (the connection revisions run on), first make sure the two connections are not
    behind a transaction-pooling proxy, where a session lock means nothing. ``on_acquired`` is
    told how many seconds the polling waited for another runner.

    Yields the lock's autocommit connection: what is written on it (the ledger's record of a step
    that failed) survives the rollback of the work connection's transaction.
    """
    with engine.connect() as raw:
        conn = raw.execution_options(isolation_level="AUTOCOMMIT")
        if work is not None and through_transaction_pooler(conn, work):
            raise TransactionPooler()
        started = time.monotonic()
        deadline = started + timeout
        wait = 0.05
        while not conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": LOCK_KEY}).scalar_one():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MigrationLockTimeout(
                    f"gave up after {timeout:g} s waiting for the migration lock, held by {_holder(conn)}"
                )
            sleep(min(wait, remaining))
            wait = min(wait * 2, 1.0)
        if on_acquired is not None:
            on_acquired(time.monotonic() - started)
        try:
            yield conn
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": LOCK_KEY})
