"""PgBouncer in transaction pooling mode in front of a real server: the API works through it,
migrations refuse it (they need a session of their own), and a statement cache left on is told once."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from backend.config import PROJECT_ROOT, Settings
from backend.conversations.schemas import as_utc
from backend.db.admin import create_database, drop_databases
from backend.db.engine import connect
from backend.db.leases import Lease
from backend.db.url import DatabaseTarget, parse_database_url
from backend.main import create_app
from backend.migrations.runner import MigrationError, run_migrations
from backend.tests.conftest import settings_of
from backend.tests.helpers import (
    API_KEY,
    AUTH,
    CONVERSATION,
    HEAD,
    NEXT,
    SERVED,
    SERVICE,
    child_env,
    fetch,
    live,
    out,
    run_alembic,
    run_kraken_migrations,
    scratch_alembic,
    turn_body,
)
from backend.tests.rigs.cluster import Cluster
from backend.tests.rigs.pgbouncer import PgBouncer, pgbouncer

pytestmark = pytest.mark.slow

REFUSAL = (
    "migrations need a direct connection to PostgreSQL, and theirs goes through a transaction-pooling proxy "
    "(PgBouncer pool_mode=transaction?): two of its sessions shared one server connection, so the migration lock "
    "would serialize nothing and its timeouts would not hold; point MIGRATIONS_DATABASE_URL at the server itself "
    "(DATABASE_URL may stay on the proxy)"
)


@pytest.fixture
async def database(pg_cluster: Cluster) -> AsyncIterator[str]:
    """A new database on the server behind the proxy, dropped after the test."""
    direct = parse_database_url(pg_cluster.url())
    name = f"kraken_bouncer_{secrets.token_hex(4)}"
    await create_database(direct, name)
    yield name
    await drop_databases(direct, [name])


def through(bouncer: PgBouncer, database: str) -> DatabaseTarget:
    return parse_database_url(bouncer.url(database=database))


def pooled_settings(bouncer: PgBouncer, cluster: Cluster, database: str, **overrides: object) -> Settings:
    """The deployment this proxy asks for: the service through it, migrations straight to the server."""
    values: dict[str, object] = {
        "MIGRATIONS_DATABASE_URL": cluster.url(database=database),
        "db_statement_cache": False,
        "api_key": API_KEY,
    }
    return settings_of(through(bouncer, database), **{**values, **overrides})


def test_the_api_test_module_passes_through_pgbouncer(bouncer: PgBouncer, pg_cluster: Cluster) -> None:
    # The whole module, run as the suite runs it, with the service's database behind the proxy.
    env = {
        **child_env(None),
        "DATABASE_URL": bouncer.url(),
        "MIGRATIONS_DATABASE_URL": pg_cluster.url(),
        "KRAKEN_DB_STATEMENT_CACHE": "false",
    }
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider"]
        + ["backend/tests/api/test_conversations.py"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
    assert " failed" not in result.stdout


async def test_sixteen_clients_append_to_shared_conversations_gaplessly(
    bouncer: PgBouncer, pg_cluster: Cluster, database: str
) -> None:
    # Appends to one conversation wait for each other's row lock, four deep: a statement bound past
    # what a loaded machine takes (at the default 10 s some were answered 504 there).
    settings = pooled_settings(
        bouncer, pg_cluster, database, db_pool_size=8, db_max_overflow=8, db_statement_timeout=120
    )
    app = create_app(settings)
    statuses: list[int] = []
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://kraken", headers=AUTH) as client:
            conversations = [(await client.post("/conversations", json=CONVERSATION)).json()["id"] for _ in range(4)]

            async def append(conversation: str) -> None:
                for _ in range(15):
                    response = await client.post(f"/conversations/{conversation}/turns", json=turn_body())
                    statuses.append(response.status_code)

            await asyncio.gather(*(append(conversations[n % 4]) for n in range(16)))
    assert statuses == [201] * 240
    for conversation in conversations:
        rows = await fetch(
            parse_database_url(pg_cluster.url(database=database)),
            "SELECT turn_number FROM kraken_turns WHERE conversation_id = $1 ORDER BY 1",
            conversation,
        )
        assert [r[0] for r in rows] == list(range(1, 61))


@pytest.mark.parametrize("statement_cache", ["true", "false"])
async def test_migrations_through_a_transaction_pooler_are_refused_in_one_line(
    bouncer: PgBouncer, pg_cluster: Cluster, database: str, statement_cache: str
) -> None:
    url = bouncer.url(database=database)
    for command in (("upgrade", "head"), ("current",)):
        cli = await asyncio.to_thread(
            run_alembic, *command, target=None, DATABASE_URL=url, KRAKEN_DB_STATEMENT_CACHE=statement_cache
        )
        assert cli.returncode != 0
        assert out(cli).strip() == f"FAILED: {REFUSAL}"
    # The ledger's repair takes the migration lock too: refused the same way, whatever the cache setting.
    repair = await asyncio.to_thread(
        run_kraken_migrations, "repair", target=None, DATABASE_URL=url, KRAKEN_DB_STATEMENT_CACHE=statement_cache
    )
    assert repair.returncode == 1
    assert out(repair).strip() == f"FAILED: {REFUSAL}"

    with pytest.raises(MigrationError) as caught:
        await run_migrations(settings_of(through(bouncer, database), db_statement_cache=statement_cache))
    assert str(caught.value) == REFUSAL

    boot = await asyncio.to_thread(
        subprocess.run,
        [SERVICE],
        env=child_env(None, DATABASE_URL=url, KRAKEN_DB_STATEMENT_CACHE=statement_cache),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert boot.returncode == 1
    assert boot.stderr.strip().endswith(f"cannot start: {REFUSAL}")
    assert "Traceback" not in boot.stderr
    # Nothing was attempted: not even the version table or the ledger.
    assert await pg_cluster.fetchval(
        "SELECT to_regclass('alembic_version') IS NULL AND to_regclass('alembic_ledger') IS NULL", database=database
    )


@pytest.fixture
def session_bouncer(pg_cluster: Cluster) -> Iterator[PgBouncer]:
    with pgbouncer(pg_cluster, pool_mode="session") as running:
        yield running


async def test_session_pooling_is_not_mistaken_for_transaction_pooling(
    session_bouncer: PgBouncer, database: str
) -> None:
    # In session mode each client keeps its server connection: the lock holds, migrations may run.
    status = await run_migrations(settings_of(through(session_bouncer, database)))
    assert status.current == (SERVED,)


# A revision that records how many prepared statements its session holds when it runs.
PROBE = f"""
    from alembic import op

    revision = "{NEXT}"
    down_revision = "{HEAD}"
    branch_labels = None
    depends_on = None


    def upgrade():
        op.execute("CREATE TABLE kraken_probe AS SELECT count(*) AS prepared FROM pg_prepared_statements")


    def downgrade():
        op.execute("DROP TABLE kraken_probe")
