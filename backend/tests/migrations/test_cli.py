"""The alembic commands the README promises, run as a user runs them (real processes, real database)."""

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from backend.config import PROJECT_ROOT
from backend.db.engine import connect
from backend.db.url import DatabaseTarget
from backend.migrations.lock import LOCK_KEY
from backend.tests import helpers
from backend.tests.helpers import (
    HEAD,
    NEXT,
    POST_DEPLOY_UPGRADE,
    SERVED_CURRENT,
    free_port,
    out,
    scratch_alembic,
    sql,
)

# New interpreters, a few seconds each: the CLI as a user starts it.
pytestmark = pytest.mark.slow


def run_alembic(*args: str, **options: Any) -> subprocess.CompletedProcess[str]:
    """The real program (``python -m alembic``): this module tests the CLI itself, from a new
    interpreter's start (its working directory, its exit codes, its FAILED lines)."""
    return helpers.run_alembic(*args, fresh=True, **options)


def test_current_and_history(head_db: DatabaseTarget) -> None:
    current = run_alembic("current", target=head_db)
    assert current.returncode == 0
    assert current.stdout.strip() == f"{HEAD} (head)"
    history = run_alembic("history", target=head_db)
    assert history.returncode == 0
    assert "<base> -> 001, Baseline schema" in history.stdout
    assert f"-> {HEAD} (head), " in history.stdout


@pytest.mark.parametrize(
    ("command", "shows"),
    [
        (["history"], "<base> -> 001, Baseline schema"),
        (["history", "-r", "001:002"], "001 -> 002, Integrity and lookups"),
        (["heads"], f"{HEAD} (head)"),
        (["branches"], ""),
        (["show", "001"], "Revision ID: 001"),
    ],
)
def test_listing_the_revisions_needs_no_database(command: list[str], shows: str) -> None:
    # Nothing listens on that port: a command that connected would fail with "connection refused".
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    result = run_alembic(*command, target=None, DATABASE_URL=nowhere)
    assert result.returncode == 0, out(result)
    assert shows in result.stdout
    assert "FAILED" not in out(result)


async def test_current_and_check_answer_while_a_migration_holds_the_lock(head_db: DatabaseTarget) -> None:
    holder = await connect(head_db, "long-index-build")
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
        # A command that waited for the lock would wait 10 minutes, past run_alembic's bound.
        current = await asyncio.to_thread(run_alembic, "current", target=head_db, KRAKEN_MIGRATION_LOCK_TIMEOUT="600")
        check = await asyncio.to_thread(run_alembic, "check", target=head_db, KRAKEN_MIGRATION_LOCK_TIMEOUT="600")
    finally:
        await holder.close()
    assert current.returncode == 0, out(current)
    assert current.stdout == f"{HEAD} (head)\n"
    # Who runs it, since when.
    [running] = [line for line in current.stderr.splitlines() if "a migration is running" in line]
    assert (
        f"the migration lock is held by pid {holder.get_server_pid()} (application_name 'long-index-build', "
    ) in running
    assert ", connected since " in running
    assert check.returncode == 0, out(check)
    assert "No new upgrade operations detected" in out(check)


def test_commands_work_from_backend_as_from_the_root(empty_db: DatabaseTarget) -> None:
    # The seed's docs and deploy script run them from backend/ (`cd backend && uv run alembic ...`).
    backend = PROJECT_ROOT / "backend"
    partway = run_alembic("upgrade", "006", target=empty_db, cwd=backend)
    assert partway.returncode == 0, out(partway)
    assert "Running upgrade  -> 001" in out(partway)
    # alembic check compares with a database at head.
    assert "Target database is not up to date" in out(run_alembic("check", target=empty_db, cwd=backend))
    upgraded = run_alembic("upgrade", "head", target=empty_db, cwd=backend)
    assert upgraded.returncode == 0, out(upgraded)
    current = run_alembic("current", target=empty_db, cwd=backend)
    assert current.stdout.strip() == SERVED_CURRENT  # the pre-deploy phase (007, then 008)
    post = run_alembic(*POST_DEPLOY_UPGRADE, target=empty_db, cwd=backend)  # as .ci/run does
    assert post.returncode == 0, out(post)
    assert run_alembic("current", target=empty_db, cwd=backend).stdout.strip() == f"{HEAD} (head)"
    assert run_alembic("check", target=empty_db, cwd=backend).returncode == 0
    offline = [run_alembic("upgrade", "base:001", "--sql", target=None, cwd=cwd) for cwd in (PROJECT_ROOT, backend)]
    assert offline[0].returncode == offline[1].returncode == 0
    assert offline[0].stdout == offline[1].stdout


