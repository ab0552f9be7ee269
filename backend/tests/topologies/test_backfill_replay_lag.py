"""The backfill engine (ops.backfill_by_key) on a primary with a real hot standby: it runs no batch
while the standby replays more than ``max_replay_lag`` s behind, says so, and goes on once the
standby has caught up."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest

from backend.db.url import parse_database_url
from backend.migrations import ops
from backend.tests.helpers import run_ops_async
from backend.tests.rigs.replication import ReplicationPair

pytestmark = pytest.mark.slow

ENGINE = "backend.migrations.ops"
DOUBLE = "UPDATE numbers SET doubled = n * 2 WHERE id = ANY(:keys) AND doubled IS DISTINCT FROM n * 2"
BOUND = 1.0  # the walk's max_replay_lag, in seconds
LAG = "SELECT extract(epoch FROM replay_lag) FROM pg_stat_replication WHERE application_name = $1"
DONE = "SELECT count(*) FROM numbers WHERE doubled IS NOT DISTINCT FROM n * 2"


async def test_the_walk_pauses_while_a_standby_replays_more_than_the_bound_behind(
    replication: ReplicationPair, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replay is paused on the standby (pg_wal_replay_pause) while the primary keeps writing
    elsewhere, so its replay lag grows past the bound; the walk, started then, logs why it waits
    and changes no row; once replay resumes and the lag falls, it walks the whole table. MAX_PAUSE
    is raised: the walk must go on because the standby caught up, not because it gave up waiting."""
    caplog.set_level(logging.INFO, logger=ENGINE)
    monkeypatch.setattr(ops, "MAX_PAUSE", 600.0)
    primary, standby, name = replication.primary, replication.standby, replication.application_name
    # The standby reports its replay position every second even when no WAL arrives (default 10 s).
    standby.configure({"wal_receiver_status_interval": "1s"})
    standby.reload()
    database = "kraken_backfill_lag"
    await primary.execute(f"CREATE DATABASE {database}")
    await primary.execute(
        "CREATE TABLE numbers (id bigint PRIMARY KEY, n integer NOT NULL, doubled integer);"
        " INSERT INTO numbers (id, n) SELECT g, g FROM generate_series(1, 400) g;"
        " CREATE TABLE ticks (at timestamptz NOT NULL DEFAULT clock_timestamp())",
        database=database,
    )
    await asyncio.to_thread(replication.wait_replayed)
    target = parse_database_url(primary.url(database=database))

    stop = asyncio.Event()

    async def tick() -> None:
        """WAL the standby receives but, while paused, does not replay: its lag keeps growing."""
        conn = await primary.connect(database)
        try:
            while not stop.is_set():
                await conn.execute("INSERT INTO ticks DEFAULT VALUES")
                await asyncio.sleep(0.05)
        finally:
            await conn.close()

    async def lag() -> float:
        return float(await primary.fetchval(LAG, name) or 0.0)

    ticking = asyncio.ensure_future(tick())
    walking: asyncio.Future[None] | None = None
    try:
        await standby.execute("SELECT pg_wal_replay_pause()")
        async with asyncio.timeout(60):  # a safety net, not a measurement
            while await lag() <= 2 * BOUND:
                await asyncio.sleep(0.1)
        walking = asyncio.ensure_future(
            run_ops_async(
                target,
                lambda: ops.backfill_by_key("numbers", "id", DOUBLE, 50, key_type="bigint", max_replay_lag=BOUND),
            )
        )
        async with asyncio.timeout(60):
            while not any("paused" in r.getMessage() for r in caplog.records):
                await asyncio.sleep(0.02)
        [paused] = [r.getMessage() for r in caplog.records if "paused" in r.getMessage()]
        assert re.search(rf": paused, a standby replays [\d.]+ s behind \(more than {BOUND:g} s\)$", paused), paused
        # Looked at several times over a few seconds, each time with the lag still over the bound:
        # no batch ran (no row changed, none logged).
        for _ in range(5):
            await asyncio.sleep(0.5)
            assert await lag() > BOUND
            assert await primary.fetchval(DONE, database=database) == 0
            assert not walking.done()
        assert not any("batch of" in r.getMessage() for r in caplog.records if r.name == ENGINE)

        await standby.execute("SELECT pg_wal_replay_resume()")
        async with asyncio.timeout(120):
            await walking
    finally:
        stop.set()
        await ticking
        if walking is not None and not walking.done():
            walking.cancel()
    assert await primary.fetchval(DONE, database=database) == 400
    messages = [r.getMessage() for r in caplog.records if r.name == ENGINE]
    assert not any("going on regardless" in m for m in messages)
    [summary] = [m for m in messages if "row(s) changed" in m]
    assert summary.startswith("backfill of numbers by id: 400 of 400 row(s) changed")
    assert "paused" in summary
