"""Least privilege (issue 20): the two-role setup of docs/production-postgresql.md, run as written.

The docs' SQL blocks are read from the doc itself (so they cannot drift from what is tested) and run
with this run's own role and database names: an owner that migrates through `alembic upgrade head`
in a subprocess (MIGRATIONS_DATABASE_URL), and a service role that the app serves the API as, with
KRAKEN_MIGRATE_ON_STARTUP=check. A table a later revision creates is the service's without a
GRANT; without the default privileges it is not, and the boot says so in one line.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import asyncpg
import pytest

from backend.config import PROJECT_ROOT, Settings
from backend.db.url import DatabaseTarget
from backend.main import create_app
from backend.migrations.runner import MigrationError
from backend.models import Base
from backend.tests.helpers import (
    API_KEY,
    CONVERSATION,
    HEAD,
    NEXT,
    POST_DEPLOY_UPGRADE,
    RUN_ID,
    fenced_blocks,
    fetch,
    live,
    out,
    run_alembic,
    scratch_alembic,
    sql,
    turn_body,
    url_of,
)

DOC = PROJECT_ROOT / "docs" / "production-postgresql.md"
# Each SQL block of the section, by its first line (a comment saying where it runs).
ADMIN = "-- as an administrator, connected to any database"
IN_DATABASE = "-- as an administrator, connected to the database kraken"
EXISTING = "-- once, for the tables that exist already"
DEFAULT_PRIVILEGES = "ALTER DEFAULT PRIVILEGES"
WINDOW = {"from": "2000-01-01", "to": "2100-01-01"}
# A later revision's table, with a serial column: its sequence must be the service's too (nextval
# checks the caller's USAGE on it; an identity column's does not).
PROBE = "kraken_least_privilege_probe"


def doc_sql() -> dict[str, str]:
    """The doc's ``sql`` blocks, keyed by their first line."""
    found = {body[0]: "\n".join(body) for info, _, body in fenced_blocks(DOC) if info == "sql"}
    assert {ADMIN, IN_DATABASE, EXISTING} <= found.keys(), f"{DOC} no longer has the SQL blocks this test runs"
    return found


def statements(block: str) -> list[str]:
    """A block's statements as psql runs them: one at a time (CREATE DATABASE cannot share a
    transaction), comments left out."""
    text = "\n".join(line for line in block.splitlines() if not line.lstrip().startswith("--"))
    return [statement.strip() for statement in text.split(";") if statement.strip()]


@dataclass(frozen=True)
class TwoRoles:
    admin: DatabaseTarget  # the tests' own superuser, connected to the kraken database
    owner: DatabaseTarget
    service: DatabaseTarget

    async def run(self, block: str, *, as_admin_of: DatabaseTarget | None = None) -> None:
        """Run one of the doc's blocks with this run's names, statement by statement."""
        names = {
            r"\bkraken_owner\b": self.owner.user,
            r"\bkraken_service\b": self.service.user,
            r"\bkraken\b": self.admin.database,
            r"'owner-password'": f"'{self.owner.password}'",
            r"'service-password'": f"'{self.service.password}'",
        }
        for statement in statements(block):
            for pattern, name in names.items():
                statement = re.sub(pattern, str(name), statement)
            await fetch(as_admin_of or self.admin, statement)


