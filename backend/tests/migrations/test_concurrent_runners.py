"""Migration runners in real processes: many at once, killed half-way, blocked by locks."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from backend.config import PROJECT_ROOT
from backend.db.engine import connect, create_migration_engine
from backend.db.url import DatabaseTarget
from backend.migrations import ledger
from backend.migrations.lock import LOCK_KEY, holder
from backend.models import Base
from backend.tests.helpers import (
    BARRIER,
    HEAD,
    NEXT,
    RUN_MIGRATIONS,
    SERVED,
    SERVED_REVISIONS,
    child_env,
    fetch,
    out,
    race,
    run_alembic,
    scratch_alembic,
    sql,
)

pytestmark = pytest.mark.slow

ALEMBIC_CLI = BARRIER.format(
    body="""
from alembic.config import main
main(argv=["upgrade", "head"])
"""
)


def schema_served(db: DatabaseTarget) -> None:
    """Where the pre-deploy phase (boot, `alembic upgrade head`) leaves an empty database."""
    assert [r[0] for r in sql(db, "SELECT version_num FROM alembic_version")] == [SERVED]
    tables = {r[0] for r in sql(db, "SELECT tablename FROM pg_tables WHERE tablename LIKE 'kraken\\_%'")}
    assert tables == set(Base.metadata.tables)  # every table of the models (SERVED is head)


# One round (it was three): the suite's time is bounded (.ci/run under 25 minutes), and sixteen
# runners also race in test_ledger.py (on a database to adopt).
def test_sixteen_replicas_booting_at_once_all_succeed(empty_db: DatabaseTarget, tmp_path: Path) -> None:
    results = race(RUN_MIGRATIONS, 16, empty_db, tmp_path / "race")
    failures = [r.stderr for r in results if r.returncode != 0]
    assert failures == []
    assert [r.stdout.strip() for r in results] == [SERVED] * 16
    schema_served(empty_db)
    # One ledger row per step, all of one run (test_ledger.py races runners on a database to adopt).
    steps = sql(empty_db, "SELECT run_id, revision, direction, success FROM alembic_ledger ORDER BY id")
    assert [(r["revision"], r["direction"], r["success"]) for r in steps] == [
        (rev, "upgrade", True) for rev in SERVED_REVISIONS
    ]
    assert len({r["run_id"] for r in steps}) == 1


def test_eight_concurrent_alembic_upgrades_all_succeed(empty_db: DatabaseTarget, tmp_path: Path) -> None:
    results = race(ALEMBIC_CLI, 8, empty_db, tmp_path / "race")
    assert [r.returncode for r in results] == [0] * 8, [out(r) for r in results if r.returncode]
    # Exactly one of them applied the baseline; the others found nothing to do.
    assert sum("applied revision 001" in r.stderr for r in results) == 1
    schema_served(empty_db)
    steps = sql(empty_db, "SELECT revision, direction, success FROM alembic_ledger ORDER BY id")
    assert [tuple(r) for r in steps] == [(rev, "upgrade", True) for rev in SERVED_REVISIONS]


SLOW_REVISION = f'''
    """A revision that stops half-way when asked to, for the kill test."""
    import os
    import time
    from pathlib import Path

    from alembic import op

    revision = "{NEXT}"
    down_revision = "{HEAD}"
    branch_labels = None
    depends_on = None


    def upgrade():
        op.execute("CREATE TABLE kraken_half_done (id int)")
        op.execute("INSERT INTO kraken_half_done VALUES (1)")
        pause = os.environ.get("KRAKEN_TEST_PAUSE")
        if pause == "client":
            Path(os.environ["KRAKEN_TEST_SIGNAL"]).touch()
            time.sleep(120)
        elif pause == "server":
            op.execute("SELECT pg_sleep(120)")
        op.execute("ALTER TABLE kraken_turns ADD COLUMN note text")


    def downgrade():
        op.execute("ALTER TABLE kraken_turns DROP COLUMN note")
        op.execute("DROP TABLE kraken_half_done")
'''


@pytest.mark.parametrize("where", ["client", "server"])
def test_a_runner_killed_mid_revision_leaves_nothing_half_done(
    where: str, head_db: DatabaseTarget, tmp_path: Path
) -> None:
    ini = scratch_alembic(tmp_path, {f"{NEXT}_slow.py": SLOW_REVISION})
    signal_file = tmp_path / "mid-revision"
    runner = subprocess.Popen(
        [sys.executable, "-m", "alembic", "-c", str(ini), "upgrade", "head"],
        cwd=PROJECT_ROOT,
        env=child_env(head_db, KRAKEN_TEST_PAUSE=where, KRAKEN_TEST_SIGNAL=str(signal_file)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if where == "client" and signal_file.exists():
                break
            # The runner's connections are recognisable by their application_name.
            if where == "server" and sql(
                head_db,
                "SELECT 1 FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(120)' AND state = 'active'"
                " AND datname = current_database()"
                " AND application_name = 'kraken-migrate'",
            ):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the runner never reached the middle of revision 002")
        os.kill(runner.pid, signal.SIGKILL)
    finally:
        runner.wait(timeout=30)
    assert runner.returncode == -signal.SIGKILL

    # The revision's transaction died with it: those before are committed, nothing of it exists.
    assert [r[0] for r in sql(head_db, "SELECT version_num FROM alembic_version")] == [HEAD]
    assert sql(head_db, "SELECT to_regclass('kraken_half_done') IS NULL")[0][0]
    # The ledger shows the step that started and never finished.
    steps = "SELECT revision, success, error, finished_at IS NULL FROM alembic_ledger WHERE revision = $1 ORDER BY id"
    assert [tuple(r) for r in sql(head_db, steps, NEXT)] == [(NEXT, None, None, True)]

    # The lock went with the session: the next run gets it and finishes the job. (One that found a
    # stale lock would give up at the 45 s lock timeout and fail: no clock needed, which a loaded
    # machine would make lie.)
    result = run_alembic("-c", str(ini), "upgrade", "head", target=head_db, KRAKEN_MIGRATION_LOCK_TIMEOUT="45")
    assert result.returncode == 0, out(result)
    assert [r[0] for r in sql(head_db, "SELECT version_num FROM alembic_version")] == [NEXT]
    assert sql(head_db, "SELECT count(*) FROM kraken_half_done")[0][0] == 1
    # The next run (holding the lock, so no runner was alive) marked the open step interrupted.
    assert [tuple(r) for r in sql(head_db, steps, NEXT)] == [
        (NEXT, False, ledger.INTERRUPTED, True),
        (NEXT, True, None, False),
    ]


ALTER_TURNS = f"""
    from alembic import op

    revision = "{NEXT}"
    down_revision = "{HEAD}"
    branch_labels = None
    depends_on = None


    def upgrade():
        op.execute("ALTER TABLE kraken_turns ADD COLUMN note text")


    def downgrade():
        op.execute("ALTER TABLE kraken_turns DROP COLUMN note")
