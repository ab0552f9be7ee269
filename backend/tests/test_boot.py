"""The service's boot in-process: migrate, check or only look; liveness, readiness and logging."""

import functools
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from httpx import ASGITransport, AsyncClient

from backend import database
from backend.api import health
from backend.config import Settings
from backend.db.leases import Lease
from backend.db.url import DatabaseTarget
from backend.main import create_app
from backend.migrations import runner
from backend.migrations.revisions import read_revisions
from backend.migrations.runner import MigrationError, SchemaNotAtHead, run_migrations
from backend.tests.helpers import HEAD, NEXT, SERVED, fetch, lender_on, scratch_alembic, trailing_post_deploy

SettingsFor = Callable[..., Settings]


async def get(app_settings: Settings, *paths: str) -> list[tuple[int, dict[str, object]]]:
    """Boot the app (its lifespan runs), request ``paths`` in order, shut it down."""
    app = create_app(app_settings)
    answers = []
    async with app.router.lifespan_context(app):
        async with AsyncClient(transport=ASGITransport(app=app), base_url="http://kraken") as client:
            for path in paths:
                response = await client.get(path)
                answers.append((response.status_code, response.json()))
    return answers


async def versions(db: DatabaseTarget) -> list[str]:
    return [row[0] for row in await fetch(db, "SELECT version_num FROM alembic_version")]


async def test_boot_on_an_empty_database_migrates_it(empty_db: DatabaseTarget, settings_for: SettingsFor) -> None:
    health, ready = await get(settings_for(empty_db), "/health", "/ready")
    # The boot runs the pre-deploy phase; the post-deploy revisions wait, and the code serves meanwhile.
    assert health == (200, {"status": "ok", "revision": SERVED})
    assert ready == (200, {"status": "ready", "revision": SERVED, "head": [HEAD]})
    assert await versions(empty_db) == [SERVED]


async def test_check_mode_refuses_a_database_behind_head(empty_db: DatabaseTarget, settings_for: SettingsFor) -> None:
    with pytest.raises(SchemaNotAtHead, match=f"at revision none, code expects {HEAD}"):
        await get(settings_for(empty_db, migrate_on_startup="check"), "/health")
    assert (await fetch(empty_db, "SELECT to_regclass('alembic_version') IS NULL"))[0][0]


async def test_check_mode_starts_at_head(head_db: DatabaseTarget, settings_for: SettingsFor) -> None:
    [(status, body)] = await get(settings_for(head_db, migrate_on_startup="check"), "/ready")
    assert (status, body["status"]) == (200, "ready")


TRAILING_POST_DEPLOY = trailing_post_deploy(
    "post-deploy, after head: what the release before this one could not read",
    "CREATE TABLE kraken_boot_post (id int)",
    "DROP TABLE kraken_boot_post",
)


