"""The migration ledger: every step recorded, applied revisions validated against their files
before every run (CLI and boot), repair, adoption of databases from before the ledger."""

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from backend.config import Settings
from backend.db.engine import connect
from backend.db.url import DatabaseTarget
from backend.migrations import ledger
from backend.migrations.lock import LOCK_KEY
from backend.migrations.moments import when
from backend.migrations.revisions import Revisions, SchemaStatus, read_revisions
from backend.migrations.runner import MigrationError, check_schema, run_migrations
from backend.tests.helpers import (
    HEAD,
    NEXT,
    POST_DEPLOY_UPGRADE,
    RUN_MIGRATIONS,
    SERVED,
    SERVED_REVISIONS,
    execute_script,
    out,
    race,
    run_alembic,
    run_kraken_migrations,
    scratch_alembic,
    sql,
)

SettingsFor = Callable[..., Settings]
FILES = read_revisions().by_revision
REVISIONS = sorted(read_revisions().graph)  # 001, 002, ... in one line
PREVIOUS = {rev: ",".join(downs) for rev, downs in read_revisions().graph.items()}
ROWS = "SELECT revision, down_revisions, direction, checksum, success, error FROM alembic_ledger ORDER BY id"
REVISION_002 = "002_integrity_and_lookups.py"


def rows(db: DatabaseTarget, query: str = ROWS) -> list[tuple[object, ...]]:
    return [tuple(r) for r in sql(db, query)]


def upgraded(direction: str = "upgrade", revisions: list[str] = REVISIONS) -> list[tuple[object, ...]]:
    """The rows a successful step per revision leaves."""
    return [(rev, PREVIOUS[rev], direction, FILES[rev].checksum, True, None) for rev in revisions]


def migrate(db: DatabaseTarget, *args: str, config: Path | None = None) -> str:
    result = run_alembic(*(["-c", str(config)] if config else []), *args, target=db)
    assert result.returncode == 0, out(result)
    return out(result)


def failed_lines(result_output: str) -> list[str]:
    return [line for line in result_output.splitlines() if line.startswith("FAILED")]


def without_ledger(db: DatabaseTarget) -> None:
    """A database at head (``head_db``) as the code before the ledger left it: alembic_version, and no ledger."""
    sql(db, "DROP TABLE alembic_ledger")


def edit(ini: Path, filename: str, old: str, new: str) -> None:
    """Change a revision file of a scratch copy of the migration package."""
    path = ini.parent / "alembic" / "versions" / filename
    source = path.read_text()
    assert old in source
    path.write_text(source.replace(old, new, 1))


def run_migrations_at(
    db: DatabaseTarget, settings_for: SettingsFor, tmp_path: Path, **settings: object
) -> SchemaStatus:
    """The boot's run_migrations() on the scratch copy of the migration package in ``tmp_path``."""
    return asyncio.run(run_migrations(settings_for(db, **settings), script_location=tmp_path / "alembic"))


# An operation of 002 changed after it was applied: its index gets another column.
OPERATION_EDIT = ('("ix_kraken_conversations_started_at", CONVERSATIONS, ("started_at",))',
                  '("ix_kraken_conversations_started_at", CONVERSATIONS, ("started_at", "id"))')  # fmt: skip
# Only comments, docstrings and formatting changed.
COSMETIC_EDIT = (
    "def upgrade() -> None:\n    ops.refuse_violations(revision, RULES)",
    'def upgrade() -> None:\n    """Reworded later."""\n    # A comment added later.\n\n    ops.refuse_violations(\n'
    "        revision,\n        RULES,\n    )",
)
FOLLOWING = f'''
    from alembic import op

    revision = "{NEXT}"
    down_revision = "{HEAD}"
    branch_labels = None
    depends_on = None


    def upgrade():
        op.execute("CREATE TABLE kraken_following (id int)")


    def downgrade():
        op.execute("DROP TABLE kraken_following")
'''


# --- recording -------------------------------------------------------------------------------


