"""`uv run kraken-migrations lint`: squawk on the revisions' offline SQL, as CI runs it (real
processes, no database), waivers listed with their reasons, and checks placed after a commit
caught before any database sees the revision."""

from pathlib import Path

from backend.config import PROJECT_ROOT
from backend.db.url import DatabaseTarget
from backend.tests.helpers import HEAD, NEXT, out, run_alembic, run_kraken_migrations, scratch_alembic, sql

NEW_TABLES = """
    from backend.migrations import ops

    revision = "{next}"
    down_revision = "{head}"
    branch_labels = None
    depends_on = None


    def upgrade():
        {waiver}
        ops.create_table(
            "kraken_ratings",
            {{
                "id": "bigint GENERATED ALWAYS AS IDENTITY",
                "turn_id": "uuid NOT NULL",
                "comment": "{comment_type}",
                "created_at": "{time_type} NOT NULL DEFAULT now()",
            }},
            primary_key=["id"],
            indexes={{"ix_kraken_ratings_turn_id": ["turn_id"]}},
            foreign_keys=[
                ops.ForeignKey("kraken_ratings_turn_id_fkey", ["turn_id"], "kraken_turns", on_delete="CASCADE"),
            ],
        )


    def downgrade():
        ops.drop_table("kraken_ratings")
"""


def new_tables(tmp_path: Path, *, comment_type: str, time_type: str, waiver: str = "pass") -> Path:
    source = NEW_TABLES.format(next=NEXT, head=HEAD, comment_type=comment_type, time_type=time_type, waiver=waiver)
    return scratch_alembic(tmp_path, {f"{NEXT}_feedback.py": source})


def failed_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("FAILED")]


def test_every_revision_of_the_tree_passes_and_002_lists_its_waivers() -> None:
    result = run_kraken_migrations("lint", target=None)
    assert result.returncode == 0, out(result)
    for revision in sorted(path.name[:3] for path in (PROJECT_ROOT / "backend/alembic/versions").glob("0*.py")):
        assert f"{revision}: ok" in result.stdout
    assert (
        '002: waives ban-drop-constraint (no reason given), line 238: ALTER TABLE "kraken_turns" DROP CONSTRAINT'
        in result.stdout
    )


def test_a_new_table_of_the_preferred_types_passes(tmp_path: Path) -> None:
    ini = new_tables(tmp_path, comment_type="text", time_type="timestamptz")
    result = run_kraken_migrations("lint", NEXT, target=None, config=ini)
    assert result.returncode == 0, out(result)
    assert result.stdout.splitlines()[-1] == f"{NEXT}: ok"
    assert f"{HEAD}: ok" not in result.stdout  # only the revision asked for


def test_varchar_and_timestamp_in_a_new_table_fail_with_one_line(tmp_path: Path) -> None:
    ini = new_tables(tmp_path, comment_type="varchar(500)", time_type="timestamp")
    result = run_kraken_migrations("lint", "head", target=None, config=ini)
    assert result.returncode == 1, out(result)
    assert "prefer-text-field" in result.stdout
    assert "prefer-timestamp-tz" in result.stdout
    assert failed_lines(out(result)) == [
        f"FAILED: squawk found problems in the offline SQL of revision(s) {NEXT}: fix the statements, "
        "or waive a rule for one statement with ops.waive(rule, reason=...) just before it"
    ]


def test_a_waiver_passes_lint_and_is_listed_with_its_reason(tmp_path: Path) -> None:
    waiver = 'ops.waive("prefer-text-field", reason="the old client reads at most 500 characters")'
    ini = new_tables(tmp_path, comment_type="varchar(500)", time_type="timestamptz", waiver=waiver)
    result = run_kraken_migrations("lint", NEXT, target=None, config=ini)
    assert result.returncode == 0, out(result)
    assert (
        f"{NEXT}: waives prefer-text-field (reason: the old client reads at most 500 characters), line "
        in result.stdout
    )
    assert 'CREATE TABLE IF NOT EXISTS "kraken_ratings" (' in result.stdout


CHECK_AFTER_A_COMMIT = """
    from backend.migrations import ops

    revision = "{next}"
    down_revision = "{head}"
    branch_labels = None
    depends_on = None


    def upgrade():
        ops.add_columns("kraken_turns", {{"rating": "smallint"}})
        ops.refuse_violations(revision, [ops.Rule.check("kraken_turns", "input_tokens < 1000000")])


    def downgrade():
        pass
"""


def test_a_check_after_a_commit_fails_the_lint_before_any_database_runs_it(tmp_path: Path) -> None:
    ini = scratch_alembic(tmp_path, {f"{NEXT}_late_check.py": CHECK_AFTER_A_COMMIT.format(next=NEXT, head=HEAD)})
    result = run_kraken_migrations("lint", NEXT, target=None, config=ini)
    assert result.returncode == 2, out(result)
    assert failed_lines(out(result)) == [
        f"FAILED: revision {NEXT}'s offline SQL: ops.refuse_violations() would run after revision {NEXT} already "
        "committed a step (ops.add_columns() commits): a refusal there would leave the database changed; move "
        "the check before the first change"
    ]


def test_a_check_after_a_commit_stops_an_upgrade_in_one_line(tmp_path: Path, empty_db: DatabaseTarget) -> None:
    ini = scratch_alembic(tmp_path, {f"{NEXT}_late_check.py": CHECK_AFTER_A_COMMIT.format(next=NEXT, head=HEAD)})
    result = run_alembic("-c", str(ini), "upgrade", "head", target=empty_db)
    assert result.returncode != 0
    assert failed_lines(out(result)) == [
        f"FAILED: ops.refuse_violations() would run after revision {NEXT} already committed a step "
        "(ops.add_columns() commits): a refusal there would leave the database changed; move the check before "
        "the first change"
    ]
    assert sql(empty_db, "SELECT version_num FROM alembic_version")[0][0] == HEAD


def test_an_unknown_revision_is_one_line() -> None:
    result = run_kraken_migrations("lint", "999", target=None)
    assert result.returncode == 2
    known = ", ".join(f"{n:03d}" for n in range(1, int(HEAD) + 1))
    assert failed_lines(out(result)) == [f"FAILED: no revision 999 in the script directory (there are {known})"]


def test_ci_lints_through_the_same_command() -> None:
    # One definition of what squawk reads and is told: CI calls the command developers run.
    script = (PROJECT_ROOT / ".ci" / "run").read_text()
    assert "uv run squawk" not in script
    assert "uv run kraken-migrations lint\n" in script
