"""How long the service's inserts wait while a revision runs on a large table.

    uv run python bench/insert_wait.py --revision 002 --conversations 200000 --turns 5
    uv run python bench/insert_wait.py --revision 003 --conversations 200000 --turns 5
    uv run python bench/insert_wait.py --revision 004 --conversations 200000 --turns 5

Creates a scratch database on DATABASE_URL's server (or the embedded one when it is unset),
migrates it to the revision before --revision and fills it (bench/support.py: the columns of
001, turns spread over 100 days), then runs
`alembic upgrade <revision>` in a subprocess while one
connection keeps writing a conversation, a turn and a tool call per transaction, with
lock_timeout = KRAKEN_DDL_LOCK_TIMEOUT like the migration. Prints the waits overall and while a
concurrent index build was running (sampled from pg_stat_progress_create_index), then drops the
database. A benchmark, not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import asyncpg
from support import alembic, bench_server, fill, migrate, say

from backend.config import Settings, postgres_ms
from backend.db.admin import scratch_database
from backend.db.engine import connect
from backend.db.url import DatabaseTarget
from backend.migrations.revisions import read_revisions

WRITE = """
WITH c AS (
    INSERT INTO kraken_conversations (session_id, model, system_prompt_hash, agent_version)
    VALUES ('bench-live', 'm', 'h', 'v') RETURNING id
), t AS (
    INSERT INTO kraken_turns (conversation_id, turn_number, user_query, assistant_response, model)
    SELECT id, 1, 'q', 'a', 'm' FROM c RETURNING id
)
INSERT INTO kraken_tool_calls (turn_id, tool_name, tool_args, tool_result, sequence_order)
SELECT id, 'search', '{}', '{}', 1 FROM t
"""
POLL = 0.005


async def measure(db: DatabaseTarget, revision: str, lock_timeout: float) -> None:
    live = await connect(db)
    watcher = await connect(db)
    await live.execute(f"SET lock_timeout = '{postgres_ms(lock_timeout)}ms'")
    waits: list[tuple[float, float]] = []
    building: list[float] = []
    started = time.monotonic()
    upgrade = asyncio.ensure_future(alembic(db, "upgrade", revision))

    async def watch() -> None:
        while not upgrade.done():
            if await watcher.fetchval("SELECT count(*) FROM pg_stat_progress_create_index"):
                building.append(time.monotonic())
            await asyncio.sleep(POLL)

    watching = asyncio.ensure_future(watch())
    failures = 0
    try:
        while not upgrade.done():
            begun = time.monotonic()
            try:
                await live.execute(WRITE)
            except asyncpg.LockNotAvailableError:
                failures += 1
            waits.append((begun, time.monotonic()))
        returncode, output = await upgrade
        await watching
    finally:
        await live.close()
        await watcher.close()
    if returncode != 0:
        raise SystemExit(f"alembic upgrade failed:\n{output}")

    def describe(sample: list[tuple[float, float]]) -> str:
        ms = sorted((end - begin) * 1000 for begin, end in sample)
        if not ms:
            return "no writes"
        p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
        return f"{len(ms)} writes, median {statistics.median(ms):.1f} ms, p99 {p99:.1f} ms, longest {ms[-1]:.1f} ms"

    during = [(b, e) for b, e in waits if any(b - POLL <= t <= e + POLL for t in building)]
    say(f"revision {revision} took {time.monotonic() - started:.1f} s (including the alembic process start)")
    say(f"all writes meanwhile:          {describe(waits)}")
    say(f"during concurrent index builds: {describe(during)}")
    say(f"writes that hit the lock timeout ({lock_timeout:g} s): {failures}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--revision", default="002", help="the revision to measure (applied after the one before it)")
    parser.add_argument("--conversations", type=int, default=200_000)
    parser.add_argument("--turns", type=int, default=5, help="turns per conversation (one tool call each)")
    args = parser.parse_args()

    settings = Settings()
    server = await bench_server(settings)
    downs = read_revisions().graph.get(args.revision)
    if not downs:
        raise SystemExit(f"--revision {args.revision}: pick a revision after 001 (it runs on a filled table)")
    async with scratch_database(server, "kraken_bench") as db:
        await migrate(db, "upgrade", downs[0])
        await fill(db, args.conversations, args.turns)
        await measure(db, args.revision, settings.ddl_lock_timeout)


if __name__ == "__main__":
    asyncio.run(main())
