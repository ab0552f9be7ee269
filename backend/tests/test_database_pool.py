"""The service engine's pool: a connection that died while idle is replaced, not handed out."""

import asyncpg
from sqlalchemy import text

from backend.database import create_engine


async def test_a_connection_killed_while_idle_in_the_pool_is_replaced(live_db, settings_for):
    engine = create_engine(live_db, settings_for(live_db, db_pool_size=1, db_max_overflow=0))
    try:
        async with engine.connect() as conn:
            victim = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        # The server ends it (a restart, a failover, an idle timeout would too).
        admin = await asyncpg.connect(**live_db.asyncpg_connect_kwargs())
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", victim) is True
        finally:
            await admin.close()

        async with engine.connect() as conn:  # the only pooled connection is the dead one
            replacement = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
    finally:
        await engine.dispose()
    assert replacement != victim
