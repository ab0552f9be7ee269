"""Writing a revision: apply it, edit it, downgrade it, apply it again, with no extra command on a
development database; a production database (KRAKEN_ENV=production, or a ledger that says the
revision shipped) still refuses the edited file. Real CLI processes, real database."""

from pathlib import Path

import pytest

from backend.db.url import DatabaseTarget
from backend.migrations.revisions import read_revisions
from backend.tests.helpers import HEAD, NEXT, out, run_alembic, run_kraken_migrations, scratch_alembic, sql

DRAFT = """
    from backend.migrations import ops

    revision = "{next}"
    down_revision = "{head}"
    branch_labels = None
    depends_on = None


    def upgrade():
        ops.create_table("kraken_ratings", {{"id": "bigint GENERATED ALWAYS AS IDENTITY", "rating": "smallint"}})


    def downgrade():
        ops.drop_table("kraken_ratings")
"""
FILE = f"{NEXT}_feedback.py"


def draft(tmp_path: Path) -> Path:
    return scratch_alembic(tmp_path, {FILE: DRAFT.format(next=NEXT, head=HEAD)})


def edit_draft(ini: Path, column: str) -> str:
    """Add a column to the draft; its new checksum."""
    path = ini.parent / "alembic" / "versions" / FILE
    path.write_text(path.read_text().replace('"rating": "smallint"', f'"rating": "smallint", "{column}": "text"'))
    read_revisions.cache_clear()
    return read_revisions(ini.parent / "alembic").by_revision[NEXT].checksum


def alembic(ini: Path, db: DatabaseTarget, *args: str, env: str = "development") -> str:
    result = run_alembic("-c", str(ini), *args, target=db, KRAKEN_ENV=env)
    assert result.returncode == 0, out(result)
    return out(result)


def refused(ini: Path, db: DatabaseTarget, *args: str, env: str = "development") -> list[str]:
    result = run_alembic("-c", str(ini), *args, target=db, KRAKEN_ENV=env)
    assert result.returncode != 0, out(result)
    return [line for line in out(result).splitlines() if line.startswith("FAILED")]


def columns(db: DatabaseTarget) -> list[str]:
    query = "SELECT attname::text FROM pg_attribute WHERE attrelid = 'kraken_ratings'::regclass AND attnum > 0"
    return sorted(r[0] for r in sql(db, query))


def test_edit_downgrade_and_apply_again_on_a_development_database(tmp_path: Path, empty_db: DatabaseTarget) -> None:
    ini = draft(tmp_path)
    alembic(ini, empty_db, "upgrade", "head")
    edit_draft(ini, "comment")

    downgraded = alembic(ini, empty_db, "downgrade", "-1")
    assert f"revision {NEXT} ({FILE}) changed since it was applied on " in downgraded
    assert f"; carrying on: a development database, and {NEXT} has not shipped" in downgraded
    assert sql(empty_db, "SELECT to_regclass('kraken_ratings') IS NULL")[0][0]
    applied = alembic(ini, empty_db, "upgrade", "head")
    assert "changed since it was applied" not in applied  # the new file is the one on record now
    assert columns(empty_db) == ["comment", "id", "rating"]
    # Editing again while applied: upgrade head (nothing to do) and validate say so, and pass.
    edit_draft(ini, "note")
    assert "has not shipped" in alembic(ini, empty_db, "upgrade", "head")
    validated = run_kraken_migrations("validate", target=empty_db, config=ini)
    assert validated.returncode == 0, out(validated)
    assert f"; carrying on: a development database, and {NEXT} has not shipped" in validated.stdout


def test_production_still_refuses_an_edited_applied_revision(tmp_path: Path, empty_db: DatabaseTarget) -> None:
    ini = draft(tmp_path)
    alembic(ini, empty_db, "upgrade", "head")
    recorded = read_revisions(ini.parent / "alembic").by_revision[NEXT].checksum
    now = edit_draft(ini, "comment")
    [line] = refused(ini, empty_db, "downgrade", "-1", env="production")
    assert line.startswith(f"FAILED: revision {NEXT} ({FILE}) changed since it was applied on ")
    assert line.endswith(
        f": checksum {recorded[:12]} recorded, {now[:12]} now; undo the edit, or accept the file as it is with "
        "'uv run kraken-migrations repair' (KRAKEN_MIGRATION_VALIDATE=error)"
    )
    validated = run_kraken_migrations("validate", target=empty_db, config=ini, KRAKEN_ENV="production")
    assert validated.returncode == 1
    assert sql(empty_db, "SELECT to_regclass('kraken_ratings') IS NOT NULL")[0][0]


@pytest.mark.parametrize(
    "shipped_by",
    [
        "a run with KRAKEN_ENV=production",
        "SQL applied by hand",  # its rows record no environment
        "a run before environments were recorded",
    ],
)
def test_a_revision_the_ledger_says_shipped_is_refused_in_development_too(
    tmp_path: Path, empty_db: DatabaseTarget, shipped_by: str
) -> None:
    ini = draft(tmp_path)
    if shipped_by == "a run with KRAKEN_ENV=production":
        alembic(ini, empty_db, "upgrade", "head", env="production")
    else:
        alembic(ini, empty_db, "upgrade", "head")
        sql(empty_db, "UPDATE alembic_ledger SET environment = NULL")
    if shipped_by == "a run before environments were recorded":
        sql(empty_db, "ALTER TABLE alembic_ledger DROP COLUMN environment")  # the next run adds it back
    edit_draft(ini, "comment")
    [line] = refused(ini, empty_db, "downgrade", "-1")
    assert line.startswith(f"FAILED: revision {NEXT} ({FILE}) changed since it was applied on ")
    assert line.endswith("(KRAKEN_MIGRATION_VALIDATE=error)")
    # Downgraded and applied again in development, it has still shipped: this database knows it did.
    edit_draft(ini, "rating_note")  # undo is not needed to see it: repair, then the loop
    assert run_kraken_migrations("repair", target=empty_db, config=ini).returncode == 0
    alembic(ini, empty_db, "downgrade", "-1")
    alembic(ini, empty_db, "upgrade", "head")
    edit_draft(ini, "other")
    assert len(refused(ini, empty_db, "downgrade", "-1")) == 1


def test_rows_record_the_environment_that_ran_them(tmp_path: Path, empty_db: DatabaseTarget) -> None:
    ini = draft(tmp_path)
    alembic(ini, empty_db, "upgrade", HEAD, env="production")
    alembic(ini, empty_db, "upgrade", "head")
    found = sql(empty_db, "SELECT revision, environment FROM alembic_ledger WHERE direction = 'upgrade' ORDER BY id")
    assert [tuple(r) for r in found][-2:] == [(HEAD, "production"), (NEXT, "development")]