def test_check_reports_nothing_to_generate_at_head(head_db: DatabaseTarget) -> None:
    result = run_alembic("check", target=head_db)
    assert result.returncode == 0, out(result)
    assert "No new upgrade operations detected" in out(result)


def test_check_fails_when_the_schema_drifts_from_the_models(head_db: DatabaseTarget) -> None:
    sql(head_db, "DROP INDEX ix_kraken_turns_created_at")
    result = run_alembic("check", target=head_db)
    assert result.returncode != 0
    assert "ix_kraken_turns_created_at" in out(result)


def test_offline_sql_needs_no_database(tmp_path: Path) -> None:
    pgdata = tmp_path / "never-created"
    result = run_alembic("upgrade", "head", "--sql", target=None, KRAKEN_EMBEDDED_PGDATA=str(pgdata))
    assert result.returncode == 0, out(result)
    for table in ("kraken_conversations", "kraken_turns", "kraken_tool_calls"):
        assert f'CREATE TABLE IF NOT EXISTS "{table}"' in result.stdout
    assert "INSERT INTO alembic_version (version_num) VALUES ('001')" in result.stdout
    assert not pgdata.exists()  # no embedded server was started


def test_revision_is_numbered_after_the_head_and_formatted(tmp_path: Path, empty_db: DatabaseTarget) -> None:
    ini = scratch_alembic(tmp_path)
    result = run_alembic("revision", "-m", "add foo", target=empty_db, config=ini)
    assert result.returncode == 0, out(result)
    created = tmp_path / "alembic" / "versions" / f"{NEXT}_add_foo.py"
    assert created.exists(), sorted(p.name for p in (tmp_path / "alembic" / "versions").iterdir())
    source = created.read_text()
    assert f'revision: str = "{NEXT}"' in source
    assert f'down_revision: str | None = "{HEAD}"' in source
    assert "def upgrade() -> None:" in source
    # The post-write hooks ran: the file is already as ruff formats it.
    formatted = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "--quiet", str(created)], capture_output=True, text=True
    )
    assert formatted.returncode == 0, formatted.stdout + formatted.stderr


def test_autogenerate_writes_the_difference_or_nothing(tmp_path: Path, head_db: DatabaseTarget) -> None:
    ini = scratch_alembic(tmp_path)
    versions = tmp_path / "alembic" / "versions"
    real = PROJECT_ROOT / "backend" / "alembic" / "versions"

    unchanged = run_alembic("revision", "--autogenerate", "-m", "nothing", target=head_db, config=ini)
    assert unchanged.returncode == 0, out(unchanged)
    assert "no revision file written" in out(unchanged)
    assert sorted(p.name for p in versions.glob("*.py")) == sorted(p.name for p in real.glob("*.py"))

    sql(head_db, "DROP INDEX ix_kraken_conversations_session_id")
    changed = run_alembic("revision", "--autogenerate", "-m", "restore index", target=head_db, config=ini)
    assert changed.returncode == 0, out(changed)
    source = (versions / f"{NEXT}_restore_index.py").read_text()
    # Written with the lock-safe helpers (test_autogenerate.py has the rest).
    assert (
        'ops.create_index_concurrently("ix_kraken_conversations_session_id", "kraken_conversations", ["session_id"])'
        in (source)
    )
    assert "op.create_index" not in source


def test_deploy_migrations_need_no_api_key_in_production(empty_db: DatabaseTarget) -> None:
    # The deploy runs `alembic upgrade head` on the host; only the HTTP service needs KRAKEN_API_KEY.
    result = run_alembic("upgrade", "head", target=empty_db, KRAKEN_ENV="production")
    assert result.returncode == 0, out(result)
    assert sql(empty_db, "SELECT count(*) FROM alembic_version")[0][0] == 1


