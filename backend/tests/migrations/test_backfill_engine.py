"""The backfill engine (ops.backfill_by_key, backend/migrations/backfills.py) on real databases:
batch sizes tuned to a batch time, the pause while a session waits for a lock on the table, a
walk that only its upper bound ends, the progress table and its CLI view, and a run continued
after its `alembic upgrade` process was SIGKILLed half-way."""

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backend.config import PROJECT_ROOT
from backend.db.engine import connect
from backend.db.url import DatabaseTarget
from backend.migrations import backfills, ops
from backend.tests.helpers import (
    HEAD,
    NEXT,
    child_env,
    fetch,
    offline_ops,
    out,
    run_kraken_migrations,
    run_ops,
    run_ops_async,
    scratch_alembic,
    sql,
    until_waiting_for_a_lock,
)

ENGINE = "backend.migrations.ops"


@pytest.fixture
def numbers(empty_db: DatabaseTarget) -> DatabaseTarget:
    """``numbers``: ids 1..400, each with n = id and an empty ``doubled``."""
    sql(empty_db, "CREATE TABLE numbers (id bigint PRIMARY KEY, n integer NOT NULL, doubled integer)")
    sql(empty_db, "INSERT INTO numbers (id, n) SELECT g, g FROM generate_series(1, 400) g")
    return empty_db


DOUBLE = "UPDATE numbers SET doubled = n * 2 WHERE id = ANY(:keys) AND doubled IS DISTINCT FROM n * 2"


def batch_sizes(caplog: pytest.LogCaptureFixture) -> list[int]:
    """The sizes of the batches the engine walked, from its line per batch (DEBUG)."""
    found = (re.search(r": batch of (\d+) key\(s\)", r.getMessage()) for r in caplog.records if r.name == ENGINE)
    return [int(match.group(1)) for match in found if match]


def test_the_next_batch_size_moves_toward_the_target_halving_at_most_and_growing_by_a_quarter_at_most() -> None:
    assert backfills.next_batch_size(1000, 0.3, 0.15, 10, 50_000) == 500  # twice too slow: half
    assert backfills.next_batch_size(1000, 0.125, 0.1, 10, 50_000) == 800  # proportional below the bounds
    assert backfills.next_batch_size(1000, 0.09, 0.1, 10, 50_000) == 1111  # proportional above
    assert backfills.next_batch_size(1000, 0.01, 0.15, 10, 50_000) == 1250  # grown by a quarter at most
    assert backfills.next_batch_size(1000, 5.0, 0.15, 10, 50_000) == 500  # at most halved
    assert backfills.next_batch_size(1000, 0.0, 0.15, 10, 50_000) == 1250
    assert backfills.next_batch_size(45_000, 0.01, 0.15, 10, 50_000) == 50_000  # within the bounds
    assert backfills.next_batch_size(12, 5.0, 0.15, 10, 50_000) == 10
    assert backfills.next_batch_size(1, 0.01, 0.15, 1, 50_000) == 2  # the smallest batches grow as well
    assert backfills.next_batch_size(2, 0.01, 0.15, 1, 50_000) == 3


def test_slow_batches_shrink_toward_the_target_time(numbers: DatabaseTarget, caplog: pytest.LogCaptureFixture) -> None:
    """Each batch sleeps 2 ms a row on the server: 200 rows take 0.4 s, ten times the 40 ms aimed
    at, so the batches shrink (a slower machine only makes them smaller)."""
    caplog.set_level(logging.DEBUG, logger=ENGINE)
    slow = (
        "UPDATE numbers SET doubled = n * 2 FROM pg_sleep(0.002 * cardinality(CAST(:keys AS bigint[])))"
        " WHERE id = ANY(:keys)"
    )
    run_ops(numbers, lambda: ops.backfill_by_key("numbers", "id", slow, 200, key_type="bigint", target_seconds=0.04))
    sizes = batch_sizes(caplog)
    assert sizes[:3] == [200, 100, 50], sizes
    assert max(sizes[2:]) <= 50
    assert sql(numbers, "SELECT count(*) FROM numbers WHERE doubled IS DISTINCT FROM n * 2")[0][0] == 0