def test_every_step_is_recorded_with_who_ran_it(empty_db: DatabaseTarget) -> None:
    # Two runs, one per phase: the pre-deploy phase to 006 (the release before 007), then the
    # post-deploy phase (007, and 008 after it).
    migrate(empty_db, "upgrade", "006")
    first = [rev for rev in REVISIONS if rev <= "006"]
    assert rows(empty_db) == upgraded(revisions=first)
    migrate(empty_db, *POST_DEPLOY_UPGRADE)

    assert rows(empty_db) == upgraded()
    details = sql(
        empty_db,
        "SELECT revision, run_id, started_at <= finished_at AS ordered, duration_ms, db_role, application_name,"
        " client_host, service_version, current_user AS me, coalesce(host(inet_client_addr()), 'local socket') AS here"
        " FROM alembic_ledger",
    )
    runs = {r["revision"]: r["run_id"] for r in details}
    assert len(set(runs.values())) == 2  # one run per phase
    assert len({runs[rev] for rev in first}) == 1
    assert len({runs[rev] for rev in REVISIONS if rev > "006"}) == 1
    for row in details:
        assert row["ordered"]
        assert row["duration_ms"] >= 0
        assert (row["db_role"], row["application_name"]) == (row["me"], "kraken-migrate")
        # The runner connects as the test does (a socket for the embedded server, TCP otherwise).
        assert row["client_host"] == row["here"]
        assert row["service_version"] == "0.1.0"
    # The version table and the ledger agree.
    assert sql(empty_db, "SELECT version_num FROM alembic_version")[0][0] == REVISIONS[-1]


def test_the_ledger_is_left_alone_by_autogenerate_and_check(head_db: DatabaseTarget) -> None:
    assert "No new upgrade operations detected" in migrate(head_db, "check")
    # Read-only commands neither record nor validate.
    before = rows(head_db)
    assert run_alembic("current", target=head_db).stdout == f"{HEAD} (head)\n"
    assert rows(head_db) == before


def test_downgrade_and_stamp_are_recorded(head_db: DatabaseTarget) -> None:
    previous = PREVIOUS[HEAD]

    migrate(head_db, "downgrade", "-1")
    assert rows(head_db)[-1] == (HEAD, previous, "downgrade", FILES[HEAD].checksum, True, None)

    # A stamp records where it set the database, and where it was; what it marks as applied
    # (here HEAD again, whose upgrade the downgrade undid) is adopted with the file as it is.
    migrate(head_db, "stamp", "head")
    assert rows(head_db)[-2:] == [
        (HEAD, previous, "stamp", FILES[HEAD].checksum, True, None),
        (HEAD, previous, "adopt", FILES[HEAD].checksum, True, None),
    ]

    migrate(head_db, "stamp", "base")
    assert rows(head_db)[-1] == ("base", HEAD, "stamp", None, True, None)
    assert sql(head_db, "SELECT count(*) FROM alembic_version")[0][0] == 0


# --- validation ------------------------------------------------------------------------------


def test_a_comment_edit_in_an_applied_revision_passes(
    tmp_path: Path, empty_db: DatabaseTarget, settings_for: SettingsFor
) -> None:
    ini = scratch_alembic(tmp_path)
    migrate(empty_db, "upgrade", "head", config=ini)
    edit(ini, REVISION_002, *COSMETIC_EDIT)

    validated = run_kraken_migrations("validate", target=empty_db, config=ini)
    assert validated.returncode == 0, out(validated)
    assert f"002 ok: checksum {FILES['002'].checksum[:12]}, applied on " in validated.stdout
    migrate(empty_db, "downgrade", "-1", config=ini)  # a run that moves the database validates first
    migrate(empty_db, "upgrade", "head", config=ini)
    assert run_migrations_at(empty_db, settings_for, tmp_path).at_head