def test_upgrade_on_a_database_ahead_of_the_code(head_db: DatabaseTarget) -> None:
    # Rolling a deploy back: the pipeline's `alembic upgrade head` must not stop the rollback.
    sql(head_db, "UPDATE alembic_version SET version_num = '999'")
    served = run_alembic("upgrade", "head", target=head_db)
    assert served.returncode == 0, out(served)
    assert "revision 999, which this code does not know; nothing to upgrade" in out(served)
    refused = run_alembic("upgrade", "head", target=head_db, KRAKEN_SCHEMA_AHEAD="refuse")
    assert refused.returncode != 0
    assert [line for line in out(refused).splitlines() if line.startswith("FAILED")] == [
        "FAILED: database schema is at revision 999, which this code does not know; refusing to upgrade"
        " (KRAKEN_SCHEMA_AHEAD=refuse)"
    ]
    assert sql(head_db, "SELECT version_num FROM alembic_version")[0][0] == "999"


FAILING = """
    from alembic import op

    revision = "{next}"
    down_revision = "{head}"
    branch_labels = None
    depends_on = None


    def upgrade():
        op.execute("CREATE TABLE kraken_never (id int)")
        op.execute("SELECT 1 / 0")


    def downgrade():
        pass
"""


def test_a_failing_revision_is_one_line_and_rolled_back(tmp_path: Path, head_db: DatabaseTarget) -> None:
    ini = scratch_alembic(tmp_path, {f"{NEXT}_failing.py": FAILING.format(next=NEXT, head=HEAD)})
    result = run_alembic("-c", str(ini), "upgrade", "head", target=head_db)
    assert result.returncode != 0
    assert "Traceback" not in out(result)
    assert [line for line in out(result).splitlines() if line.startswith("FAILED")] == [
        "FAILED: a revision failed: division by zero (SQLSTATE 22012)"
    ]
    assert sql(head_db, "SELECT version_num FROM alembic_version")[0][0] == HEAD
    assert sql(head_db, "SELECT to_regclass('kraken_never') IS NULL")[0][0]


OWN_LOCK_TIMEOUT = """
    from alembic import op

    revision = "{rev}"
    down_revision = "{down}"
    branch_labels = None
    depends_on = None


    def upgrade():
        {set_local}
        op.execute("CREATE TABLE IF NOT EXISTS kraken_seen (revision text, lock_timeout text, statement_timeout text)")
        op.execute(
            "INSERT INTO kraken_seen"
            " VALUES ('{rev}', current_setting('lock_timeout'), current_setting('statement_timeout'))"
        )


    def downgrade():
        pass
"""


def test_a_revision_may_set_its_own_lock_timeout(tmp_path: Path, head_db: DatabaseTarget) -> None:
    second = f"{int(NEXT) + 1:03d}"
    ini = scratch_alembic(
        tmp_path,
        {
            f"{NEXT}_own.py": OWN_LOCK_TIMEOUT.format(
                rev=NEXT, down=HEAD, set_local="op.execute(\"SET LOCAL lock_timeout = '42s'\")"
            ),
            f"{second}_default.py": OWN_LOCK_TIMEOUT.format(rev=second, down=NEXT, set_local="pass"),
        },
    )
    result = run_alembic(
        "-c",
        str(ini),
        "upgrade",
        "head",
        target=head_db,
        KRAKEN_DDL_LOCK_TIMEOUT="3",
        KRAKEN_DDL_STATEMENT_TIMEOUT="90",
    )
    assert result.returncode == 0, out(result)
    seen = dict(sql(head_db, "SELECT revision, lock_timeout FROM kraken_seen"))
    # SET LOCAL lasts for that revision's transaction; the next one is back at the configured bound.
    assert seen == {NEXT: "42s", second: "3s"}
    # statement_timeout is the configured bound in every revision.
    assert {r[0] for r in sql(head_db, "SELECT DISTINCT statement_timeout FROM kraken_seen")} == {"90s"}


def test_a_tiny_lock_timeout_is_one_millisecond_not_none(tmp_path: Path, head_db: DatabaseTarget) -> None:
    ini = scratch_alembic(tmp_path, {f"{NEXT}_seen.py": OWN_LOCK_TIMEOUT.format(rev=NEXT, down=HEAD, set_local="pass")})
    # int(0.0004 * 1000) was 0: PostgreSQL's "wait forever".
    result = run_alembic("-c", str(ini), "upgrade", "head", target=head_db, KRAKEN_DDL_LOCK_TIMEOUT="0.0004")
    assert result.returncode == 0, out(result)
    assert sql(head_db, "SELECT lock_timeout FROM kraken_seen") == [("1ms",)]
    offline = run_alembic("upgrade", "base:001", "--sql", target=None, KRAKEN_DDL_LOCK_TIMEOUT="0.0004")
    assert "SET lock_timeout = '1ms';" in offline.stdout