def test_quick_batches_grow_up_to_the_largest_size(numbers: DatabaseTarget, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=ENGINE)
    run_ops(
        numbers,
        lambda: ops.backfill_by_key(
            "numbers", "id", DOUBLE, 10, key_type="bigint", target_seconds=30, max_batch_size=40
        ),
    )
    # 10 rows never take 30 s: each batch grows by a quarter (GROW_AT_MOST), up to 40; the last
    # walks what is left of the 400.
    assert batch_sizes(caplog) == [10, 12, 15, 19, 24, 30, 38, 40, 40, 40, 40, 40, 40, 12]


def test_a_vacuum_is_due_once_the_table_has_grown_by_a_share_of_its_first_size_or_every_n_rows() -> None:
    mb = 2**20
    walk = ops._Walk("w", 1_000_000, 1000, base=100 * mb, grown_from=100 * mb, size=100 * mb, since_vacuum=50_000)
    assert not walk.vacuum_due(None)
    walk.size = 100 * mb + int(backfills.VACUUM_GROWTH * 100 * mb) + 1
    assert walk.vacuum_due(None)
    walk.since_vacuum = backfills.VACUUM_AT_LEAST - 1  # a small table is not vacuumed after each batch
    assert not walk.vacuum_due(None)
    walk.grown_from, walk.since_vacuum = walk.size, 50_000  # the last VACUUM: growth counts from there
    assert not walk.vacuum_due(None)
    assert walk.vacuum_due(50_000)  # given, the rows changed decide
    assert not walk.vacuum_due(50_001)
    assert not walk.vacuum_due(0)  # never


def test_a_walk_that_moves_every_row_vacuums_during_the_walk(
    empty_db: DatabaseTarget, caplog: pytest.LogCaptureFixture
) -> None:
    """Keys in the table's order: each batch's rows share pages, so none of its new row versions
    fits beside the old one, and every row moves. The table grows until a VACUUM lets the next
    batches reuse the space; it ends well below twice its size."""
    caplog.set_level(logging.DEBUG, logger=ENGINE)
    sql(empty_db, "CREATE TABLE wide (id bigint PRIMARY KEY, pad text NOT NULL, x bigint)")
    sql(empty_db, "INSERT INTO wide (id, pad) SELECT g, repeat(md5(g::text), 12) FROM generate_series(1, 40000) g")
    before = sql(empty_db, "SELECT pg_relation_size('wide')")[0][0]
    set_x = "UPDATE wide SET x = id WHERE id = ANY(:keys) AND x IS DISTINCT FROM id"
    # Batches of 1,000 rows (2.5% of the table) throughout: the table can outgrow the rule by one batch.
    run_ops(
        empty_db,
        lambda: ops.backfill_by_key(
            "wide", "id", set_x, 1000, key_type="bigint", pending="x IS NULL", target_seconds=None
        ),
    )
    after = sql(empty_db, "SELECT pg_relation_size('wide')")[0][0]
    during = [r.getMessage() for r in caplog.records if "INDEX_CLEANUP OFF" in r.getMessage()]
    assert during, "no VACUUM during the walk"
    assert after < 1.6 * before, (before, after)
    assert sql(empty_db, "SELECT count(*) FROM wide WHERE x IS DISTINCT FROM id")[0][0] == 0


def test_a_batch_that_changes_nothing_does_not_end_the_walk(numbers: DatabaseTarget) -> None:
    """Rows 1..200 are done already and every row is locked (pending defaults to every row): the
    first batches change nothing, and the walk goes on to the last key."""
    sql(numbers, "UPDATE numbers SET doubled = n * 2 WHERE id <= 200")
    changed: list[int] = []
    run_ops(
        numbers,
        lambda: changed.append(
            ops.backfill_by_key("numbers", "id", DOUBLE, 50, key_type="bigint", target_seconds=None)
        ),
    )
    assert changed == [200]
    assert sql(numbers, "SELECT count(*) FROM numbers WHERE doubled IS DISTINCT FROM n * 2")[0][0] == 0


