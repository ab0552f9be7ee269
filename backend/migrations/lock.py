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
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine, text
from sqlalchemy.util.concurrency import await_, in_greenlet

# A fixed 64-bit key derived from the project's name, so no other application collides with it.
LOCK_KEY = int.from_bytes(hashlib.sha256(b"kraken-backend migrations").digest()[:8], "big", signed=True)


class MigrationLockTimeout(Exception):
    """Waited too long for another runner; the message names who holds the lock."""


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


@contextmanager
def migration_lock(engine: Engine, timeout: float) -> Iterator[Connection]:
    """Hold the migration lock for the block, polling pg_try_advisory_lock for up to ``timeout`` s.

    Yields the lock's autocommit connection: what is written on it (the ledger's record of a step
    that failed) survives the rollback of the work connection's transaction.
    """
    with engine.connect() as raw:
        conn = raw.execution_options(isolation_level="AUTOCOMMIT")
        deadline = time.monotonic() + timeout
        wait = 0.05
        while not conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": LOCK_KEY}).scalar_one():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MigrationLockTimeout(
                    f"gave up after {timeout:g} s waiting for the migration lock, held by {_holder(conn)}"
                )
            sleep(min(wait, remaining))
            wait = min(wait * 2, 1.0)
        try:
            yield conn
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": LOCK_KEY})
