"""How long the service's inserts wait while a revision runs on a large table.

    uv run python bench/insert_wait.py --revision 002 --conversations 200000 --turns 5
    uv run python bench/insert_wait.py --revision 003 --conversations 200000 --turns 5
    uv run python bench/insert_wait.py --revision 004 --conversations 200000 --turns 5
    uv run python bench/insert_wait.py --revision 005 --conversations 200000 --turns 5 --appends --lagging 2000
    uv run python bench/insert_wait.py --revision 010 --appends

Creates a scratch database on DATABASE_URL's server (or the embedded one when it is unset),
migrates it to the revision before --revision and fills it (bench/support.py: the columns of
001, turns spread over 100 days), then runs
`alembic upgrade <revision>` in a subprocess while one
connection keeps writing a conversation, a turn and a tool call per transaction, with
lock_timeout = KRAKEN_DDL_LOCK_TIMEOUT like the migration. With --appends a second connection
keeps appending turns to the filled conversations through the service's own append
(backend/conversations/service.py; half of them to the lagging ones when there are some): the
writes a data revision's row locks meet. --lagging N first sets N conversations' totals back to
their first turn's, as the original KRAKEN client left them, and afterwards counts the
conversations whose totals still differ from their turns. Prints the waits overall and while a
concurrent index build was running (sampled from pg_stat_progress_create_index), then drops the
database. A benchmark, not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
import uuid
from collections.abc import Sequence

import asyncpg
from support import alembic, bench_server, fill, migrate, say, turn_payload

from backend.config import Settings, postgres_ms
from backend.conversations.schemas import TurnCreate
from backend.conversations.service import append_turn
from backend.db.admin import scratch_database
from backend.db.engine import connect
from backend.db.url import DatabaseTarget
from backend.migrations.revisions import read_revisions

WRITE = """
WITH c AS (
    INSERT INTO kraken_conversations (session_id, model, system_prompt_hash, agent_version, total_turns)
    VALUES ('bench-live', 'm', 'h', 'v', 1) RETURNING id
), t AS (
    INSERT INTO kraken_turns (conversation_id, turn_number, user_query, assistant_response, model)
    SELECT id, 1, 'q', 'a', 'm' FROM c RETURNING id
)
INSERT INTO kraken_tool_calls (turn_id, tool_name, tool_args, tool_result, sequence_order)
SELECT id, 'search', '{}', '{}', 1 FROM t
"""
POLL = 0.005
# This database's builds only: the server may be building other databases' indexes meanwhile.
BUILDING = "SELECT count(*) FROM pg_stat_progress_create_index WHERE datname = current_database()"
# Totals set back to those of turn 1 (bench/support.py's turns: 400 tokens, 0.0042 USD).
LAG = """
UPDATE kraken_conversations SET total_turns = 1, total_tokens = 400, total_cost_usd = 0.0042
WHERE id IN (SELECT id FROM kraken_conversations ORDER BY random() LIMIT $1) RETURNING id
"""
DIFFERING = """
SELECT count(*) FROM kraken_conversations c
LEFT JOIN (
    SELECT conversation_id, count(*) AS turns, sum(CAST(input_tokens AS bigint) + output_tokens) AS tokens,
           sum(cost_usd) AS cost_usd
    FROM kraken_turns GROUP BY conversation_id
) s ON s.conversation_id = c.id
WHERE (c.total_turns, c.total_tokens, c.total_cost_usd)
      IS DISTINCT FROM (COALESCE(s.turns, 0), COALESCE(s.tokens, 0), COALESCE(s.cost_usd, 0))
