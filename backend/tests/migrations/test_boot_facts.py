"""What a boot's migration run reports for the metrics: how long it took, how long it waited for
another runner's lock, and how many revisions it applied itself."""

import asyncio

from backend.db.engine import connect
from backend.db.url import DatabaseTarget
from backend.migrations.lock import LOCK_KEY
from backend.migrations.revisions import read_revisions
from backend.migrations.runner import run_migrations_measured
from backend.tests.conftest import settings_of


async def test_a_run_reports_its_wait_for_the_lock_and_the_revisions_it_applied(empty_db: DatabaseTarget) -> None:
    holder = await connect(empty_db, "deploy-pipeline")
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)

        async def release() -> None:
            await asyncio.sleep(1.0)
            await holder.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)

        releasing = asyncio.create_task(release())
        run = await run_migrations_measured(settings_of(empty_db))
        await releasing
    finally:
        await holder.close()
    assert run.status.at_head
    assert run.applied == len(read_revisions().graph)
    assert 0.9 < run.lock_wait_seconds < 3
    assert run.lock_wait_seconds < run.seconds

    at_head = await run_migrations_measured(settings_of(empty_db))
    assert at_head.status == run.status
    assert (at_head.applied, at_head.lock_wait_seconds) == (0, 0.0)
    assert 0 < at_head.seconds < run.seconds