def test_an_operation_edit_is_refused_by_the_cli_and_by_the_boot(
    tmp_path: Path, empty_db: DatabaseTarget, settings_for: SettingsFor
) -> None:
    # In production (a development database lets an unshipped revision's edit pass: test_edit_loop.py).
    ini = scratch_alembic(tmp_path)
    migrate(empty_db, "upgrade", "head", config=ini)
    recorded = rows(empty_db)
    applied_at = sql(empty_db, "SELECT finished_at FROM alembic_ledger WHERE revision = '002'")[0][0]
    edit(ini, REVISION_002, *OPERATION_EDIT)
    # A revision waits to be applied after it: the refusal comes before any step.
    (ini.parent / "alembic" / "versions" / f"{NEXT}_following.py").write_text(FOLLOWING.replace("\n    ", "\n"))
    new = read_revisions(tmp_path / "alembic").by_revision["002"].checksum
    problem = (
        f"revision 002 ({REVISION_002}) changed since it was applied on {when(applied_at)}: "
        f"checksum {FILES['002'].checksum[:12]} recorded, {new[:12]} now; undo the edit, or accept the file as it "
        "is with 'uv run kraken-migrations repair'"
    )

    upgrade = run_alembic("-c", str(ini), "upgrade", "head", target=empty_db, KRAKEN_ENV="production")
    assert upgrade.returncode != 0
    assert failed_lines(out(upgrade)) == [f"FAILED: {problem} (KRAKEN_MIGRATION_VALIDATE=error)"]
    assert "Traceback" not in out(upgrade)

    with pytest.raises(MigrationError) as refused:
        run_migrations_at(empty_db, settings_for, tmp_path, env="production")
    assert str(refused.value) == f"{problem} (KRAKEN_MIGRATION_VALIDATE=error)"

    validated = run_kraken_migrations("validate", target=empty_db, config=ini, KRAKEN_ENV="production")
    assert (validated.returncode, validated.stdout) == (1, f"FAILED: {problem}\n")

    # Nothing ran, nothing was recorded.
    assert sql(empty_db, "SELECT version_num FROM alembic_version")[0][0] == HEAD
    assert sql(empty_db, "SELECT to_regclass('kraken_following') IS NULL")[0][0]
    assert rows(empty_db) == recorded


def test_repair_accepts_the_edited_file_then_runs_pass(
    tmp_path: Path, empty_db: DatabaseTarget, settings_for: SettingsFor
) -> None:
    ini = scratch_alembic(tmp_path)
    migrate(empty_db, "upgrade", "head", config=ini)
    edit(ini, REVISION_002, *OPERATION_EDIT)
    new = read_revisions(tmp_path / "alembic").by_revision["002"].checksum

    repaired = run_kraken_migrations("repair", target=empty_db, config=ini)
    assert repaired.returncode == 0, out(repaired)
    assert repaired.stdout.startswith(f"repaired 002: checksum {new[:12]} accepted (was {FILES['002'].checksum[:12]}")
    assert rows(empty_db)[-1] == ("002", "001", "repair", new, True, None)

    assert run_kraken_migrations("validate", target=empty_db, config=ini).returncode == 0
    migrate(empty_db, "upgrade", "head", config=ini)
    assert run_migrations_at(empty_db, settings_for, tmp_path).at_head
    again = run_kraken_migrations("repair", target=empty_db, config=ini)
    assert again.stdout == f"nothing to repair: {len(REVISIONS)} applied revision(s) match their files\n"


@pytest.mark.parametrize("mode", ["warn", "off"])
def test_validation_can_warn_or_be_off(
    mode: str, tmp_path: Path, empty_db: DatabaseTarget, settings_for: SettingsFor, caplog: pytest.LogCaptureFixture
) -> None:
    ini = scratch_alembic(tmp_path)
    migrate(empty_db, "upgrade", "head", config=ini)
    edit(ini, REVISION_002, *OPERATION_EDIT)

    with caplog.at_level(logging.WARNING):
        assert run_migrations_at(empty_db, settings_for, tmp_path, migration_validate=mode, env="production").at_head
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if mode == "off":
        assert warnings == []
    else:
        [warning] = warnings
        assert warning.startswith(f"revision 002 ({REVISION_002}) changed since it was applied on ")
        assert warning.endswith("; carrying on (KRAKEN_MIGRATION_VALIDATE=warn)")
    cli = run_alembic(
        "-c", str(ini), "upgrade", "head", target=empty_db, KRAKEN_MIGRATION_VALIDATE=mode, KRAKEN_ENV="production"
    )
    assert cli.returncode == 0, out(cli)
    # The setting is the runs' policy; the validate command always reports the mismatch.
    assert run_kraken_migrations("validate", target=empty_db, config=ini, KRAKEN_ENV="production").returncode == 1


async def test_the_boot_validates_at_head_without_the_lock(
    tmp_path: Path, empty_db: DatabaseTarget, settings_for: SettingsFor
) -> None:
    ini = scratch_alembic(tmp_path)
    migrate(empty_db, "upgrade", "head", config=ini)
    settings = settings_for(empty_db, migration_lock_timeout=0, env="production")
    holder = await connect(empty_db)
    try:
        # Another runner holds the migration lock: a boot at head neither needs nor waits for it.
        await holder.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
        assert (await run_migrations(settings, script_location=tmp_path / "alembic")).at_head
        edit(ini, REVISION_002, *OPERATION_EDIT)
        read_revisions.cache_clear()  # as a new process would read the edited file
        with pytest.raises(MigrationError, match=r"^revision 002 \(002_integrity_and_lookups.py\) changed since"):
            await run_migrations(settings, script_location=tmp_path / "alembic")
    finally:
        await holder.close()
        read_revisions.cache_clear()


