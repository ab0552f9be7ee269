"""Deploy phases and the migration session's time zone.

A test script directory (the real one, copied, plus revisions 901-904) holds a pre-deploy and a
post-deploy revision: ``alembic upgrade head`` and the boot apply only the first, the schema
serves the code meanwhile (check mode, /ready's rule), ``-x phase=post-deploy`` applies the second
and records it. With a pre-deploy revision after the post-deploy one (903), the pre-deploy phase
runs all three, from head as on an empty database; only trailing post-deploy revisions (904)
wait. Migrations see UTC whatever the database's default zone.
"""

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from backend.config import Settings
from backend.db.url import DatabaseTarget
from backend.migrations.phases import POST_DEPLOY_COMMAND, SET_TIMEZONE
from backend.migrations.revisions import SchemaStatus, read_revisions
from backend.migrations.runner import SchemaNotAtHead, check_schema, run_migrations
from backend.tests.helpers import HEAD, out, run_alembic, run_kraken_migrations, scratch_alembic, sql

SettingsFor = Callable[..., Settings]

# Records the session's time zone as the revision sees it, and (a default of now()) a timestamp.
PRE = f'''
    """pre-deploy: a table, and the time zone the revision ran in"""
    from alembic import op

    revision = "901"
    down_revision = "{HEAD}"


    def upgrade() -> None:
        op.execute("CREATE TABLE kraken_phase_pre (zone text NOT NULL)")
        op.execute("INSERT INTO kraken_phase_pre VALUES (current_setting('TimeZone'))")


    def downgrade() -> None:
        op.execute("DROP TABLE kraken_phase_pre")
'''

POST = '''
    """post-deploy: what the previous release could not read"""
    from alembic import op

    revision = "902"
    down_revision = "901"
    phase = "post-deploy"


    def upgrade() -> None:
        op.execute("CREATE TABLE kraken_phase_post (zone text NOT NULL)")
        op.execute("INSERT INTO kraken_phase_post VALUES (current_setting('TimeZone'))")


    def downgrade() -> None:
        op.execute("DROP TABLE kraken_phase_post")
'''

PRE_AFTER_POST = '''
    """pre-deploy, after a post-deploy revision (of an earlier release): the pre-deploy phase runs both"""
    from alembic import op

    revision = "903"
    down_revision = "902"


    def upgrade() -> None:
        op.execute("CREATE TABLE kraken_phase_late (id int)")


    def downgrade() -> None:
        op.execute("DROP TABLE kraken_phase_late")
'''


def phased(tmp_path: Path, *, late: bool = False) -> Path:
    files = {"901_pre.py": PRE, "902_post.py": POST}
    if late:
        files["903_late.py"] = PRE_AFTER_POST
    return scratch_alembic(tmp_path, files)


def version(db: DatabaseTarget) -> list[str]:
    return [r[0] for r in sql(db, "SELECT version_num FROM alembic_version")]


def tables(db: DatabaseTarget) -> set[str]:
    return {r[0] for r in sql(db, "SELECT tablename FROM pg_tables WHERE tablename LIKE 'kraken_phase_%'")}


def test_the_reader_knows_each_revision_s_phase(tmp_path: Path) -> None:
    phased(tmp_path)
    files = read_revisions(tmp_path / "alembic").by_revision
    assert files["901"].phase == "pre-deploy"
    assert files["902"].phase == "post-deploy"
    assert {files[rev].phase for rev in read_revisions().graph} == {"pre-deploy"}  # 001-004 and on


def test_pre_deploy_stops_before_post_deploy_and_the_post_deploy_phase_runs_the_rest(
    head_db: DatabaseTarget, tmp_path: Path, settings_for: SettingsFor
) -> None:
    ini = phased(tmp_path)
    first = run_alembic("upgrade", "head", target=head_db, config=ini)
    assert first.returncode == 0, out(first)
    assert version(head_db) == ["901"]
    assert tables(head_db) == {"kraken_phase_pre"}
    assert f"stopping before post-deploy revision(s) 902: run '{POST_DEPLOY_COMMAND}'" in out(first)

    # The boot's run (the same phase) finds nothing to do; check mode accepts the schema, and so
    # does /ready's rule (serves_code), though 902 is pending.
    settings = settings_for(head_db)
    status = asyncio.run(run_migrations(settings, script_location=tmp_path / "alembic"))
    assert (status.revision, status.at_head, status.serves_code) == ("901", False, True)
    assert status.post_deploy_pending == ("902",)
    assert asyncio.run(check_schema(settings, script_location=tmp_path / "alembic")).serves_code
    assert version(head_db) == ["901"]

    second = run_alembic("-x", "phase=post-deploy", "upgrade", "head", target=head_db, config=ini)
    assert second.returncode == 0, out(second)
    assert version(head_db) == ["902"]
    assert tables(head_db) == {"kraken_phase_pre", "kraken_phase_post"}
    recorded = sql(head_db, "SELECT revision, direction, success FROM alembic_ledger WHERE revision LIKE '90_'")
    assert [tuple(r) for r in recorded] == [("901", "upgrade", True), ("902", "upgrade", True)]
    listing = run_kraken_migrations("ledger", target=head_db, config=ini)
    assert listing.returncode == 0, out(listing)
    line = next(line for line in listing.stdout.splitlines() if line.split()[3:4] == ["902"])
    assert "post-deploy" in line, listing.stdout


