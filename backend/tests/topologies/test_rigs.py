"""Each rig does what it claims, shown with plain asyncpg against the real processes."""

from __future__ import annotations

import asyncio
import socket
import ssl

import asyncpg
import pytest

from backend.tests.rigs.cluster import Cluster, ipv6_loopback
from backend.tests.rigs.pgbouncer import PgBouncer
from backend.tests.rigs.replication import ReplicationPair
from backend.tests.rigs.tls import TlsServer

pytestmark = pytest.mark.slow

SSL_STATE = "SELECT ssl, client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()"


async def fetchrow(dsn: str, query: str, **kwargs) -> asyncpg.Record:
    conn = await asyncpg.connect(dsn, timeout=10, **kwargs)
    try:
        return await conn.fetchrow(query)
    finally:
        await conn.close()


# --- TLS-only server ---------------------------------------------------------------------------


async def test_tls_client_without_tls_is_refused(tls_server: TlsServer):
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="no encryption"):
        await fetchrow(tls_server.url("disable", host="127.0.0.1"), "SELECT 1")


async def test_tls_require_connects_over_tls(tls_server: TlsServer):
    row = await fetchrow(tls_server.url("require", host="127.0.0.1"), SSL_STATE)
    assert row["ssl"] is True
    assert row["client_dn"] is None


async def test_tls_verify_ca_accepts_the_right_ca_only(tls_server: TlsServer):
    # verify-ca checks the chain, not the name: the IP address is fine.
    row = await fetchrow(tls_server.url("verify-ca", host="127.0.0.1"), SSL_STATE)
    assert row["ssl"] is True
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        await fetchrow(tls_server.url("verify-ca", host="127.0.0.1", root_cert=tls_server.certs.other_ca_cert), "")


async def test_tls_verify_full_checks_the_host_name(tls_server: TlsServer):
    with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
        await fetchrow(tls_server.url("verify-full", host="127.0.0.1"), "SELECT 1")
    row = await fetchrow(tls_server.url("verify-full", host="localhost"), SSL_STATE)
    assert row["ssl"] is True


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_tls_server_listens_on_ipv6_loopback_too(tls_server: TlsServer):
    # Where localhost resolves to ::1 first (GitHub's runners), verify-full to localhost goes there.
    row = await fetchrow(tls_server.url("require", host="::1"), "SELECT inet_client_addr()::text AS addr")
    assert row["addr"] == "::1/128"


async def test_tls_client_certificate_authentication(tls_server: TlsServer):
    certs = tls_server.certs
    dsn = tls_server.url("verify-full", user=certs.cert_user, client_cert=True)
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        assert await conn.fetchval("SELECT current_user") == certs.cert_user
        row = await conn.fetchrow(SSL_STATE)
        assert row["ssl"] is True
        assert row["client_dn"] == f"/CN={certs.cert_user}"
        if await conn.fetchval("SELECT count(*) FROM pg_available_extensions WHERE name = 'sslinfo'"):
            await tls_server.cluster.execute("CREATE EXTENSION IF NOT EXISTS sslinfo")
            assert await conn.fetchval("SELECT ssl_is_used()") is True
    finally:
        await conn.close()
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="requires a valid client certificate"):
        await fetchrow(tls_server.url("verify-full", user=certs.cert_user), "SELECT 1")


async def test_tls_password_authentication(tls_server: TlsServer):
    user = tls_server.password_user
    row = await fetchrow(tls_server.url(user=user, password=tls_server.password), "SELECT current_user AS u")
    assert row["u"] == user
    with pytest.raises(asyncpg.InvalidPasswordError):
        await fetchrow(tls_server.url(user=user, password="wrong"), "SELECT 1")


def test_localhost_resolves_to_loopback_only(tls_server: TlsServer):
    addresses = {info[4][0] for info in socket.getaddrinfo("localhost", tls_server.port, type=socket.SOCK_STREAM)}
    assert addresses <= {"127.0.0.1", "::1"}
    assert tls_server.certs.server_name == "localhost"


# --- primary + synchronous hot standby ---------------------------------------------------------


async def test_replication_standby_is_synchronous_and_read_only(replication: ReplicationPair):
    primary, standby = replication.primary, replication.standby
    assert await primary.fetchval("SELECT sync_state FROM pg_stat_replication") == "sync"
    assert await primary.fetchval("SHOW synchronous_standby_names") == '"standby1"'
    assert await primary.fetchval("SHOW synchronous_commit") == "on"
    assert await standby.fetchval("SELECT pg_is_in_recovery()") is True
    assert await primary.fetchval("SELECT pg_is_in_recovery()") is False

    await primary.execute("CREATE TABLE t (id int PRIMARY KEY, note text)")
    await primary.execute("INSERT INTO t VALUES (1, 'on both')")
    replication.wait_replayed()
    assert await standby.fetchval("SELECT note FROM t WHERE id = 1") == "on both"
    with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
        await standby.execute("INSERT INTO t VALUES (2, 'no')")