async def test_the_walk_pauses_while_a_session_waits_for_a_lock_on_its_table(
    numbers: DatabaseTarget, caplog: pytest.LogCaptureFixture
) -> None:
    """A report reads the table in a long transaction; a schema change waits behind it for ACCESS
    EXCLUSIVE. The backfill does not queue behind the schema change (every session that comes
    after would wait for it, and the backfill's lock_timeout would end it): it pauses, naming the
    waiter, and goes on once the table has no waiter left."""
    caplog.set_level(logging.INFO, logger=ENGINE)
    report, schema_change = await connect(numbers), await connect(numbers)
    try:
        await report.execute("BEGIN; SELECT count(*) FROM numbers")
        change_pid = await schema_change.fetchval("SELECT pg_backend_pid()")

        async def change() -> None:
            async with schema_change.transaction():
                await schema_change.execute("LOCK TABLE numbers IN ACCESS EXCLUSIVE MODE")

        changing = asyncio.ensure_future(change())
        await until_waiting_for_a_lock(numbers)
        walking = asyncio.ensure_future(
            run_ops_async(numbers, lambda: ops.backfill_by_key("numbers", "id", DOUBLE, 50, key_type="bigint"))
        )
        async with asyncio.timeout(60):  # a safety net, not a measurement
            while not any("paused" in r.getMessage() for r in caplog.records):
                await asyncio.sleep(0.02)
        [paused] = [r.getMessage() for r in caplog.records if "paused" in r.getMessage()]
        assert f"1 session(s) wait for a lock on numbers (pid {change_pid})" in paused
        # The schema change is the only session waiting: the backfill is not in the queue.
        waiting = "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        assert [r["pid"] for r in await fetch(numbers, waiting)] == [change_pid]
        assert not walking.done()
        await report.execute("COMMIT")
        await changing
        await walking
    finally:
        await report.close()
        await schema_change.close()
    assert (await fetch(numbers, "SELECT count(*) FROM numbers WHERE doubled IS DISTINCT FROM n * 2"))[0][0] == 0


def test_progress_is_kept_per_backfill_and_a_finished_one_starts_afresh(numbers: DatabaseTarget) -> None:
    def walk() -> None:
        ops.backfill_by_key("numbers", "id", DOUBLE, 100, key_type="bigint", target_seconds=None, label="doubling")

    run_ops(numbers, walk)
    query = (
        "SELECT revision, table_name, label, upper_key, last_key, rows_done, rows_changed, rows_total,"
        " finished_at IS NOT NULL AS finished FROM alembic_backfill"
    )
    [row] = sql(numbers, query)
    # Outside a runner there is no revision; the table had no planner estimate, so it was counted.
    assert tuple(row) == ("", "numbers", "doubling", "400", "400", 400, 400, 400, True)
    run_ops(numbers, walk)  # finished: walked again from the first key, changing nothing
    [row] = sql(numbers, query)
    assert tuple(row) == ("", "numbers", "doubling", "400", "400", 400, 0, 400, True)


def test_offline_the_engine_is_the_same_do_block_whatever_its_tuning() -> None:
    """Offline there is nothing to measure or record: the DO block walks batches of batch_size,
    as before the engine, and no progress table is mentioned."""
    plain = offline_ops(lambda: ops.backfill_by_key("numbers", "id", DOUBLE, 50, key_type="bigint"))
    tuned = offline_ops(
        lambda: ops.backfill_by_key(
            "numbers", "id", DOUBLE, 50, key_type="bigint", target_seconds=0.5, vacuum_every=10, max_replay_lag=1
        )
    )
    assert tuned == plain
    assert "DO $backfill$" in plain
    assert "LIMIT 50" in plain
    assert backfills.TABLE not in plain
    assert "VACUUM" not in plain


SLOW_BACKFILL = f'''
    """A backfill slow enough to be killed half-way: 300 rows, 10 a batch, 50 ms each."""
    from backend.migrations import ops

    revision = "{NEXT}"
    down_revision = "{HEAD}"
    branch_labels = None
    depends_on = None


    def upgrade():
        # Both again on the next run: the walk's first commit made them permanent.
        ops.op.execute(
            "CREATE TABLE IF NOT EXISTS slow (id bigint PRIMARY KEY, n integer NOT NULL, doubled integer,"
            " writes integer NOT NULL DEFAULT 0)"
        )
        ops.op.execute("INSERT INTO slow (id, n) SELECT g, g FROM generate_series(1, 300) g ON CONFLICT DO NOTHING")
        # No check of what is done already: a row walked twice would be written twice.
        ops.backfill_by_key(
            "slow",
            "id",
            "UPDATE slow SET doubled = n * 2, writes = writes + 1 FROM pg_sleep(0.05) WHERE id = ANY(:keys)",
            10,
            key_type="bigint",
            target_seconds=None,
            label="slow doubling",
        )


    def downgrade():
        ops.op.execute("DROP TABLE slow")
'''


