"""What a boot's migration run reports for the metrics: how long it took, how long it waited for
another runner's lock, and how many revisions it applied itself."""

import asyncio

from backend.db.engine import MIGRATION_APPLICATION_NAME, connect
from backend.db.url import DatabaseTarget
from backend.migrations.lock import LOCK_KEY
from backend.migrations.runner import run_migrations_measured
from backend.tests.conftest import settings_of
from backend.tests.helpers import SERVED

# A migration runner polling for the lock: pg_try_advisory_lock is its last statement.
TRYING = (
    "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE datname = current_database()"
    " AND application_name = $1 AND starts_with(query, 'SELECT pg_try_advisory_lock'))"
)


async def test_a_run_reports_its_wait_for_the_lock_and_the_revisions_it_applied(empty_db: DatabaseTarget) -> None:
    holder = await connect(empty_db, "deploy-pipeline")
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)

        async def release() -> None:
            # Held for a second after the runner first tried to take it (not after the runner was
            # started: on a loaded machine reaching the lock can take most of a second).
            async with asyncio.timeout(60):  # a safety net, not a measurement
                while not await holder.fetchval(TRYING, MIGRATION_APPLICATION_NAME):
                    await asyncio.sleep(0.01)
            await asyncio.sleep(1.0)
            await holder.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)

        releasing = asyncio.create_task(release())
        run = await run_migrations_measured(settings_of(empty_db))
        await releasing
    finally:
        await holder.close()
    # The boot's phase: pre-deploy, up to SERVED (the post-deploy revisions wait).
    assert run.status.serves_code
    assert run.status.revision == SERVED
    assert run.applied == int(SERVED)
    assert run.lock_wait_seconds >= 1.0
    assert run.lock_wait_seconds < run.seconds

    at_head = await run_migrations_measured(settings_of(empty_db))
    assert at_head.status == run.status
    assert (at_head.applied, at_head.lock_wait_seconds) == (0, 0.0)
    assert 0 < at_head.seconds < run.seconds