"""


async def test_a_blocked_migration_gives_up_without_stalling_the_service(
    head_db: DatabaseTarget, tmp_path: Path
) -> None:
    ini = scratch_alembic(tmp_path, {f"{NEXT}_alter_turns.py": ALTER_TURNS})

    # A long-running read holds ACCESS SHARE on kraken_turns for the whole test.
    reader = await connect(head_db)
    reader_tx = reader.transaction()
    await reader_tx.start()
    await reader.fetch("SELECT * FROM kraken_turns")

    service = await connect(head_db)
    waits: list[float] = []
    migration = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "alembic", "-c", str(ini), "upgrade", "head",
        cwd=PROJECT_ROOT,
        env=child_env(head_db, KRAKEN_DDL_LOCK_TIMEOUT="0.5", KRAKEN_DDL_LOCK_RETRIES="2"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    finished = asyncio.ensure_future(migration.communicate())
    try:
        # The service keeps reading and writing while the migration queues for its lock.
        while not finished.done():
            started = time.monotonic()
            async with service.transaction():
                await service.fetchval("SELECT count(*) FROM kraken_turns")
                await service.execute(
                    "INSERT INTO kraken_conversations (session_id, model, system_prompt_hash, agent_version)"
                    " VALUES ('s', 'm', 'h', 'v')"
                )
            waits.append(time.monotonic() - started)
            await asyncio.sleep(0.02)
        output = (await finished)[0].decode()
    finally:
        await reader_tx.rollback()
        await reader.close()
        await service.close()

    assert migration.returncode != 0
    assert "could not get its table lock within lock_timeout (0.5 s) in 3 attempts" in output
    assert output.count("hit lock_timeout (attempt") == 2
    assert "Traceback" not in output
    # Nothing of the revision happened, and the service was never held up past the lock timeout.
    assert [r[0] for r in await fetch(head_db, "SELECT version_num FROM alembic_version")] == [HEAD]
    assert not await fetch(
        head_db, "SELECT 1 FROM pg_attribute WHERE attrelid = 'kraken_turns'::regclass AND attname = 'note'"
    )
    assert len(waits) > 10
    # A query queued behind one attempt waits at most its 0.5 s; the bound leaves a loaded machine
    # room for its own work, and stays under the 1.5 s of three attempts queued back to back
    # without letting the service through (what a runner that kept its place in the queue would do).
    assert max(waits) < 1.4, f"longest service query waited {max(waits):.3f} s"
    # Each attempt is a failed step in the ledger, of one run.
    attempts = await fetch(head_db, "SELECT run_id, success, error FROM alembic_ledger WHERE revision = $1", NEXT)
    assert [(r["success"], r["error"]) for r in attempts] == [
        (False, "canceling statement due to lock timeout (SQLSTATE 55P03)")
    ] * 3
    assert len({r["run_id"] for r in attempts}) == 1


async def test_waiting_for_the_migration_lock_names_the_holder_in_this_database(
    head_db: DatabaseTarget, database_factory: Callable[[], DatabaseTarget]
) -> None:
    # Advisory locks are per database: a session holding the same key in another database on the
    # server blocks nothing here, and is not the one to name (or to pg_terminate_backend).
    elsewhere = await connect(await asyncio.to_thread(database_factory), "another-database")
    holder = await connect(head_db, "deploy-pipeline")
    try:
        await elsewhere.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
        await holder.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
        pid = holder.get_server_pid()
        result = await asyncio.to_thread(
            run_alembic, "upgrade", "head", target=head_db, KRAKEN_MIGRATION_LOCK_TIMEOUT="1"
        )
        await holder.close()
        # With only the other database's session left, nothing waits.
        unblocked = await asyncio.to_thread(
            run_alembic, "upgrade", "head", target=head_db, KRAKEN_MIGRATION_LOCK_TIMEOUT="1"
        )
    finally:
        await holder.close()
        await elsewhere.close()
    assert result.returncode != 0
    failed = [line for line in out(result).splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1
    assert "gave up after 1 s waiting for the migration lock" in failed[0]
    assert f"held by pid {pid} (application_name 'deploy-pipeline'" in failed[0]
    assert f"pid {elsewhere.get_server_pid()} " not in failed[0]
    # Since when, and what it is doing: its state and the start of its query.
    assert "connected since" in failed[0]
    assert "; idle since " in failed[0]
    assert ": SELECT pg_advisory_lock($1))" in failed[0]
    assert unblocked.returncode == 0, out(unblocked)
    assert [r[0] for r in await fetch(head_db, "SELECT version_num FROM alembic_version")] == [HEAD]


# Two revisions: the first waits for an advisory lock the test holds (so the test decides when it
# ends, with no lock_timeout of its own), the second creates a table.
WAITS_FOR_THE_TEST = f"""
    from alembic import op

    revision = "{NEXT}"
    down_revision = "{HEAD}"
    branch_labels = None
    depends_on = None


    def upgrade():
        op.execute("SET LOCAL lock_timeout = 0")
        op.execute("SELECT pg_advisory_xact_lock(4242)")


    def downgrade():
        pass