def test_a_boot_never_runs_a_post_deploy_revision(
    head_db: DatabaseTarget, tmp_path: Path, settings_for: SettingsFor
) -> None:
    phased(tmp_path)
    settings = settings_for(head_db)
    for _ in range(2):  # from the real head, then from 901
        status = asyncio.run(run_migrations(settings, script_location=tmp_path / "alembic"))
        assert status.revision == "901"
    assert tables(head_db) == {"kraken_phase_pre"}


def ledger_of(db: DatabaseTarget) -> list[tuple[str, str, bool]]:
    rows = sql(db, "SELECT revision, direction, success FROM alembic_ledger WHERE revision LIKE '90_' ORDER BY id")
    return [tuple(r) for r in rows]


def listed_phase(db: DatabaseTarget, ini: Path, revision: str) -> str:
    """The phase ``kraken-migrations ledger`` shows for ``revision``'s step."""
    listing = run_kraken_migrations("ledger", target=db, config=ini)
    assert listing.returncode == 0, out(listing)
    line = next(line for line in listing.stdout.splitlines() if line.split()[3:4] == [revision])
    return next(word for word in line.split() if word in ("pre-deploy", "post-deploy"))


EARLIER = "running post-deploy revision 902 of an earlier release before pre-deploy revision 903"


def test_the_pre_deploy_phase_runs_an_earlier_release_s_post_deploy_revision_before_a_pre_deploy_one(
    head_db: DatabaseTarget, tmp_path: Path, settings_for: SettingsFor
) -> None:
    # 902 (post-deploy) is an earlier release's; 903 (pre-deploy) follows it: the pre-deploy phase
    # runs 901, 902 and 903 in order, and says so for 902.
    ini = phased(tmp_path, late=True)
    result = run_alembic("upgrade", "head", target=head_db, config=ini)
    assert result.returncode == 0, out(result)
    assert EARLIER in out(result)
    assert "stopping before" not in out(result)
    assert version(head_db) == ["903"]
    assert tables(head_db) == {"kraken_phase_pre", "kraken_phase_post", "kraken_phase_late"}
    assert ledger_of(head_db) == [("901", "upgrade", True), ("902", "upgrade", True), ("903", "upgrade", True)]
    assert [listed_phase(head_db, ini, rev) for rev in ("901", "902", "903")] == [
        "pre-deploy",
        "post-deploy",
        "pre-deploy",
    ]
    status = asyncio.run(check_schema(settings_for(head_db), script_location=tmp_path / "alembic"))
    assert (status.at_head, status.post_deploy_pending) == (True, ())


def test_a_fresh_database_boots_through_a_pre_deploy_revision_after_a_post_deploy_one(
    empty_db: DatabaseTarget, tmp_path: Path, settings_for: SettingsFor, caplog: pytest.LogCaptureFixture
) -> None:
    # The case the old refusal broke: a new database (quick start, CI, the suite's templates).
    phased(tmp_path, late=True)
    caplog.set_level("INFO", logger="backend.migrations.phases")
    status = asyncio.run(run_migrations(settings_for(empty_db), script_location=tmp_path / "alembic"))
    assert (status.revision, status.at_head, status.serves_code) == ("903", True, True)
    assert EARLIER in caplog.text
    assert tables(empty_db) == {"kraken_phase_pre", "kraken_phase_post", "kraken_phase_late"}
    assert sql(empty_db, "SELECT count(*) FROM alembic_ledger WHERE revision = '001'")[0][0] == 1
    assert ledger_of(empty_db) == [("901", "upgrade", True), ("902", "upgrade", True), ("903", "upgrade", True)]


