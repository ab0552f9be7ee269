"""One-line descriptions of database connection failures, and which of them are worth a retry."""

from __future__ import annotations

import socket

import asyncpg
from sqlalchemy.exc import DBAPIError

from backend.db.url import DatabaseTarget

# Errors that say the configuration is wrong: waiting will not fix them.
_FATAL = (
    asyncpg.InvalidCatalogNameError,
    asyncpg.InvalidPasswordError,
    asyncpg.InvalidAuthorizationSpecificationError,
)
# The server exists but is not accepting connections yet (starting up, shutting down, full).
_TRANSIENT = (
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.ConnectionDoesNotExistError,
)


def _root(exc: BaseException) -> BaseException:
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        orig: BaseException = exc.orig
        # SQLAlchemy's asyncpg adapter keeps asyncpg's own exception as the cause.
        return orig.__cause__ or orig
    return exc


def sqlstate(exc: BaseException) -> str | None:
    """PostgreSQL's error code (e.g. 55P03) of a database error, however it is wrapped."""
    code = getattr(_root(exc), "sqlstate", None)
    return code if isinstance(code, str) else None


def first_line(exc: BaseException) -> str:
    """The server's message without SQLAlchemy's statement dump and background link."""
    root = _root(exc)
    text = str(getattr(root, "message", None) or root)
    return text.splitlines()[0] if text else type(root).__name__


def is_connection_error(exc: BaseException) -> bool:
    root = _root(exc)
    return isinstance(root, (OSError, TimeoutError, *_FATAL, *_TRANSIENT)) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    )


def is_retriable(exc: BaseException) -> bool:
    """True for failures a database that is still starting would cause."""
    root = _root(exc)
    return isinstance(root, (OSError, TimeoutError, *_TRANSIENT)) and not isinstance(root, socket.gaierror)


def describe(exc: BaseException, target: DatabaseTarget) -> str:
    """What went wrong, in one line, naming the server but never the password."""
    root = _root(exc)
    where = target.safe
    if isinstance(root, socket.gaierror):
        return f"cannot resolve the database host in {where}"
    if isinstance(root, ConnectionRefusedError):
        return f"connection refused by {where} (is PostgreSQL running there?)"
    if isinstance(root, TimeoutError):
        return f"timed out connecting to {where}"
    if isinstance(root, FileNotFoundError):
        return f"no PostgreSQL socket at {where}"
    if isinstance(root, asyncpg.PostgresError):
        return f"{first_line(root)} ({where})"
    if isinstance(root, OSError):
        return f"cannot connect to {where}: {root.strerror or type(root).__name__}"
    return f"{type(root).__name__}: {str(root).splitlines()[0] if str(root) else ''} ({where})"