"""


@pytest.mark.parametrize(("statement_cache", "prepared"), [("true", True), ("false", False)])
async def test_the_migration_engine_honours_the_statement_cache_setting(
    pg_cluster: Cluster, tmp_path: object, statement_cache: str, prepared: bool
) -> None:
    ini = scratch_alembic(tmp_path, {f"{NEXT}_probe.py": PROBE})  # type: ignore[arg-type]
    direct = parse_database_url(pg_cluster.url())
    for how in ("cli", "boot"):
        name = f"kraken_cache_{secrets.token_hex(4)}"
        target = await create_database(direct, name)
        try:
            if how == "cli":
                cli = await asyncio.to_thread(
                    run_alembic,
                    "upgrade",
                    "head",
                    target=target,
                    config=ini,
                    KRAKEN_DB_STATEMENT_CACHE=statement_cache,
                )
                assert cli.returncode == 0, out(cli)
            else:
                settings = settings_of(target, db_statement_cache=statement_cache)
                await run_migrations(settings, script_location=ini.parent / "alembic")
            count = await pg_cluster.fetchval("SELECT prepared FROM kraken_probe", database=name)
            assert (count > 0) is prepared, (how, count)
        finally:
            await drop_databases(direct, [name])


async def test_a_statement_cache_left_on_behind_the_pooler_is_told_once(
    bouncer: PgBouncer, pg_cluster: Cluster, database: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Sixteen appends to one conversation wait for each other's row lock: a statement bound past
    # what a loaded machine takes (at the default 10 s some were answered 504 there).
    settings = pooled_settings(
        bouncer, pg_cluster, database, db_statement_cache=True, db_pool_size=16, db_statement_timeout=120
    )
    app = create_app(settings)
    responses: list[httpx.Response] = []
    with caplog.at_level(logging.INFO):
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://kraken", headers=AUTH) as client:
                created = await client.post("/conversations", json=CONVERSATION)
                responses.append(created)
                conversation = created.json()["id"] if created.status_code == 201 else "0" * 32

                async def append() -> None:
                    for _ in range(10):
                        responses.append(await client.post(f"/conversations/{conversation}/turns", json=turn_body()))

                await asyncio.gather(*(append() for _ in range(16)))
    refused = [r for r in responses if r.status_code == 503]
    assert refused, "the statement cache never met the pooler: no 503"
    assert {r.status_code for r in responses} <= {201, 404, 503}
    assert all(r.json()["detail"][0]["type"] == "database_misconfigured" for r in refused)
    assert all(r.headers["Retry-After"] for r in refused)
    told = [r for r in caplog.records if "KRAKEN_DB_STATEMENT_CACHE=false" in r.getMessage()]
    assert len(told) == 1
    assert told[0].levelno == logging.ERROR
    assert not [r for r in caplog.records if r.exc_info]  # no traceback for it, let alone one per request
    assert os.environ.get("KRAKEN_DB_STATEMENT_CACHE") is None


@pytest.fixture
def one_server_connection(pg_cluster: Cluster) -> Iterator[PgBouncer]:
    """A transaction pooler with one server connection per database, shared by every client."""
    with pgbouncer(pg_cluster, default_pool_size=1) as running:
        yield running


async def test_the_services_sessions_stay_in_utc_on_a_server_connection_another_client_set_otherwise(
    one_server_connection: PgBouncer, pg_cluster: Cluster, database: str
) -> None:
    # TimeZone is a startup parameter PgBouncer tracks per client: it sets each client's own on the
    # server connection it lends, whatever the database's default or the last client's SET.
    direct = parse_database_url(pg_cluster.url(database=database))
    await fetch(direct, f"ALTER DATABASE \"{database}\" SET timezone = 'America/New_York'")
    settings = pooled_settings(one_server_connection, pg_cluster, database)
    await run_migrations(settings)
    other = await connect(through(one_server_connection, database))
    try:
        await other.execute("SET TimeZone = 'Asia/Kathmandu'")  # on the one server connection, for every client
        app = create_app(settings)
        async with live(app) as client:
            created = (await client.post("/conversations", json=CONVERSATION)).json()
            assert await other.fetchval("SHOW timezone") == "Asia/Kathmandu"
            ended = (await client.post(f"/conversations/{created['id']}/end", json={"status": "completed"})).json()
            lease = Lease(app.state.lender)
            assert await (await lease.connection()).fetchval("SHOW timezone") == "UTC"
            await lease.end(succeeded=True)
        assert await other.fetchval("SHOW timezone") == "Asia/Kathmandu"
    finally:
        await other.close()
    [stored] = await fetch(direct, "SELECT started_at, ended_at FROM kraken_conversations WHERE id = $1", created["id"])
    started = datetime.strptime(created["started_at"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    # The served schema (007's swap ran before 008) stores instants; either form, the one shown.
    assert as_utc(stored["started_at"]) == started
    assert timedelta(0) <= datetime.now(UTC) - started < timedelta(minutes=5)
    assert ended["started_at"] == created["started_at"]
    ended_at = datetime.strptime(ended["ended_at"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert as_utc(stored["ended_at"]) == ended_at
