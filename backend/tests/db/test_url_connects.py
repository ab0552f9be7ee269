"""DATABASE_URL's reading on a real server: the service and libpq itself (psycopg) connect with the
same URL and land in the same database as the same role."""

from urllib.parse import quote

import psycopg
import pytest

from backend.db.engine import connect
from backend.db.url import DatabaseTarget, parse_database_url

WHO = "SELECT current_database(), current_user"


def libpq_lands(url: str) -> tuple[str, str]:
    with psycopg.connect(url, connect_timeout=10) as conn:
        row = conn.execute(WHO).fetchone()
    assert row is not None
    return row[0], row[1]


async def service_lands(url: str) -> tuple[str, str]:
    conn = await connect(parse_database_url(url))
    try:
        row = await conn.fetchrow(WHO)
    finally:
        await conn.close()
    assert row is not None
    return row[0], row[1]


def where(server: DatabaseTarget) -> str:
    """The server's first host as the query options host= and port=."""
    host = server.hosts[0]
    return f"host={quote(host.name, safe='/')}&port={host.port or 5432}"


async def test_query_options_win_over_the_urls_own_parts(empty_db: DatabaseTarget, server: DatabaseTarget) -> None:
    # libpq: the query's dbname, user and host replace the path, the user name and the authority.
    password = f"&password={quote(server.password, safe='')}" if server.password else ""
    url = f"postgresql://nobody@no-such-host.invalid:1/wrong?dbname={empty_db.database}&user={server.user}&"
    url += where(server) + password
    assert libpq_lands(url) == (empty_db.database, server.user)
    assert await service_lands(url) == (empty_db.database, server.user)


async def test_a_url_naming_only_the_database_connects_where_libpq_does(
    empty_db: DatabaseTarget, server: DatabaseTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Host, port, user and password from libpq's environment variables, as libpq takes them.
    host = server.hosts[0]
    monkeypatch.setenv("PGHOST", host.name)
    monkeypatch.setenv("PGPORT", str(host.port or 5432))
    monkeypatch.setenv("PGUSER", server.user or "")
    if server.password:
        monkeypatch.setenv("PGPASSWORD", server.password)
    url = f"postgresql:///{empty_db.database}"
    assert libpq_lands(url) == (empty_db.database, server.user)
    assert await service_lands(url) == (empty_db.database, server.user)