"""
AFTER_THE_WAIT = f"""
    from alembic import op

    revision = "{int(NEXT) + 1:03d}"
    down_revision = "{NEXT}"
    branch_labels = None
    depends_on = None


    def upgrade():
        op.execute("CREATE TABLE kraken_after_the_wait (id int)")


    def downgrade():
        op.execute("DROP TABLE kraken_after_the_wait")
"""
THE_LOCK_HOLDER = (
    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    f" AND classid = (({LOCK_KEY} >> 32) & 4294967295)::oid AND objid = ({LOCK_KEY} & 4294967295)::oid"
)


async def upgrade_through_the_wait(
    db: DatabaseTarget, tmp_path: Path, while_waiting: Callable[[], Awaitable[None]], **env: str
) -> tuple[int, str]:
    """Run `alembic upgrade head` over the two revisions; call ``while_waiting`` while the first one
    waits for the test, then let it finish. The exit code and everything printed."""
    revisions = {f"{NEXT}_waits.py": WAITS_FOR_THE_TEST, f"{int(NEXT) + 1:03d}_after.py": AFTER_THE_WAIT}
    ini = scratch_alembic(tmp_path, revisions)
    gate = await connect(db)
    await gate.execute("SET idle_session_timeout = 0")  # a test may set one on the database
    await gate.execute("SELECT pg_advisory_lock(4242)")
    migration = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "alembic", "-c", str(ini), "upgrade", "head",
        cwd=PROJECT_ROOT, env=child_env(db, **env),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    finished = asyncio.ensure_future(migration.communicate())
    # Advisory locks are per database: this one's waiter, not another test's (under -n, tests in
    # other databases of the server wait on the same key at the same time).
    waiting = (
        "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242 AND NOT granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    try:
        while not await gate.fetch(waiting):
            assert not finished.done(), (await finished)[0].decode()
            await asyncio.sleep(0.05)
        await while_waiting()
    except BaseException:
        # Not left running: collected later, its pipes would fail whichever test runs then.
        if migration.returncode is None:
            migration.kill()
        await finished
        raise
    finally:
        await gate.close()  # the first revision goes on
    output = (await finished)[0].decode()
    assert migration.returncode is not None
    return migration.returncode, output


async def test_a_killed_lock_session_stops_the_run_before_the_next_step(
    head_db: DatabaseTarget, tmp_path: Path
) -> None:
    async def kill_the_lock_session() -> None:
        [(pid,)] = await fetch(head_db, THE_LOCK_HOLDER)
        assert (await fetch(head_db, "SELECT pg_terminate_backend($1)", pid))[0][0]

    code, output = await upgrade_through_the_wait(head_db, tmp_path, kill_the_lock_session)
    assert code != 0
    # One line: the lock was lost, and nothing ran after it (the release error in the cleanup hides nothing).
    [failed] = [line for line in output.splitlines() if line.startswith("FAILED")]
    assert failed.startswith("FAILED: the migration lock was lost (its connection failed: "), output
    assert failed.endswith("): nothing further ran; what was applied before stays, and the next run resumes from there")
    assert "Traceback" not in output
    # The revision that was running when the lock went finished (its own session was fine); the next never started.
    assert [r[0] for r in await fetch(head_db, "SELECT version_num FROM alembic_version")] == [NEXT]
    assert not (await fetch(head_db, "SELECT to_regclass('kraken_after_the_wait')"))[0][0]
    steps = await fetch(head_db, "SELECT revision, success FROM alembic_ledger WHERE revision > $1", HEAD)
    assert [tuple(r) for r in steps] == [(NEXT, True)]


async def test_the_lock_session_outlives_an_idle_session_timeout(head_db: DatabaseTarget, tmp_path: Path) -> None:
    # A server (here: the database) that ends idle sessions after a second: the lock's session sits
    # idle while the first revision runs, for longer than that.
    await fetch(head_db, f"ALTER DATABASE {head_db.database} SET idle_session_timeout = '1s'")

    async def outlast_it() -> None:
        await asyncio.sleep(2.5)
        # Still held, by the same session that took it.
        assert len(await fetch(head_db, THE_LOCK_HOLDER)) == 1

    code, output = await upgrade_through_the_wait(head_db, tmp_path, outlast_it)
    assert code == 0, output
    assert (await fetch(head_db, "SELECT to_regclass('kraken_after_the_wait') IS NOT NULL"))[0][0]


CONCURRENT_INDEX = (
    """
    from alembic import op

    revision = "{next}"
    down_revision = "{head}"
    branch_labels = None
    depends_on = None


    def upgrade():
        with op.get_context().autocommit_block():
            op.execute("CREATE INDEX CONCURRENTLY ix_kraken_turns_model ON kraken_turns (model)")
        # After leaving the transaction the runner must still hold the migration lock.
        op.execute(
            "CREATE TABLE kraken_lock_seen AS SELECT count(*) AS holders FROM pg_locks"
            " WHERE locktype = 'advisory' AND granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND objid = ({key} & 4294967295)::oid AND classid = (({key} >> 32) & 4294967295)::oid"
        )


    def downgrade():
        op.execute("DROP TABLE kraken_lock_seen")
        op.execute("DROP INDEX ix_kraken_turns_model")