async def test_replication_commit_waits_for_the_standby(replication: ReplicationPair):
    primary = replication.primary
    await primary.execute("CREATE TABLE t (id int)")
    replication.standby.stop("fast")
    warnings: list[str] = []
    conn = await primary.connect()
    try:
        conn.add_log_listener(lambda _conn, message: warnings.append(message.message))
        insert = asyncio.create_task(conn.execute("INSERT INTO t VALUES (1)"))
        pid = conn.get_server_pid()
        waiting = "SELECT wait_event FROM pg_stat_activity WHERE pid = $1"
        for _ in range(200):
            if await primary.fetchval(waiting, pid) == "SyncRep":
                break
            await asyncio.sleep(0.05)
        assert await primary.fetchval(waiting, pid) == "SyncRep"
        assert not insert.done()
        # Statement timeouts do not cover the commit; a cancel ends the wait (with a warning).
        assert await primary.fetchval("SELECT pg_cancel_backend($1)", pid) is True
        assert await asyncio.wait_for(insert, 10) == "INSERT 0 1"
    finally:
        await conn.close()
    assert any("canceling wait for synchronous replication" in w for w in warnings), warnings


async def test_replication_failover_keeps_acknowledged_commits(replication: ReplicationPair):
    await replication.primary.execute("CREATE TABLE t (id int PRIMARY KEY, note text)")
    await replication.primary.execute("INSERT INTO t VALUES (1, 'acknowledged')")

    new_primary = replication.failover()

    assert new_primary is replication.standby
    assert not replication.primary.is_running
    assert await new_primary.fetchval("SELECT pg_is_in_recovery()") is False
    assert await new_primary.fetchval("SELECT note FROM t WHERE id = 1") == "acknowledged"
    assert await new_primary.fetchval("SHOW synchronous_standby_names") == ""
    conn = await new_primary.connect()
    try:
        # Without a synchronous standby configured, this commit must not wait for one.
        await asyncio.wait_for(conn.execute("INSERT INTO t VALUES (2, 'after failover')"), 5)
    finally:
        await conn.close()
    assert await new_primary.fetchval("SELECT count(*) FROM t") == 2


async def test_replication_multi_host_url_finds_the_writable_server(replication: ReplicationPair):
    primary, standby = replication.primary, replication.standby
    read_write = replication.multi_host_url("read-write")
    assert read_write.startswith(f"postgresql://postgres@127.0.0.1:{standby.port},127.0.0.1:{primary.port}/")
    row = await fetchrow(read_write, "SELECT inet_server_port() AS port, pg_is_in_recovery() AS standby")
    assert (row["port"], row["standby"]) == (primary.port, False)

    row = await fetchrow(
        replication.multi_host_url("standby", standby_first=False), "SELECT inet_server_port() AS port"
    )
    assert row["port"] == standby.port

    replication.failover()
    row = await fetchrow(read_write, "SELECT inet_server_port() AS port, pg_is_in_recovery() AS standby")
    assert (row["port"], row["standby"]) == (standby.port, False)
    # The dead old primary first in the list: refused, so the next host is tried.
    row = await fetchrow(replication.multi_host_url(standby_first=False), "SELECT inet_server_port() AS port")
    assert row["port"] == standby.port


# --- PgBouncer, transaction pooling ------------------------------------------------------------


async def test_pgbouncer_serves_concurrent_clients(bouncer: PgBouncer, pg_cluster: Cluster):
    assert bouncer.server is pg_cluster

    async def client(n: int) -> tuple[int, int]:
        conn = await asyncpg.connect(bouncer.url(), statement_cache_size=0, timeout=10)
        try:
            total = 0
            for i in range(5):
                async with conn.transaction():
                    await conn.execute("SELECT pg_sleep(0.01)")
                    total += await conn.fetchval("SELECT $1::int + $2::int", n, i)
            return n, total
        finally:
            await conn.close()

    results = await asyncio.gather(*(client(n) for n in range(12)))
    assert results == [(n, 5 * n + 10) for n in range(12)]
    assert await pg_cluster.fetchval("SELECT count(*) FROM pg_stat_activity WHERE client_addr IS NOT NULL") <= 20


async def test_pgbouncer_transaction_mode_breaks_the_statement_cache(bouncer: PgBouncer):
    first = await asyncpg.connect(bouncer.url(), timeout=10)  # default statement cache
    second = await asyncpg.connect(bouncer.url(), statement_cache_size=0, timeout=10)
    try:
        await first.fetchval("SELECT 1")  # prepared on server connection A, which goes back to the pool
        async with second.transaction():
            await second.execute("SELECT 1")  # holds A
            # The cached statement is executed on server connection B, which never saw it.
            with pytest.raises(asyncpg.InvalidSQLStatementNameError, match=r"__asyncpg_stmt_\w+__\" does not exist"):
                await first.fetchval("SELECT 1")
    finally:
        await first.close()
        await second.close()


async def test_pgbouncer_refuses_unknown_startup_parameters(bouncer: PgBouncer):
    row = await fetchrow(
        bouncer.url(), "SELECT current_setting('application_name') AS app", server_settings={"application_name": "rig"}
    )
    assert row["app"] == "rig"
    with pytest.raises(asyncpg.ProtocolViolationError, match="unsupported startup parameter: statement_timeout"):
        await fetchrow(bouncer.url(), "SELECT 1", server_settings={"statement_timeout": "1000"})


def test_the_tests_of_a_shared_rig_are_one_xdist_group(request: pytest.FixtureRequest, tls_server: TlsServer) -> None:
    """topologies/conftest's rule: one worker (--dist loadgroup) starts the TLS server, once."""
    group = request.node.get_closest_marker("xdist_group")
    assert group is not None
    assert group.args == ("tls",)
