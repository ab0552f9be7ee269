"""DATABASE_URL over TLS, against a real TLS-only server with certificates made for the test:
every sslmode as libpq defines it, certificate authentication, and the service and the CLI on it."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backend.db.admin import create_database
from backend.db.engine import connect
from backend.db.errors import describe
from backend.db.url import parse_database_url
from backend.migrations.runner import DatabaseUnavailable, read_schema_status, run_migrations
from backend.tests.conftest import settings_of
from backend.tests.helpers import SERVED, child_env, free_port, get_json, out, run_alembic, service
from backend.tests.rigs.cluster import format_url
from backend.tests.rigs.tls import TlsServer

pytestmark = pytest.mark.slow

SSL_STATE = "SELECT ssl, client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()"


@pytest.fixture
def database(tls_server: TlsServer) -> Iterator[str]:
    """A new database on the TLS server, dropped after the test."""
    name = f"kraken_tls_{secrets.token_hex(4)}"
    tls_server.cluster.execute_sync(f'CREATE DATABASE "{name}"')
    yield name
    tls_server.cluster.execute_sync(f'DROP DATABASE "{name}" WITH (FORCE)')


async def ssl_state(url: str) -> tuple[bool, str | None]:
    """(TLS in use, client certificate DN) of a connection made from ``url`` as the service makes them."""
    conn = await connect(parse_database_url(url))
    try:
        row = await conn.fetchrow(SSL_STATE)
        return bool(row["ssl"]), row["client_dn"]
    finally:
        await conn.close()


async def failure(url: str) -> str:
    """The one line a connection made from ``url`` fails with."""
    target = parse_database_url(url)
    with pytest.raises(Exception) as caught:  # noqa: PT011 - any connection error; the line is checked
        await ssl_state(url)
    return describe(caught.value, target)


async def test_a_client_without_tls_is_refused_in_one_line(tls_server: TlsServer, database: str) -> None:
    url = tls_server.url("disable", host="127.0.0.1", database=database)
    line = await failure(url)
    assert "no pg_hba.conf entry" in line
    assert "no encryption" in line
    assert line.endswith(f"(postgres@127.0.0.1:{tls_server.port}/{database})")

    with pytest.raises(DatabaseUnavailable) as caught:
        await read_schema_status(parse_database_url(url))
    assert "\n" not in str(caught.value)
    assert "no encryption" in str(caught.value)
    cli = await asyncio.to_thread(run_alembic, "upgrade", "head", target=None, DATABASE_URL=url)
    assert cli.returncode != 0
    assert out(cli).strip().startswith("FAILED: no pg_hba.conf entry"), out(cli)
    assert len(out(cli).strip().splitlines()) == 1


# (sslmode, root certificate: the server's CA, another CA, or none, host, what libpq does)
SSLMODES = [
    # allow: tries without TLS first, then with it; prefer: the other way round. Neither verifies.
    ("allow", None, "127.0.0.1", "tls"),
    ("prefer", None, "127.0.0.1", "tls"),
    ("prefer", "other", "127.0.0.1", "tls"),
    (None, "other", "127.0.0.1", "tls"),  # no sslmode is prefer, whatever sslrootcert says
    # require: encrypts; verifies the chain only when given a root certificate (then as verify-ca).
    ("require", None, "127.0.0.1", "tls"),
    ("require", "right", "127.0.0.1", "tls"),
    ("require", "other", "127.0.0.1", "self-signed certificate in certificate chain"),
    # verify-ca: the chain, not the name.
    ("verify-ca", "right", "127.0.0.1", "tls"),
    ("verify-ca", "other", "localhost", "self-signed certificate in certificate chain"),
    # verify-full: the chain and the name (the certificate names localhost only).
    ("verify-full", "right", "localhost", "tls"),
    ("verify-full", "right", "127.0.0.1", "IP address mismatch"),
    ("verify-full", "other", "localhost", "self-signed certificate in certificate chain"),
]


@pytest.mark.parametrize(("sslmode", "root", "host", "expected"), SSLMODES)
async def test_every_sslmode_means_what_libpq_says(
    tls_server: TlsServer, sslmode: str | None, root: str | None, host: str, expected: str
) -> None:
    certs = tls_server.certs
    query = {} if sslmode is None else {"sslmode": sslmode}
    if root is not None:
        query["sslrootcert"] = str(certs.ca_cert if root == "right" else certs.other_ca_cert)
    url = format_url([(host, tls_server.port)], query=query)
    if expected == "tls":
        assert await ssl_state(url) == (True, None)
    else:
        line = await failure(url)
        assert line.startswith(f"the TLS certificate of postgres@{host}:{tls_server.port}/postgres does not verify:")
        assert expected in line
        assert f"(sslmode={sslmode})" in line


async def test_certificate_authentication(tls_server: TlsServer) -> None:
    certs = tls_server.certs
    verified = tls_server.url("verify-full", user=certs.cert_user, client_cert=True)
    assert await ssl_state(verified) == (True, f"/CN={certs.cert_user}")
    # require with a client certificate and no root certificate: encrypted, the server not verified
    # (this certificate's CA is in no system store, so a client that verified would fail).
    unverified = tls_server.url("require", user=certs.cert_user, host="127.0.0.1", client_cert=True)
    assert await ssl_state(unverified) == (True, f"/CN={certs.cert_user}")
    without = tls_server.url("verify-full", user=certs.cert_user)
    assert "requires a valid client certificate" in await failure(without)


async def test_password_authentication_over_tls_never_prints_the_password(tls_server: TlsServer) -> None:
    good = tls_server.url("verify-full", user=tls_server.password_user, password=tls_server.password)
    assert (await ssl_state(good))[0] is True
    wrong = "Wrong-" + secrets.token_hex(6)
    line = await failure(tls_server.url("verify-full", user=tls_server.password_user, password=wrong))
    assert f'password authentication failed for user "{tls_server.password_user}"' in line
    assert wrong not in line
    assert tls_server.password not in line


async def test_the_password_comes_from_passfile_or_pgpassfile(
    tls_server: TlsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"localhost:{tls_server.port}:*:{tls_server.password_user}:{tls_server.password}\n")
    passfile.chmod(0o600)  # libpq, and asyncpg, ignore a password file others can read
    url = tls_server.url("verify-full", user=tls_server.password_user)
    assert "password authentication failed" in await failure(url)  # no password anywhere yet
    assert (await ssl_state(f"{url}&passfile={passfile}"))[0] is True
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    assert (await ssl_state(url))[0] is True


async def test_the_cli_and_the_service_boot_migrate_and_serve_over_tls(tls_server: TlsServer, database: str) -> None:
    url = tls_server.url("verify-full", user=tls_server.certs.cert_user, client_cert=True, database=database)
    tls_server.cluster.execute_sync(f'ALTER DATABASE "{database}" OWNER TO {tls_server.certs.cert_user}')
    upgraded = await asyncio.to_thread(run_alembic, "upgrade", "001", target=None, DATABASE_URL=url)
    assert upgraded.returncode == 0, out(upgraded)
    assert (await read_schema_status(parse_database_url(url))).current == ("001",)

    port = free_port()
    env = child_env(None, DATABASE_URL=url, KRAKEN_PORT=str(port))
    with service(env) as running:
        ready = await asyncio.to_thread(get_json, port, "/ready", time.monotonic() + 60)
        sessions = tls_server.cluster.fetchval_sync(
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid)"
            " WHERE ssl AND application_name = 'kraken-backend' AND datname = $1",
            database,
        )
        output = running.stop()
    assert ready["status"] == "ready", output
    assert ready["revision"] == SERVED
    assert f"applied revision {SERVED}" in output
    assert sessions >= 1  # the service's pool is on TLS too


async def test_databases_are_created_and_migrated_in_process_over_tls(tls_server: TlsServer) -> None:
    server = parse_database_url(tls_server.url("verify-full"))
    name = f"kraken_tls_{secrets.token_hex(4)}"
    target = await create_database(server, name)
    try:
        status = await run_migrations(settings_of(target))
        assert (status.serves_code, status.revision) == (True, SERVED)  # the boot's phase: pre-deploy
    finally:
        tls_server.cluster.execute_sync(f'DROP DATABASE "{name}" WITH (FORCE)')
