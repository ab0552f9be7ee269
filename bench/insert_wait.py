"""How long the service's inserts wait while a revision runs on a large table.

    uv run python bench/insert_wait.py --revision 002 --conversations 200000 --turns 5
    uv run python bench/insert_wait.py --revision 003 --conversations 200000 --turns 5

Creates a scratch database on DATABASE_URL's server (or the embedded one when it is unset),
migrates it to the revision before --revision and fills it (the columns of 001), then runs
`alembic upgrade <revision>` in a subprocess while one
connection keeps writing a conversation, a turn and a tool call per transaction, with
lock_timeout = KRAKEN_DDL_LOCK_TIMEOUT like the migration. Prints the waits overall and while a
concurrent index build was running (sampled from pg_stat_progress_create_index), then drops the
database. A benchmark, not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

import asyncpg
from support import bench_server

from backend.config import PROJECT_ROOT, Settings
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


async def alembic(db: DatabaseTarget, *args: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "MIGRATIONS_DATABASE_URL"}
    env["DATABASE_URL"] = db.dsn
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "alembic", *args,
        cwd=PROJECT_ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output = (await process.communicate())[0].decode()
    assert process.returncode is not None
    return process.returncode, output


async def fill(db: DatabaseTarget, conversations: int, turns: int) -> None:
    conn = await connect(db)
    try:
        await conn.execute(
            "INSERT INTO kraken_conversations (session_id, model, system_prompt_hash, agent_version, total_turns)"
            f" SELECT 's' || g, 'm', 'h', 'v', {turns} FROM generate_series(1, {conversations}) g"
        )
        await conn.execute(
            "INSERT INTO kraken_turns (conversation_id, turn_number, user_query, assistant_response, model,"
            " input_tokens, output_tokens, duration_ms)"
            f" SELECT c.id, n, repeat('q', 200), repeat('a', 800), 'm', 100 * n, 300, 1200"
            f" FROM kraken_conversations c, generate_series(1, {turns}) n"
        )
        await conn.execute(
            "INSERT INTO kraken_tool_calls (turn_id, tool_name, tool_args, tool_result, sequence_order)"
            " SELECT id, 'search', '{\"q\": 1}', '{\"hits\": 3}', 1 FROM kraken_turns"
        )
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()


async def measure(db: DatabaseTarget, revision: str, lock_timeout: float) -> None:
    live = await connect(db)
    watcher = await connect(db)
    await live.execute(f"SET lock_timeout = '{int(lock_timeout * 1000)}ms'")
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
    print(f"revision {revision} took {time.monotonic() - started:.1f} s (including the alembic process start)")
    print(f"all writes meanwhile:          {describe(waits)}")
    print(f"during concurrent index builds: {describe(during)}")
    print(f"writes that hit the lock timeout ({lock_timeout:g} s): {failures}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--revision", default="002", help="the revision to measure (applied after the one before it)")
    parser.add_argument("--conversations", type=int, default=200_000)
    parser.add_argument("--turns", type=int, default=5, help="turns per conversation (one tool call each)")
    args = parser.parse_args()

    settings = Settings()
    server = await bench_server()
    downs = read_revisions().graph.get(args.revision)
    if not downs:
        raise SystemExit(f"--revision {args.revision}: pick a revision after 001 (it runs on a filled table)")
    async with scratch_database(server, "kraken_bench") as db:
        code, output = await alembic(db, "upgrade", downs[0])
        if code != 0:
            raise SystemExit(output)
        started = time.monotonic()
        await fill(db, args.conversations, args.turns)
        print(
            f"{args.conversations} conversations, {args.conversations * args.turns} turns and as many tool calls "
            f"written in {time.monotonic() - started:.0f} s"
        )
        await measure(db, args.revision, settings.ddl_lock_timeout)


if __name__ == "__main__":
    asyncio.run(main())