""".replace("{key}", str(LOCK_KEY))
    .replace("{next}", NEXT)
    .replace("{head}", HEAD)
)


def test_the_lock_survives_a_revision_that_leaves_its_transaction(head_db: DatabaseTarget, tmp_path: Path) -> None:
    ini = scratch_alembic(tmp_path, {f"{NEXT}_concurrent_index.py": CONCURRENT_INDEX})
    result = run_alembic("-c", str(ini), "upgrade", "head", target=head_db)
    assert result.returncode == 0, out(result)
    assert sql(head_db, "SELECT holders FROM kraken_lock_seen")[0][0] == 1
    assert sql(head_db, "SELECT indisvalid FROM pg_index WHERE indexrelid = 'ix_kraken_turns_model'::regclass")[0][0]
    # Released at the end: nobody holds it now.
    assert not sql(
        head_db,
        "SELECT 1 FROM pg_locks WHERE locktype = 'advisory'"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )


async def test_the_holder_is_nobody_when_only_another_database_holds_the_key(
    empty_db: DatabaseTarget, database_factory: Callable[[], DatabaseTarget]
) -> None:
    # lock.holder() answering None is what makes the timeout say "a session that has gone
    # meanwhile": the holder of the same key in another database must not count as one here.
    elsewhere = await connect(await asyncio.to_thread(database_factory), "another-database")
    engine = create_migration_engine(empty_db)
    try:
        await elsewhere.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
        async with engine.connect() as conn:
            assert await conn.run_sync(holder) is None
        here = await connect(empty_db, "deploy-pipeline")
        try:
            await here.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
            async with engine.connect() as conn:
                named = await conn.run_sync(holder)
            assert named is not None
            assert f"pid {here.get_server_pid()}" in named
            assert "deploy-pipeline" in named
        finally:
            await here.close()
    finally:
        await engine.dispose()
        await elsewhere.close()