def test_check_mode_refuses_an_edited_revision(head_db: DatabaseTarget, settings_for: SettingsFor) -> None:
    # The real files, a forged record: as if 001's file had changed since it was applied.
    sql(head_db, "UPDATE alembic_ledger SET checksum = repeat('0', 64) WHERE revision = '001'")
    with pytest.raises(MigrationError, match=r"^revision 001 \(001_baseline_schema.py\) changed since it was applied"):
        asyncio.run(check_schema(settings_for(head_db, migrate_on_startup="check", env="production")))
    with pytest.raises(MigrationError, match="checksum 000000000000 recorded, d4549d188f9c now"):
        asyncio.run(run_migrations(settings_for(head_db, env="production")))


# --- adoption --------------------------------------------------------------------------------


@pytest.mark.parametrize("runner", ["boot", "cli"])
def test_a_database_made_without_the_ledger_is_adopted(
    runner: str, head_db: DatabaseTarget, settings_for: SettingsFor
) -> None:
    without_ledger(head_db)
    if runner == "boot":
        assert asyncio.run(run_migrations(settings_for(head_db))).at_head
    else:
        migrate(head_db, "upgrade", "head")
    assert rows(head_db) == upgraded("adopt")
    assert len({r[0] for r in sql(head_db, "SELECT run_id FROM alembic_ledger")}) == 1
    assert sql(head_db, "SELECT version_num FROM alembic_version")[0][0] == HEAD

    # Adopted once: the next runs find every applied revision on record.
    asyncio.run(run_migrations(settings_for(head_db)))
    migrate(head_db, "upgrade", "head")
    assert rows(head_db) == upgraded("adopt")
    assert run_kraken_migrations("validate", target=head_db).returncode == 0


@pytest.mark.slow
def test_sixteen_concurrent_runners_write_one_row_per_step(head_db: DatabaseTarget, tmp_path: Path) -> None:
    # Replicas booting together on a database to adopt; on an empty one, test_concurrent_runners
    # checks the same (one upgrade row per step) in each of its rounds.
    without_ledger(head_db)
    results = race(RUN_MIGRATIONS, 16, head_db, tmp_path / "race")
    assert [r.stderr for r in results if r.returncode != 0] == []
    assert [r.stdout.strip() for r in results] == [HEAD] * 16
    assert rows(head_db) == upgraded("adopt")
    assert len({r[0] for r in sql(head_db, "SELECT run_id FROM alembic_ledger")}) == 1


# --- failures --------------------------------------------------------------------------------

FAILING = f"""
    from alembic import op

    revision = "{NEXT}"
    down_revision = "{HEAD}"
    branch_labels = None
    depends_on = None


    def upgrade():
        op.execute("CREATE TABLE kraken_never (id int)")
        op.execute("SELECT 1 / 0")


    def downgrade():
        pass
"""


def test_a_failing_revision_leaves_a_failure_row_and_nothing_else(
    tmp_path: Path, head_db: DatabaseTarget, settings_for: SettingsFor
) -> None:
    ini = scratch_alembic(tmp_path, {f"{NEXT}_failing.py": FAILING})
    before = rows(head_db)
    checksum = read_revisions(tmp_path / "alembic").by_revision[NEXT].checksum
    failure = (NEXT, HEAD, "upgrade", checksum, False, "division by zero (SQLSTATE 22012)")

    result = run_alembic("-c", str(ini), "upgrade", "head", target=head_db)
    assert failed_lines(out(result)) == ["FAILED: a revision failed: division by zero (SQLSTATE 22012)"]
    assert rows(head_db) == [*before, failure]
    with pytest.raises(MigrationError, match="division by zero"):
        run_migrations_at(head_db, settings_for, tmp_path)
    assert rows(head_db) == [*before, failure, failure]

    # Its row survived the rollback of everything else it did.
    assert sql(head_db, "SELECT version_num FROM alembic_version")[0][0] == HEAD
    assert sql(head_db, "SELECT to_regclass('kraken_never') IS NULL")[0][0]
    closed = sql(head_db, "SELECT finished_at >= started_at, duration_ms >= 0 FROM alembic_ledger WHERE NOT success")
    assert [tuple(r) for r in closed] == [(True, True)] * 2


