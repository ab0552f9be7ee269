"""Database failures: one-line descriptions, which are worth a retry, and which a request may meet
as an expected fault (the server is away, busy or slow) rather than a bug."""

from __future__ import annotations

import socket
import ssl
from typing import Literal

import asyncpg
from sqlalchemy.exc import DBAPIError

from backend.db.pool import PoolBusy
from backend.db.url import DatabaseTarget

# Errors that say the configuration is wrong: waiting will not fix them.
_FATAL = (
    asyncpg.InvalidCatalogNameError,
    asyncpg.InvalidPasswordError,
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.ClientConfigurationError,  # a certificate or password file asyncpg cannot use
    ssl.SSLError,  # the server's certificate does not verify, or TLS cannot be agreed
)
# The server exists but is not accepting connections yet (starting up, shutting down, full), or
# none of the hosts is what target_session_attrs asks for (a standby is being promoted). Besides
# these, any OSError is worth a retry: a refused connection, and a host name that does not resolve
# yet (socket.gaierror: under docker compose or Kubernetes a database's name resolves only once its
# container or service exists, often seconds after the app starts).
_TRANSIENT = (
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.TargetServerAttributeNotMatched,
)
# What each target_session_attrs value asks of a server, for "no server in ... is <this>".
_ATTRS = {
    "primary": "a primary",
    "read-write": "a primary that accepts writes",
    "standby": "a standby",
    "read-only": "read-only",
}


# A prepared statement missing from, or already on, the server connection: what a statement cache
# meets behind a transaction-pooling proxy, which lends a different server connection per transaction.
PREPARED_STATEMENT_STATES = ("26000", "42P05")


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


def is_pooler_symptom(exc: BaseException) -> bool:
    """The error a statement cache gets behind a transaction-pooling proxy (PgBouncer pool_mode=transaction)."""
    return sqlstate(exc) in PREPARED_STATEMENT_STATES


def is_connection_error(exc: BaseException) -> bool:
    root = _root(exc)
    return isinstance(root, (OSError, TimeoutError, *_FATAL, *_TRANSIENT)) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    )


def is_retriable(exc: BaseException) -> bool:
    """True for failures a database that is still starting (or failing over) would cause."""
    root = _root(exc)
    return isinstance(root, (OSError, TimeoutError, *_TRANSIENT)) and not isinstance(root, _FATAL)


def describe(exc: BaseException, target: DatabaseTarget) -> str:
    """What went wrong, in one line, naming the server but never the password."""
    root = _root(exc)
    where = target.safe
    if isinstance(root, asyncpg.TargetServerAttributeNotMatched):
        attrs = target.option("target_session_attrs") or "any"
        return f"no server in {where} is {_ATTRS.get(attrs, attrs)} (target_session_attrs={attrs})"
    if isinstance(root, ssl.SSLCertVerificationError):
        return f"the TLS certificate of {where} does not verify: {root.verify_message} ({_sslmode(target)})"
    if isinstance(root, ssl.SSLError):
        return f"TLS with {where} failed: {root.reason or root} ({_sslmode(target)})"
    if isinstance(root, asyncpg.ClientConfigurationError):
        return f"cannot connect to {where}: {first_line(root)}"
    if isinstance(root, socket.gaierror):
        return f"cannot resolve the database host {_unresolved(target)} ({where})"
    if isinstance(root, ConnectionRefusedError):
        return f"connection refused by {where} (is PostgreSQL running there?)"
    if isinstance(root, TimeoutError):
        return f"timed out connecting to {where}"
    if isinstance(root, FileNotFoundError):
        return f"no PostgreSQL socket at {where}"
    if isinstance(root, asyncpg.PostgresError):
        return f"{first_line(root)} ({where})"
    if isinstance(root, OSError):
        return f"cannot connect to {where}: {root.strerror or first_line(root)}"
    return f"{type(root).__name__}: {str(root).splitlines()[0] if str(root) else ''} ({where})"


def _unresolved(target: DatabaseTarget) -> str:
    """The host a name-resolution failure is about: asyncpg tries the hosts in order and raises the
    last one's error, and only a host name (not a socket, not an address) is looked up."""
    for host in reversed(target.hosts):
        if not host.is_socket:
            return host.name
    return ",".join(host.name for host in target.hosts)


def _sslmode(target: DatabaseTarget) -> str:
    return f"sslmode={target.option('sslmode') or 'prefer'}"


# --- faults a request can meet ----------------------------------------------------------------

Fault = Literal["unavailable", "busy", "timeout", "conflict", "pooler"]


class StatementTimeout(Exception):
    """A statement ran past the service's statement timeout and was cancelled (nothing of it stayed)."""


class ConnectionLost(Exception):
    """The connection a statement was given closed under it (the server went away)."""


# SQLSTATEs of expected faults (PostgreSQL's appendix A), by what the client should make of them.
_FAULT_STATES: dict[str, Fault] = {
    "57P01": "unavailable",  # admin_shutdown: the server is stopping, or the session was terminated
    "57P02": "unavailable",  # crash_shutdown
    "57P03": "unavailable",  # cannot_connect_now: starting up, shutting down, in recovery
    "08000": "unavailable",  # connection_exception and its subclasses
    "08003": "unavailable",
    "08006": "unavailable",
    "08001": "unavailable",
    "08004": "unavailable",
    "25006": "unavailable",  # read_only_sql_transaction: a write reached a standby (fail-over under way)
    "53300": "busy",  # too_many_connections
    "57014": "timeout",  # query_canceled: statement_timeout
    "40001": "conflict",  # serialization_failure
    "40P01": "conflict",  # deadlock_detected
    "26000": "pooler",  # see PREPARED_STATEMENT_STATES
    "42P05": "pooler",
}


def request_fault(exc: BaseException) -> Fault | None:
    """What kind of expected database fault ``exc`` is, or None for anything else (a bug).

    unavailable: the server cannot be reached or is going away; busy: no connection to be had in
    time (pool checkout, the server's connection limit); timeout: a statement ran past
    statement_timeout; conflict: a deadlock or serialization failure, worth a retry; pooler: a
    statement cache behind a transaction-pooling proxy (a misconfiguration).
    """
    if isinstance(exc, PoolBusy):
        return "busy"
    if isinstance(exc, StatementTimeout):
        return "timeout"
    if isinstance(exc, ConnectionLost):
        return "unavailable"
    state = sqlstate(exc)
    if state in _FAULT_STATES:
        return _FAULT_STATES[state]
    if is_connection_error(exc) or isinstance(_root(exc), asyncpg.InterfaceError) and "closed" in str(_root(exc)):
        return "unavailable"
    return None