async def test_check_mode_starts_with_only_post_deploy_revisions_pending(
    head_db: DatabaseTarget, settings_for: SettingsFor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The new release from its restart until the post-deploy phase has run ({NEXT} pending). The
    # boot's check and /ready read the copy's script directory, whose real revisions are all
    # pre-deploy (scratch_alembic): the database is a real one where they all ran (at HEAD).
    scratch_alembic(tmp_path, {f"{NEXT}_post.py": TRAILING_POST_DEPLOY})
    scripts = tmp_path / "alembic"
    monkeypatch.setattr(database, "check_schema", functools.partial(runner.check_schema, script_location=scripts))
    monkeypatch.setattr(health, "read_revisions", functools.partial(read_revisions, scripts))
    monkeypatch.setattr(health, "schema_status_on", functools.partial(runner.schema_status_on, script_location=scripts))
    [(status, body)] = await get(settings_for(head_db, migrate_on_startup="check"), "/ready")
    assert (status, body) == (200, {"status": "ready", "revision": HEAD, "head": [NEXT]})
    assert await versions(head_db) == [HEAD]
    assert (await fetch(head_db, "SELECT to_regclass('kraken_boot_post') IS NULL"))[0][0]  # not run


async def test_off_mode_serves_but_is_not_ready_until_migrated(
    empty_db: DatabaseTarget, settings_for: SettingsFor
) -> None:
    settings = settings_for(empty_db, migrate_on_startup="off")
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with AsyncClient(transport=ASGITransport(app=app), base_url="http://kraken") as client:
            assert (await client.get("/health")).json() == {"status": "ok", "revision": None}
            before = await client.get("/ready")
            await run_migrations(settings)
            after = await client.get("/ready")
    assert before.status_code == 503
    assert before.json()["reason"] == "schema is not at head"
    assert after.status_code == 200


async def test_ready_is_503_when_the_database_goes_away(
    head_db: DatabaseTarget, settings_for: SettingsFor, server: DatabaseTarget
) -> None:
    db = head_db
    app = create_app(settings_for(db))
    async with app.router.lifespan_context(app):
        async with AsyncClient(transport=ASGITransport(app=app), base_url="http://kraken") as client:
            assert (await client.get("/ready")).status_code == 200
            await fetch(server, f'DROP DATABASE "{db.database}" WITH (FORCE)')
            gone = await client.get("/ready")
            alive = await client.get("/health")
    assert gone.status_code == 503
    assert gone.json()["status"] == "unavailable"
    assert alive.status_code == 200  # liveness does not depend on the database


@pytest.mark.parametrize("policy", ["serve", "refuse"])
async def test_database_ahead_of_the_code(head_db: DatabaseTarget, settings_for: SettingsFor, policy: str) -> None:
    # As after rolling back a deploy whose revision 999 had already been applied.
    await fetch(head_db, "UPDATE alembic_version SET version_num = '999'")
    settings = settings_for(head_db, schema_ahead=policy)
    if policy == "refuse":
        with pytest.raises(MigrationError, match="revision 999, which this code does not know"):
            await get(settings, "/health")
        return
    health, ready = await get(settings, "/health", "/ready")
    assert health == (200, {"status": "ok", "revision": "999"})
    assert ready[0] == 200
    assert await versions(head_db) == ["999"]  # nothing was touched


async def test_logs_one_line_per_revision_then_the_result_and_nothing_at_head(
    empty_db: DatabaseTarget, settings_for: SettingsFor, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(empty_db)
    with caplog.at_level(logging.INFO):
        await run_migrations(settings)
    lines = [r.getMessage() for r in caplog.records if r.name == "backend.migrations.runner"]
    *applied, result = lines
    assert len(applied) == int(SERVED), lines
    assert applied[0].startswith("applied revision 001 (Baseline schema")
    assert all(line.startswith("applied revision ") for line in applied)
    assert all(line.endswith(" ms") for line in applied)
    assert result.startswith(f"schema at revision {SERVED}")

    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        status = await run_migrations(settings)
    assert status.serves_code
    told = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert told == ([] if SERVED == HEAD else [next(m for m in told if m.startswith("post-deploy revision(s)"))])


async def test_running_in_process_keeps_the_service_logging_configuration(
    empty_db: DatabaseTarget, settings_for: SettingsFor
) -> None:
    root = logging.getLogger()
    handler = logging.NullHandler()
    root.addHandler(handler)
    service_logger = logging.getLogger("backend.some_module")
    before = (list(root.handlers), root.level, logging.getLogger("alembic").level)
    try:
        await run_migrations(settings_for(empty_db))
        assert (list(root.handlers), root.level, logging.getLogger("alembic").level) == before
        assert not service_logger.disabled
    finally:
        root.removeHandler(handler)


async def test_statement_caches_can_be_switched_off_for_pgbouncer(
    empty_db: DatabaseTarget, settings_for: SettingsFor
) -> None:
    for enabled in (True, False):
        async with lender_on(empty_db, settings_for(empty_db, db_statement_cache=enabled)) as lender:
            lease = Lease(lender)
            conn = await lease.connection()
            assert await conn.fetchval("SELECT 1") == 1
            name = await conn.fetchval("SELECT current_setting('application_name')")
            # asyncpg's own cache of prepared statements (PgBouncer in transaction mode breaks it).
            cached = conn._stmt_cache.get_max_size() > 0
            await lease.end(succeeded=True)
        assert cached is enabled
        assert name == "kraken-backend"


async def test_migrations_use_their_own_url_when_the_service_goes_through_a_pooler(
    empty_db: DatabaseTarget, settings_for: SettingsFor
) -> None:
    # DATABASE_URL points at a "pooler" that cannot take session locks (here: nothing at all);
    # MIGRATIONS_DATABASE_URL is the direct connection the migrations need.
    direct = empty_db.dsn
    pooled = f"postgresql://postgres@127.0.0.1:1/{empty_db.database}"
    settings = Settings.model_validate(
        {"DATABASE_URL": pooled, "MIGRATIONS_DATABASE_URL": direct, "db_connect_timeout": 0}
    )
    status = await run_migrations(settings)
    assert status.revision == SERVED
    assert await versions(empty_db) == [SERVED]