def two_roles_setup(server: DatabaseTarget, *, default_privileges: bool) -> Iterator[TwoRoles]:
    """The doc's first two blocks (those lines of the second that set the default privileges only
    when ``default_privileges``), on names of this run; everything dropped at the end."""
    tag = f"{RUN_ID}_{secrets.token_hex(3)}"
    database = f"kraken_test_{tag}_lp"
    roles = TwoRoles(
        admin=server.with_database(database),
        owner=replace(server.with_database(database), user=f"kraken_owner_{tag}", password=secrets.token_hex(8)),
        service=replace(server.with_database(database), user=f"kraken_service_{tag}", password=secrets.token_hex(8)),
    )
    blocks = doc_sql()
    in_database = blocks[IN_DATABASE]
    if not default_privileges:
        # Each ALTER DEFAULT PRIVILEGES statement spans two lines: the doc's, without them.
        in_database = ";".join(s for s in in_database.split(";") if DEFAULT_PRIVILEGES not in s)
        assert DEFAULT_PRIVILEGES not in in_database
    try:
        asyncio.run(roles.run(blocks[ADMIN], as_admin_of=server))
        asyncio.run(roles.run(in_database))
        yield roles
    finally:
        sql(server, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        for role in (roles.service.user, roles.owner.user):
            sql(server, f'DROP ROLE IF EXISTS "{role}"')


@pytest.fixture
def two_roles(server: DatabaseTarget) -> Iterator[TwoRoles]:
    yield from two_roles_setup(server, default_privileges=True)


@pytest.fixture
def without_default_privileges(server: DatabaseTarget) -> Iterator[TwoRoles]:
    yield from two_roles_setup(server, default_privileges=False)


def migrate(roles: TwoRoles, *args: str, config: Path | None = None) -> None:
    """The deploy pipeline's step: alembic as the owner (MIGRATIONS_DATABASE_URL), with the service's
    DATABASE_URL beside it as on a host that has both."""
    result = run_alembic(*args, target=roles.service, config=config, MIGRATIONS_DATABASE_URL=url_of(roles.owner))
    assert result.returncode == 0, out(result)


def later_revision(directory: Path) -> Path:
    """A scratch copy of the package with a revision after head that creates a table."""
    return scratch_alembic(
        directory,
        {
            f"{NEXT}_probe.py": f'''
            """A table a later release adds."""
            from alembic import op

            revision = "{NEXT}"
            down_revision = "{HEAD}"


            def upgrade() -> None:
                op.execute("CREATE TABLE {PROBE} (id serial PRIMARY KEY, note text)")


            def downgrade() -> None:
                op.execute("DROP TABLE {PROBE}")
            '''
        },
    )


async def tables(target: DatabaseTarget) -> list[str]:
    rows = await fetch(target, "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename")
    return [row[0] for row in rows]


async def privileges(target: DatabaseTarget, table: str) -> dict[str, bool]:
    """What the role of ``target`` may do to ``table``."""
    kinds = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
    [row] = await fetch(
        target, "SELECT " + ", ".join(f"has_table_privilege($1::regclass, '{kind}')" for kind in kinds), table
    )
    return dict(zip(kinds, row, strict=True))


DML = {"SELECT": True, "INSERT": True, "UPDATE": True, "DELETE": True}
NO_MORE = {"TRUNCATE": False, "REFERENCES": False, "TRIGGER": False}


async def refuses_ddl(service: DatabaseTarget) -> None:
    """The service's role creates nothing, alters nothing, and has no temporary tables."""
    for statement in (
        "CREATE TABLE kraken_not_the_service_s (id int)",
        "CREATE TEMPORARY TABLE kraken_not_even_temporary (id int)",
        "ALTER TABLE kraken_conversations ADD COLUMN not_the_service_s int",
        "TRUNCATE kraken_turns",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await fetch(service, statement)


async def test_the_service_role_serves_the_api_and_owns_no_ddl(
    two_roles: TwoRoles, tmp_path: Path, settings_for: Callable[..., Settings]
) -> None:
    # The service's role cannot migrate, and says why in one line: by the CLI, or booting in the
    # default upgrade mode; nothing is left behind.
    refused = run_alembic("upgrade", "head", target=two_roles.service)
    assert refused.returncode != 0
    [failed] = [line for line in out(refused).splitlines() if line.startswith("FAILED:")]
    assert "permission denied for schema public (SQLSTATE 42501); migrations run as the role that owns" in failed
    with pytest.raises(MigrationError, match=r"boots with KRAKEN_MIGRATE_ON_STARTUP=check$") as booted:
        async with live(create_app(settings_for(two_roles.service, api_key=API_KEY))):
            pass
    assert "\n" not in str(booted.value)
    assert await tables(two_roles.admin) == []

    migrate(two_roles, "upgrade", "head")
    # Every table the migrations made is the owner's, and the service's to read and write (the
    # catalog's list, not this test's: later revisions' tables are counted as they come).
    found = await tables(two_roles.admin)
    assert {table.name for table in Base.metadata.sorted_tables} <= set(found)
    owners = await fetch(two_roles.admin, "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'")
    assert [row[0] for row in owners] == [two_roles.owner.user]
    for table in found:
        assert await privileges(two_roles.service, table) == {**DML, **NO_MORE}, table
    await refuses_ddl(two_roles.service)

    settings = settings_for(two_roles.service, api_key=API_KEY, migrate_on_startup="check")
    async with live(create_app(settings)) as client:
        ready = await client.get("/ready")
        assert ready.status_code == 200, ready.text
        created = await client.post("/conversations", json=CONVERSATION)
        assert created.status_code == 201, created.text
        conversation = created.json()["id"]
        appended = await client.post(f"/conversations/{conversation}/turns", json=turn_body())
        assert appended.status_code == 201, appended.text
        listed = await client.get("/conversations", params={"session_id": CONVERSATION["session_id"]})
        assert [c["id"] for c in listed.json()["items"]] == [conversation]
        [group] = (await client.get("/usage", params=WINDOW)).json()["groups"]
        assert group["turns"] == 1
        user = await client.post("/users", json={"name": "ada"})
        assert user.status_code == 201, user.text
        as_user = {"Authorization": f"Bearer {user.json()['api_key']}"}
        hers = await client.post("/conversations", json=CONVERSATION, headers=as_user)
        assert hers.status_code == 201, hers.text
        theirs = await client.get("/conversations", params={"session_id": CONVERSATION["session_id"]}, headers=as_user)
        assert [c["id"] for c in theirs.json()["items"]] == [hers.json()["id"]]
        assert (await client.delete(f"/conversations/{conversation}")).status_code == 204

    # The pipeline's post-deploy phase, as the owner too (nothing pending, or a trailing revision).
    migrate(two_roles, *POST_DEPLOY_UPGRADE)

    # A later release's revision, applied by the owner: its table (and its serial's sequence) is
    # the service's at once, with no GRANT anywhere.
    migrate(two_roles, "upgrade", "head", config=later_revision(tmp_path))
    assert await privileges(two_roles.service, PROBE) == {**DML, **NO_MORE}
    [row] = await fetch(two_roles.service, f"INSERT INTO {PROBE} (note) VALUES ('first') RETURNING id")
    await fetch(two_roles.service, f"UPDATE {PROBE} SET note = 'changed' WHERE id = $1", row["id"])
    assert [tuple(r) for r in await fetch(two_roles.service, f"SELECT id, note FROM {PROBE}")] == [
        (row["id"], "changed")
    ]
    await fetch(two_roles.service, f"DELETE FROM {PROBE}")


async def test_without_the_default_privileges_new_tables_are_not_the_service_s(
    without_default_privileges: TwoRoles, tmp_path: Path, settings_for: Callable[..., Settings]
) -> None:
    roles = without_default_privileges
    migrate(roles, "upgrade", "head")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await fetch(roles.service, "SELECT count(*) FROM kraken_conversations")
    # The boot says which grant is missing, in one line, rather than a traceback or a 500 later.
    settings = settings_for(roles.service, api_key=API_KEY, migrate_on_startup="check")
    with pytest.raises(
        MigrationError,
        match=rf"^role {roles.service.user} may not read the migrations' tables: permission denied for table alembic_",
    ) as refused:
        async with live(create_app(settings)):
            pass
    assert "\n" not in str(refused.value)
    assert "production-postgresql.md" in str(refused.value)

    # The doc's one-time grant makes the tables that exist the service's ...
    await roles.run(doc_sql()[EXISTING])
    for table in await tables(roles.admin):
        assert await privileges(roles.service, table) == {**DML, **NO_MORE}, table
    async with live(create_app(settings)) as client:
        assert (await client.post("/conversations", json=CONVERSATION)).status_code == 201
    # ... but not those a later revision creates: that is what the default privileges are for.
    migrate(roles, "upgrade", "head", config=later_revision(tmp_path))
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await fetch(roles.service, f"SELECT * FROM {PROBE}")