def test_a_backfill_killed_half_way_goes_on_from_its_last_committed_batch(
    head_db: DatabaseTarget, tmp_path: Path
) -> None:
    ini = scratch_alembic(tmp_path, {f"{NEXT}_slow_backfill.py": SLOW_BACKFILL})
    upgrade = [sys.executable, "-m", "alembic", "-c", str(ini), "upgrade", "head"]
    runner = subprocess.Popen(
        upgrade, cwd=PROJECT_ROOT, env=child_env(head_db), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    progress = "SELECT rows_done FROM alembic_backfill WHERE revision = $1 AND label = 'slow doubling'"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if runner.poll() is not None:
                pytest.fail("the upgrade ended before it could be killed")
            if sql(head_db, "SELECT to_regclass('alembic_backfill')")[0][0] and (done := sql(head_db, progress, NEXT)):
                if done[0][0] >= 100:
                    break
            time.sleep(0.02)
        else:
            pytest.fail("the backfill never got a third of the way")
        os.kill(runner.pid, signal.SIGKILL)
    finally:
        runner.wait(timeout=30)
    assert runner.returncode == -signal.SIGKILL

    # What committed: whole batches, up to the key recorded with them, each row written once.
    [(last_key, done)] = sql(head_db, "SELECT last_key, rows_done FROM alembic_backfill WHERE revision = $1", NEXT)
    assert 100 <= done < 300
    assert done % 10 == 0
    assert int(last_key) == done
    written = "SELECT array_agg(DISTINCT writes ORDER BY writes), count(*) FILTER (WHERE writes > 0) FROM slow"
    assert tuple(sql(head_db, written)[0]) == ([0, 1], done)
    listed = run_kraken_migrations("backfills", target=head_db, config=ini)
    assert listed.returncode == 0, out(listed)
    [line] = [line for line in listed.stdout.splitlines() if "slow doubling" in line]
    assert f"  {NEXT}  " in line
    assert f"{done:,} of about 300" in line
    assert "unfinished: last batch committed" in line

    resumed = subprocess.run(upgrade, cwd=PROJECT_ROOT, env=child_env(head_db), capture_output=True, text=True)
    assert resumed.returncode == 0, out(resumed)
    assert "slow doubling: continuing a walk started" in resumed.stderr
    assert f"after key {last_key} ({done} row(s) walked)" in resumed.stderr
    assert f"slow doubling: {300 - done} of {300 - done} row(s) changed" in resumed.stderr
    # Every row written exactly once, across the two runs; the walk recorded as finished.
    assert tuple(sql(head_db, "SELECT array_agg(DISTINCT writes), bool_and(doubled = n * 2) FROM slow")[0]) == (
        [1],
        True,
    )
    recorded = (
        "SELECT revision, table_name, rows_done, rows_changed, finished_at IS NOT NULL FROM alembic_backfill"
        " WHERE revision IN ('005', $1)"
    )
    # 005's walk is on record too, under its revision (the runner says which revision runs);
    # later revisions' walks (006's copies) are theirs, left out here.
    assert sorted(tuple(r) for r in sql(head_db, recorded, NEXT)) == [
        ("005", "kraken_conversations", 0, 0, True),
        (NEXT, "slow", 300, 300, True),
    ]
    listed = run_kraken_migrations("backfills", target=head_db, config=ini)
    [line] = [line for line in listed.stdout.splitlines() if "slow doubling" in line]
    assert "300 of about 300 (100%)" in line
    assert "finished in" in line


def test_the_backfills_view_of_a_database_without_any(empty_db: DatabaseTarget) -> None:
    listed = run_kraken_migrations("backfills", target=empty_db)
    assert listed.returncode == 0, out(listed)
    assert listed.stdout == "no backfill recorded in this database yet (ops.backfill_by_key records its progress)\n"
