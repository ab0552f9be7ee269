"""How fast GET /usage answers for one day of a large table, at revision 003 and at 004.

    uv run python bench/usage.py                               # 1M turns over 100 days, then dropped
    uv run python bench/usage.py --database kraken_bench_usage # kept: the next run reuses it

On DATABASE_URL's server (or the embedded one when it is unset): a database at revision 003
filled with --conversations x --turns turns spread evenly over --days days (bench/support.py),
VACUUM ANALYZEd after loading, as autovacuum does on a live table: index-only scans need its
visibility map. Then GET /usage for the middle day, through the app in-process (httpx, no
network), --requests times per grouping (model, day), at 003 (no index on created_at: a scan
of every turn) and again after `alembic upgrade 004` (an index-only scan of the covering index
ix_kraken_turns_created_at). Prints median and worst latency and each revision's EXPLAIN ANALYZE
plan. The goal: one day of 1M turns in 50 ms or less at 004. A benchmark, not a test: the
numbers depend on the machine and what else runs on it.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta

import httpx
from support import bench_server, fill, last_day, migrate, say

from backend.config import Settings
from backend.conversations.service import USAGE
from backend.db.admin import create_database, scratch_database
from backend.db.engine import connect
from backend.db.url import DatabaseTarget
from backend.main import create_app

API_KEY = "bench-" + secrets.token_hex(8)
BEFORE, AFTER = "003", "004"
GOAL_MS = 50.0


async def scalar(db: DatabaseTarget, query: str) -> object:
    conn = await connect(db)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


async def revision_of(db: DatabaseTarget) -> str | None:
    if not await scalar(db, "SELECT to_regclass('alembic_version') IS NOT NULL"):
        return None
    value = await scalar(db, "SELECT max(version_num) FROM alembic_version")
    return str(value) if value is not None else None


@asynccontextmanager
async def bench_database(server: DatabaseTarget, name: str | None) -> AsyncIterator[DatabaseTarget]:
    """A scratch database dropped afterwards, or the named one, created if missing and kept."""
    if name is None:
        async with scratch_database(server, "kraken_bench_usage") as db:
            yield db
    else:
        yield await create_database(server, name)


async def prepare(db: DatabaseTarget, conversations: int, turns: int, days: int) -> datetime:
    """The database at 003 holding the turns; the day they end at (midnight UTC)."""
    current = await revision_of(db)
    if current is not None and current > BEFORE:
        say(f"database at {current}: downgrading to {BEFORE} (builds the dropped indexes again)")
        await migrate(db, "downgrade", BEFORE)
    else:
        await migrate(db, "upgrade", BEFORE)
    expected = conversations * turns
    found = int(str(await scalar(db, "SELECT count(*) FROM kraken_turns")))
    if found == 0:
        end = last_day()
        say(f"loading {expected:,} turns over {days} days ...")
        await fill(db, conversations, turns, days=days, end=end)
        return end
    if found != expected:
        raise SystemExit(f"database {db.database} holds {found:,} turns, not {expected:,}: drop it or pick another")
    # Reused: the turns end at midnight after the last one (they are spread evenly up to it).
    latest = await scalar(db, "SELECT max(created_at) FROM kraken_turns")
    assert isinstance(latest, datetime)
    say(f"reusing database {db.database}: {found:,} turns")
    return latest.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)


def summary(name: str, ms: list[float]) -> str:
    return f"{name:>5}: median {statistics.median(ms):7.1f} ms, worst {max(ms):7.1f} ms over {len(ms)} requests"


async def measure(db: DatabaseTarget, day: datetime, requests: int) -> dict[str, list[float]]:
    """Latency of GET /usage for ``day``, per grouping, through the whole app."""
    settings = Settings.model_validate(
        {"DATABASE_URL": db.dsn, "api_key": API_KEY, "migrate_on_startup": "off", "db_statement_timeout": 0}
    )
    app = create_app(settings)
    params = {"from": day.date().isoformat(), "to": (day + timedelta(days=1)).date().isoformat()}
    timings: dict[str, list[float]] = {}
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://bench", headers=headers) as client,
    ):
        for group_by in USAGE:
            ms: list[float] = []
            for i in range(requests + 2):
                began = time.perf_counter()
                response = await client.get("/usage", params={**params, "group_by": group_by})
                elapsed = (time.perf_counter() - began) * 1000
                if response.status_code != 200:
                    raise SystemExit(f"GET /usage answered {response.status_code}: {response.text}")
                if i >= 2:  # the first two warm the pool and the caches
                    ms.append(elapsed)
            timings[group_by] = ms
            turns = sum(group["turns"] for group in response.json()["groups"])
            say(summary(group_by, ms) + f" ({turns:,} turns in the day)")
    return timings


async def plan(db: DatabaseTarget, day: datetime) -> str:
    conn = await connect(db)
    try:
        rows = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS) " + USAGE["model"].sql, day, day + timedelta(days=1))
    finally:
        await conn.close()
    return "\n".join("    " + row[0] for row in rows)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=200_000)
    parser.add_argument("--turns", type=int, default=5, help="turns per conversation (one tool call each)")
    parser.add_argument("--days", type=int, default=100, help="the turns are spread over this many days")
    parser.add_argument("--requests", type=int, default=30, help="timed requests per grouping and revision")
    parser.add_argument("--database", help="use (create if missing) and keep this database instead of a scratch one")
    args = parser.parse_args()

    server = await bench_server(Settings())
    async with bench_database(server, args.database) as db:
        end = await prepare(db, args.conversations, args.turns, args.days)
        day = end - timedelta(days=args.days // 2 + 1)
        say(f"GET /usage?from={day:%Y-%m-%d}&to={day + timedelta(days=1):%Y-%m-%d} (one day of {args.days})")
        results: dict[str, dict[str, list[float]]] = {}
        for revision in (BEFORE, AFTER):
            if revision == AFTER:
                started = time.monotonic()
                await migrate(db, "upgrade", AFTER)
                say(f"alembic upgrade {AFTER}: {time.monotonic() - started:.1f} s")
            say(f"at revision {revision}:")
            results[revision] = await measure(db, day, args.requests)
            say(f"  plan (group_by=model), EXPLAIN (ANALYZE, BUFFERS):\n{await plan(db, day)}")
        worst_median = max(statistics.median(ms) for ms in results[AFTER].values())
        verdict = "met" if worst_median <= GOAL_MS else "NOT met"
        say(f"goal: one day in <= {GOAL_MS:g} ms at {AFTER}: {verdict} (slowest median {worst_median:.1f} ms)")
        say(
            "note: index-only scans rely on the visibility map, which VACUUM (autovacuum, in production) "
            "keeps current; pages written since the last vacuum are read from the table as well"
        )


if __name__ == "__main__":
    asyncio.run(main())
