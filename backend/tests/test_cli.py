"""The alembic commands the README promises, run as a user runs them (real processes, real database)."""

import subprocess
import sys
from pathlib import Path

from backend.config import PROJECT_ROOT
from backend.db_url import DatabaseTarget
from backend.tests.conftest import HEAD, NEXT, out, run_alembic, scratch_alembic, sql


def test_current_and_history(empty_db: DatabaseTarget) -> None:
    assert run_alembic("upgrade", "head", target=empty_db).returncode == 0
    current = run_alembic("current", target=empty_db)
    assert current.returncode == 0
    assert current.stdout.strip() == f"{HEAD} (head)"
    history = run_alembic("history", target=empty_db)
    assert history.returncode == 0
    assert "<base> -> 001, Baseline schema" in history.stdout
    assert f"-> {HEAD} (head), " in history.stdout


def test_check_reports_nothing_to_generate_at_head(empty_db: DatabaseTarget) -> None:
    assert run_alembic("upgrade", "head", target=empty_db).returncode == 0
    result = run_alembic("check", target=empty_db)
    assert result.returncode == 0, out(result)
    assert "No new upgrade operations detected" in out(result)


def test_check_fails_when_the_schema_drifts_from_the_models(empty_db: DatabaseTarget) -> None:
    assert run_alembic("upgrade", "head", target=empty_db).returncode == 0
    sql(empty_db, "DROP INDEX ix_kraken_turns_conversation_id")
    result = run_alembic("check", target=empty_db)
    assert result.returncode != 0
    assert "ix_kraken_turns_conversation_id" in out(result)


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


def test_autogenerate_writes_the_difference_or_nothing(tmp_path: Path, empty_db: DatabaseTarget) -> None:
    ini = scratch_alembic(tmp_path)
    versions = tmp_path / "alembic" / "versions"
    real = PROJECT_ROOT / "backend" / "alembic" / "versions"
    assert run_alembic("upgrade", "head", target=empty_db, config=ini).returncode == 0

    unchanged = run_alembic("revision", "--autogenerate", "-m", "nothing", target=empty_db, config=ini)
    assert unchanged.returncode == 0, out(unchanged)
    assert "no revision file written" in out(unchanged)
    assert sorted(p.name for p in versions.glob("*.py")) == sorted(p.name for p in real.glob("*.py"))

    sql(empty_db, "DROP INDEX ix_kraken_conversations_session_id")
    changed = run_alembic("revision", "--autogenerate", "-m", "restore index", target=empty_db, config=ini)
    assert changed.returncode == 0, out(changed)
    source = (versions / f"{NEXT}_restore_index.py").read_text()
    assert "ix_kraken_conversations_session_id" in source
    assert "op.create_index" in source


def test_deploy_migrations_need_no_api_key_in_production(empty_db: DatabaseTarget) -> None:
    # The deploy runs `alembic upgrade head` on the host; only the HTTP service needs KRAKEN_API_KEY.
    result = run_alembic("upgrade", "head", target=empty_db, KRAKEN_ENV="production")
    assert result.returncode == 0, out(result)
    assert sql(empty_db, "SELECT count(*) FROM alembic_version")[0][0] == 1
