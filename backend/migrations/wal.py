"""The migration session's WAL: its full-page images compressed when the server does not already.

After each checkpoint, the first change to a page writes the whole page to the WAL (a full-page
image). A backfill or an index build changes every page of a table, so its WAL is mostly such
images, and the service's commits wait for that WAL to be
flushed before theirs: with the walk's images uncompressed, an insert beside it waited up to
167-279 ms (LWLock:WALWrite, IO:WALInitSync as new segments are made); with them compressed
(lz4), 83 ms at most, and the walk ran faster (1M turns: 46,781 rows/s against 18,706-37,574).

``wal_compression`` may be set per session by a superuser, or (PostgreSQL 15+) by a role granted
``SET`` on it; the runner sets it on its work session when the server has it off and the role may,
and otherwise the backfill engine says once per walk how an operator turns it on. Online only: the
offline SQL is the operator's to run as they choose.
"""

from __future__ import annotations

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

# connection.info key: the compression the session's full-page images get ("lz4", "pglz", ...),
# or None when they get none and the session could not change that. Absent: not looked at.
COMPRESSION = "kraken_wal_compression"

_SETTING = "SELECT setting, enumvals FROM pg_settings WHERE name = 'wal_compression'"
# Who may SET the parameter in a session: PostgreSQL 15 added grants on parameters.
_MAY_SET_15 = "SELECT has_parameter_privilege('wal_compression', 'SET')"
_MAY_SET = "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
_OFF = ("off", "false", "0")


def compress_full_page_images(connection: Connection) -> str | None:
    """Compress the session's full-page images (lz4 where the server has it, else pglz) unless the
    server already does; returns the compression in effect, None when there is none (and records
    it in ``connection.info``). Best effort: a server that answers otherwise than PostgreSQL does
    (a fork without the setting, a SET refused) leaves the session as it was, and the run goes on."""
    connection.info[COMPRESSION] = None
    try:
        with connection.begin_nested():  # a savepoint: a refusal must not abort the caller's transaction
            found = connection.execute(text(_SETTING)).first()
            if found is None:
                return None
            setting, choices = found
            if setting not in _OFF:
                connection.info[COMPRESSION] = str(setting)
                return str(setting)
            version = connection.dialect.server_version_info or (0,)
            if not connection.execute(text(_MAY_SET_15 if version >= (15,) else _MAY_SET)).scalar():
                return None
            # Before PostgreSQL 15 the parameter is a boolean: "on" is pglz.
            value = "lz4" if choices and "lz4" in choices else "on"
            connection.execute(text(f"SET wal_compression = {value}"))
    except DBAPIError:
        return None
    connection.info[COMPRESSION] = "pglz" if value == "on" else value
    return str(connection.info[COMPRESSION])


def uncompressed(connection: Connection) -> bool:
    """True when the runner found that this session's full-page images go uncompressed."""
    return COMPRESSION in connection.info and connection.info[COMPRESSION] is None


ADVICE = (
    "full-page images in the WAL go uncompressed (wal_compression is off and this role may not set it):"
    " the walk writes about three times the WAL it would, and the service's commits wait for it to be"
    " flushed; set wal_compression = lz4 on the server, or GRANT SET ON PARAMETER wal_compression TO"
    " the migration role (PostgreSQL 15+)"
)