"""
TURN = TurnCreate.model_validate(turn_payload(tool_calls=1))


async def measure(
    db: DatabaseTarget,
    revision: str,
    lock_timeout: float,
    conversations: list[uuid.UUID],
    lagging: list[uuid.UUID],
    *,
    options: Sequence[str] = (),
) -> None:
    """Writes (and with ``conversations``, appends to them) while ``alembic upgrade revision`` runs
    (``options`` before the command: ``-c <ini>`` for a copy of the migration package)."""
    live = await connect(db)
    appender = await connect(db) if conversations else None
    watcher = await connect(db)
    for conn in (live, appender):
        if conn is not None:
            await conn.execute(f"SET lock_timeout = '{postgres_ms(lock_timeout)}ms'")
    waits: list[tuple[float, float]] = []
    appends: list[tuple[float, float]] = []
    building: list[float] = []
    started = time.monotonic()
    upgrade = asyncio.ensure_future(alembic(db, *options, "upgrade", revision))
    failures = 0

    async def watch() -> None:
        while not upgrade.done():
            if await watcher.fetchval(BUILDING):
                building.append(time.monotonic())
            await asyncio.sleep(POLL)

    async def write() -> None:
        nonlocal failures
        while not upgrade.done():
            begun = time.monotonic()
            try:
                await live.execute(WRITE)
            except asyncpg.LockNotAvailableError:
                failures += 1
            waits.append((begun, time.monotonic()))

    async def append() -> None:
        nonlocal failures
        assert appender is not None
        while not upgrade.done():
            picked = random.choice(lagging if lagging and random.random() < 0.5 else conversations)
            begun = time.monotonic()
            try:
                await append_turn(appender, picked, TURN, tool_result_max_bytes=10240)
            except asyncpg.LockNotAvailableError:
                failures += 1
            appends.append((begun, time.monotonic()))

    watching = asyncio.ensure_future(watch())
    try:
        await asyncio.gather(write(), *([append()] if appender is not None else []))
        returncode, output = await upgrade
        await watching
    finally:
        for conn in (live, appender, watcher):
            if conn is not None:
                await conn.close()
    if returncode != 0:
        raise SystemExit(f"alembic upgrade failed:\n{output}")

    def describe(sample: list[tuple[float, float]]) -> str:
        ms = sorted((end - begin) * 1000 for begin, end in sample)
        if not ms:
            return "no writes"
        p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
        return f"{len(ms)} writes, median {statistics.median(ms):.1f} ms, p99 {p99:.1f} ms, longest {ms[-1]:.1f} ms"

    during = [(b, e) for b, e in waits + appends if any(b - POLL <= t <= e + POLL for t in building)]
    say(f"revision {revision} took {time.monotonic() - started:.1f} s (including the alembic process start)")
    for line in output.splitlines():
        if "backend.migrations.ops" in line:
            say(f"  {line}")
    say(f"all writes meanwhile:          {describe(waits)}")
    if appender is not None:
        say(f"appends to filled conversations: {describe(appends)}")
    say(f"during concurrent index builds: {describe(during)}")
    say(f"writes that hit the lock timeout ({lock_timeout:g} s): {failures}")
    if lagging:
        say(f"conversations whose totals differ from their turns afterwards: {await fetchval(db, DIFFERING)}")


async def fetchval(db: DatabaseTarget, query: str, *args: object) -> object:
    conn = await connect(db)
    try:
        return await conn.fetchval(query, *args)
    finally:
        await conn.close()


async def fetch_ids(db: DatabaseTarget, query: str, *args: object) -> list[uuid.UUID]:
    conn = await connect(db)
    try:
        return [row[0] for row in await conn.fetch(query, *args)]
    finally:
        await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--revision", default="002", help="the revision to measure (applied after the one before it)")
    parser.add_argument("--conversations", type=int, default=200_000)
    parser.add_argument("--turns", type=int, default=5, help="turns per conversation (one tool call each)")
    parser.add_argument(
        "--appends", action="store_true", help="also append turns to the filled conversations (from revision 004 on)"
    )
    parser.add_argument("--lagging", type=int, default=0, help="conversations whose totals lag their turns")
    args = parser.parse_args()

    settings = Settings()
    server = await bench_server(settings)
    downs = read_revisions().graph.get(args.revision)
    if not downs:
        raise SystemExit(f"--revision {args.revision}: pick a revision after 001 (it runs on a filled table)")
    if args.appends and downs[0] < "003":
        raise SystemExit(
            f"--appends: the service's append needs revision 003's columns; {args.revision} follows {downs[0]}"
        )
    async with scratch_database(server, "kraken_bench") as db:
        # Both phases: the schema just before the revision, post-deploy revisions included (009
        # before 010), so that only the measured revision runs under the writes.
        await migrate(db, "-x", "phase=post-deploy", "upgrade", downs[0])
        await fill(db, args.conversations, args.turns)
        lagging = await fetch_ids(db, LAG, args.lagging) if args.lagging else []
        if lagging:
            say(f"{len(lagging):,} conversations' totals set back to their first turn's")
        conversations = await fetch_ids(db, "SELECT id FROM kraken_conversations") if args.appends else []
        await measure(db, args.revision, settings.ddl_lock_timeout, conversations, lagging)


if __name__ == "__main__":
    asyncio.run(main())