# --- offline SQL -----------------------------------------------------------------------------


def test_the_offline_sql_holds_the_ledger(empty_db: DatabaseTarget, settings_for: SettingsFor) -> None:
    result = run_alembic("upgrade", "head", "--sql", target=None)
    assert result.returncode == 0, out(result)
    lines = result.stdout.splitlines()
    create, run, *inserts = [n for n, line in enumerate(lines) if "alembic_ledger" in line]
    assert lines[create] == ledger.CREATE_TABLE + ";"
    assert lines[run].startswith("SELECT set_config('alembic_ledger.run_id', gen_random_uuid()::text, false)")
    assert len(inserts) == len(SERVED_REVISIONS)
    for n, rev in zip(inserts, SERVED_REVISIONS, strict=True):  # the pre-deploy phase's
        # One line, in the step's transaction: after the version table's statement, before COMMIT.
        assert "alembic_version" in lines[n - 2]
        assert (lines[n - 1], lines[n + 1]) == ("", "COMMIT;")
        assert lines[n].startswith("INSERT INTO alembic_ledger ")
        assert f"'{rev}', '{PREVIOUS[rev]}', 'upgrade', '{FILES[rev].checksum}', '0.1.0'" in lines[n]

    # SQL applied by hand is recorded, as one run.
    asyncio.run(execute_script(empty_db, result.stdout))
    assert sql(empty_db, "SELECT version_num FROM alembic_version")[0][0] == SERVED
    assert rows(empty_db) == upgraded(revisions=SERVED_REVISIONS)
    assert len({r[0] for r in sql(empty_db, "SELECT run_id FROM alembic_ledger")}) == 1
    validated = run_kraken_migrations("validate", target=empty_db)
    assert validated.returncode == 0, out(validated)
    assert asyncio.run(run_migrations(settings_for(empty_db))).serves_code  # nothing for the boot to do
    assert rows(empty_db) == upgraded(revisions=SERVED_REVISIONS)


# --- the rules, without a database ---------------------------------------------------------


def test_applied_revisions_are_the_heads_and_what_they_follow() -> None:
    graph = Revisions({"001": (), "002": ("001",), "003": ("002",), "004": ("002",), "005": ("003", "004")})
    assert graph.applied(("003",)) == {"001", "002", "003"}
    assert graph.applied(("003", "004")) == {"001", "002", "003", "004"}
    assert graph.applied(("005",)) == set(graph.graph)
    assert graph.applied(()) == set()
    assert graph.applied(("999",)) == set()  # unknown: the ahead rule's business


def test_a_revision_the_code_does_not_know_follows_the_ahead_rule(
    head_db: DatabaseTarget, settings_for: SettingsFor, caplog: pytest.LogCaptureFixture
) -> None:
    # A rollback: the database is at a revision whose file this code does not have. The ahead
    # rule decides; the revisions this code knows are still validated.
    sql(head_db, "UPDATE alembic_version SET version_num = '999'")
    sql(
        head_db,
        "INSERT INTO alembic_ledger (run_id, revision, down_revisions, direction, checksum, finished_at, success,"
        f" service_version) VALUES (gen_random_uuid(), '999', '{HEAD}', 'upgrade', 'f00d', now(), true, '0.2.0')",
    )

    with caplog.at_level(logging.WARNING):
        assert asyncio.run(run_migrations(settings_for(head_db))).ahead
    assert any("revision 999, which this code does not know" in r.getMessage() for r in caplog.records)
    refused = run_alembic("upgrade", "head", target=head_db, KRAKEN_SCHEMA_AHEAD="refuse")
    assert failed_lines(out(refused)) == [
        "FAILED: database schema is at revision 999, which this code does not know; refusing to upgrade"
        " (KRAKEN_SCHEMA_AHEAD=refuse)"
    ]
    validated = run_kraken_migrations("validate", target=head_db)
    assert validated.returncode == 0, out(validated)
    assert validated.stdout.splitlines()[0] == (
        "database schema is at revision 999, which this code does not know: checking the revisions it knows"
    )
    assert f"{len(REVISIONS)} applied revision(s) match their files" in validated.stdout

    sql(head_db, "UPDATE alembic_ledger SET checksum = repeat('0', 64) WHERE revision = '001'")
    with pytest.raises(MigrationError, match="^revision 001 "):
        asyncio.run(run_migrations(settings_for(head_db, env="production")))
