"""The migration package as the original design describes it, with no database: its files, the
baseline's idempotent DDL, and the startup hook the app calls.

    cd backend && uv run pytest tests/test_migration_setup.py -v
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from fastapi import FastAPI

from backend import database
from backend.config import PROJECT_ROOT, Settings
from backend.db.engine import connect_kwargs, create_migration_engine
from backend.db.url import parse_database_url
from backend.main import create_app
from backend.migrations.revisions import SchemaStatus, alembic_config, read_revisions
from backend.tests.helpers import out, run_alembic

BACKEND = PROJECT_ROOT / "backend"
TABLES = ("kraken_conversations", "kraken_turns", "kraken_tool_calls")


@pytest.mark.parametrize(
    "path",
    ["alembic.ini", "backend/alembic.ini", "backend/alembic/env.py", "backend/alembic/script.py.mako"],
)
def test_the_package_has_its_files(path: str) -> None:
    assert (PROJECT_ROOT / path).is_file()


@pytest.mark.parametrize("directory", [PROJECT_ROOT, BACKEND])
def test_alembic_finds_the_revisions_from_the_root_and_from_backend(directory: Path) -> None:
    """`uv run alembic ...` works from the repository's root and, as the design's commands say, from backend/."""
    history = run_alembic("history", target=None, cwd=directory)
    assert history.returncode == 0, out(history)
    assert re.search(r"<base> -> 001\b", history.stdout), history.stdout
    assert "(head)" in history.stdout


def test_the_baseline_is_the_root_of_one_line_of_revisions() -> None:
    scripts = ScriptDirectory.from_config(alembic_config())
    baseline = scripts.get_revision("001")
    assert baseline is not None
    assert baseline.down_revision is None
    assert Path(baseline.path).name == "001_baseline_schema.py"
    assert len(scripts.get_heads()) == 1
    assert set(read_revisions().heads) == set(scripts.get_heads())


def test_database_url_is_turned_into_an_asyncpg_engine() -> None:
    """DATABASE_URL's ``postgresql://`` becomes SQLAlchemy's asyncpg dialect; where to connect is
    handed to asyncpg as libpq reads the URL (backend/db/url.py), not through SQLAlchemy's URL."""
    target = parse_database_url("postgresql://kraken:secret@db.internal:5433/kraken_db")
    assert create_migration_engine(target).url.drivername == "postgresql+asyncpg"
    arguments = connect_kwargs(target, "probe", True)
    assert (arguments["host"], arguments["port"], arguments["database"]) == (["db.internal"], [5433], "kraken_db")
    assert (arguments["user"], arguments["password"]) == ("kraken", "secret")


def test_the_baseline_creates_every_table_and_index_only_if_it_is_missing() -> None:
    """001's SQL (offline: no database) is safe on a database whose tables already exist."""
    result = run_alembic("upgrade", "base:001", "--sql", target=None)
    assert result.returncode == 0, out(result)
    statements = [s.strip() for s in result.stdout.split(";") if s.strip()]
    creates = [s for s in statements if s.startswith("CREATE") and "alembic_version" not in s]
    assert sorted(re.findall(r'CREATE TABLE IF NOT EXISTS "(\w+)"', result.stdout)) == sorted(TABLES)
    assert len(re.findall(r"CREATE INDEX IF NOT EXISTS", result.stdout)) == 3
    assert creates
    assert all(" IF NOT EXISTS " in s for s in creates), creates
    assert not [s for s in statements if s.startswith(("DROP", "ALTER"))]


async def test_the_app_runs_the_startup_hook_once_and_serves_its_status(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lifespan calls ``database.run_migrations()`` (nothing handed it a status) and keeps
    what it returns; its pool connects on first use, so no database is needed to start."""
    calls: list[Settings] = []
    status = SchemaStatus(("001",), read_revisions())

    async def hook(settings: Settings) -> SchemaStatus:
        calls.append(settings)
        return status

    monkeypatch.setattr(database, "run_migrations", hook)
    # Nothing listens on port 1: the start must not connect.
    settings = Settings.model_validate({"DATABASE_URL": "postgresql://kraken@127.0.0.1:1/kraken"})
    app: FastAPI = create_app(settings)
    async with app.router.lifespan_context(app):
        assert app.state.schema_status is status
    assert calls == [settings]


async def test_a_status_handed_over_is_used_instead_of_the_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    """`kraken-backend` runs the hook once, before its workers; a worker that has the status does not run it."""

    async def hook(settings: Settings) -> SchemaStatus:
        raise AssertionError("the hook ran although the status was handed over")

    monkeypatch.setattr(database, "run_migrations", hook)
    app = create_app(Settings.model_validate({"DATABASE_URL": "postgresql://kraken@127.0.0.1:1/kraken"}))
    handed = SchemaStatus(("001",), read_revisions())
    app.state.schema_status = handed
    async with app.router.lifespan_context(app):
        assert app.state.schema_status is handed