def test_only_the_trailing_post_deploy_revisions_wait(
    head_db: DatabaseTarget, tmp_path: Path, settings_for: SettingsFor
) -> None:
    ini = scratch_alembic(
        tmp_path,
        {
            "901_pre.py": PRE,
            "902_post.py": POST,
            "903_late.py": PRE_AFTER_POST,
            "904_post.py": POST.replace('"902"', '"904"')
            .replace('"901"', '"903"')
            .replace("kraken_phase_post", "kraken_phase_last"),
        },
    )
    revisions = read_revisions(tmp_path / "alembic")
    # At 901, 902 runs before 903 (the boot's phase does not stop at it): behind, nothing waits
    # but 904; check mode refuses.
    at_901 = SchemaStatus(("901",), revisions)
    assert (at_901.behind, at_901.serves_code, at_901.post_deploy_pending) == (True, False, ("904",))
    result = run_alembic("upgrade", "head", target=head_db, config=ini)
    assert result.returncode == 0, out(result)
    assert EARLIER in out(result)
    assert f"stopping before post-deploy revision(s) 904: run '{POST_DEPLOY_COMMAND}'" in out(result)
    assert version(head_db) == ["903"]
    assert tables(head_db) == {"kraken_phase_pre", "kraken_phase_post", "kraken_phase_late"}
    settings = settings_for(head_db)
    status = asyncio.run(check_schema(settings, script_location=tmp_path / "alembic"))
    assert (status.at_head, status.serves_code, status.post_deploy_pending) == (False, True, ("904",))
    # The offline SQL selects the same: 902 and 903 before the restart, 904 after.
    pre = run_alembic("upgrade", f"{HEAD}:head", "--sql", target=None, config=ini)
    assert pre.returncode == 0, out(pre)
    assert pre.stdout.index("kraken_phase_post") < pre.stdout.index("kraken_phase_late")
    assert "kraken_phase_last" not in pre.stdout
    post = run_alembic("-x", "phase=post-deploy", "upgrade", "head", target=head_db, config=ini)
    assert post.returncode == 0, out(post)
    assert version(head_db) == ["904"]
    assert listed_phase(head_db, ini, "904") == "post-deploy"


def test_check_mode_refuses_a_post_deploy_revision_pending_before_a_pre_deploy_one(
    empty_db: DatabaseTarget, tmp_path: Path, settings_for: SettingsFor
) -> None:
    ini = phased(tmp_path, late=True)
    assert run_alembic("upgrade", "901", target=empty_db, config=ini).returncode == 0
    # 902 is pending but not trailing: this release needs it run (with 903) before it serves.
    with pytest.raises(SchemaNotAtHead):
        asyncio.run(check_schema(settings_for(empty_db), script_location=tmp_path / "alembic"))
    assert version(empty_db) == ["901"]


def test_a_bad_phase_is_one_line(empty_db: DatabaseTarget, tmp_path: Path) -> None:
    ini = phased(tmp_path)
    result = run_alembic("-x", "phase=later", "upgrade", "head", target=empty_db, config=ini)
    assert result.returncode != 0  # alembic exits 255 on a FAILED line
    assert "FAILED: -x phase=later: give one of pre-deploy, post-deploy" in result.stdout, out(result)
    bad = scratch_alembic(
        tmp_path / "bad", {"901_pre.py": PRE.replace("down_revision = ", 'phase = "later"\n    down_revision = ')}
    )
    result = run_alembic("upgrade", "head", target=empty_db, config=bad)
    assert result.returncode != 0  # alembic exits 255 on a FAILED line
    assert "FAILED: revision file 901_pre.py: phase = 'later' is not one of 'pre-deploy', 'post-deploy'" in out(result)


def test_the_offline_sql_follows_the_phase_and_sets_the_zone_after_004(tmp_path: Path) -> None:
    ini = phased(tmp_path)
    pre = run_alembic("upgrade", f"{HEAD}:head", "--sql", target=None, config=ini)
    assert pre.returncode == 0, out(pre)
    assert "kraken_phase_pre" in pre.stdout
    assert "kraken_phase_post" not in pre.stdout
    assert pre.stdout.index(f"{SET_TIMEZONE};") < pre.stdout.index("CREATE TABLE kraken_phase_pre")
    post = run_alembic("-x", "phase=post-deploy", "upgrade", "901:902", "--sql", target=None, config=ini)
    assert post.returncode == 0, out(post)
    assert "CREATE TABLE kraken_phase_post" in post.stdout
    assert post.stdout.count(f"{SET_TIMEZONE};") == 1
    # The SQL of the applied revisions is what production ran: no zone set.
    historic = run_alembic("upgrade", "base:004", "--sql", target=None)
    assert historic.returncode == 0, out(historic)
    assert "timezone" not in historic.stdout.lower()


def test_migrations_run_in_utc_whatever_the_database_default(
    head_db: DatabaseTarget, tmp_path: Path, settings_for: SettingsFor
) -> None:
    sql(head_db, f"ALTER DATABASE \"{head_db.database}\" SET timezone = 'America/New_York'")
    assert sql(head_db, "SELECT current_setting('TimeZone')")[0][0] == "America/New_York"
    ini = phased(tmp_path)
    asyncio.run(run_migrations(settings_for(head_db), script_location=tmp_path / "alembic"))  # the boot
    result = run_alembic("-x", "phase=post-deploy", "upgrade", "head", target=head_db, config=ini)  # the CLI
    assert result.returncode == 0, out(result)
    assert sql(head_db, "SELECT zone FROM kraken_phase_pre")[0][0] == "UTC"
    assert sql(head_db, "SELECT zone FROM kraken_phase_post")[0][0] == "UTC"
