"""A deploy of the revisions after --base on a large live database, both phases, with the service
serving appends over HTTP throughout: what the service's clients and the stored instants see.

    uv run python bench/deploy_phases.py --base 005 --conversations 200000 --turns 5

Creates a scratch database on DATABASE_URL's server (or the embedded one when it is unset), sets
its default time zone to --timezone (America/New_York: a session that forgets to name its zone
shifts instants by the offset, and a rewrite shows), migrates it to --base and fills it
(bench/support.py: 1M turns with the defaults). It records every stored instant (started_at,
ended_at, created_at, as epochs, keyed by id) in a side table, starts `kraken-backend` on the
database (KRAKEN_MIGRATE_ON_STARTUP=off: the pipeline migrates) and keeps --clients connections
appending turns with 3 tool calls to the filled conversations over HTTP while it runs, one after
the other, as deploy.yml does:

- the pre-deploy phase: ``alembic upgrade head``;
- the post-deploy phase: ``alembic -x phase=post-deploy upgrade head``.

The same code serves both phases (there is no restart: a restart's own gap is not what is
measured). First --baseline seconds of the same appends with nothing migrating: this machine's own
stalls (a WAL fsync, a checkpoint) are the yardstick the phases' worst append is printed beside.
Prints each phase's time and the migrations' progress lines as they come, the phase's
five slowest appends with what the service's sessions waited on meanwhile (pg_stat_activity
sampled every 10 ms: the wait event, and for a lock the statements holding it), then the
appends' latency (median, p99, worst: the worst is the longest an append waited for the
migration's locks, plus its own work), the answers that were not 2xx, the instants that changed
(stored rows whose epoch differs from before, and appended turns whose created_at lies outside the
moments their requests were in flight), the tables' sizes before and after, and drops the
database. A benchmark, not a test: the numbers depend on the machine (the load average is
printed with them).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
from http_load import API_KEY, Server, start_kraken
from support import alembic, bench_server, fill, migrate, say, turn_payload

from backend.config import Settings
from backend.conversations.schemas import dumps
from backend.db.admin import scratch_database
from backend.db.engine import MIGRATION_APPLICATION_NAME, SERVICE_APPLICATION_NAME, connect
from backend.db.url import DatabaseTarget
from backend.migrations.ops import ident, literal
from backend.migrations.phases import PHASE_ARGUMENT
from backend.migrations.revisions import POST_DEPLOY, read_revisions

TABLES = ("kraken_conversations", "kraken_turns", "kraken_tool_calls")
# Every stored instant before the deploy, as an epoch: for `timestamp` columns the epoch of the
# wall-clock time read as UTC (what the service stores), for `timestamptz` the instant itself.
# Equal epochs after the deploy: no instant moved.
SNAPSHOT = """
CREATE TABLE bench_instants AS
SELECT 'c' AS kind, id, extract(epoch FROM started_at) AS a, extract(epoch FROM ended_at) AS b
FROM kraken_conversations
UNION ALL
SELECT 't', id, extract(epoch FROM created_at), NULL FROM kraken_turns
"""
CHANGED = """
SELECT count(*) FROM bench_instants s
LEFT JOIN kraken_conversations c ON s.kind = 'c' AND c.id = s.id
LEFT JOIN kraken_turns t ON s.kind = 't' AND t.id = s.id
WHERE (s.kind = 'c' AND (extract(epoch FROM c.started_at), extract(epoch FROM c.ended_at)) IS DISTINCT FROM (s.a, s.b))
   OR (s.kind = 't' AND extract(epoch FROM t.created_at) IS DISTINCT FROM s.a)
"""
APPENDED = "SELECT id, extract(epoch FROM created_at) FROM kraken_turns WHERE id = ANY($1::uuid[])"
SIZES = "SELECT relname, pg_total_relation_size(oid) FROM pg_class WHERE relname = ANY($1::text[])"


@dataclass
class Append:
    began: float  # wall-clock epoch seconds
    ended: float
    status: int  # 0: no answer
    turn_id: uuid.UUID | None


async def sizes(db: DatabaseTarget) -> dict[str, int]:
    conn = await connect(db)
    try:
        return {row[0]: row[1] for row in await conn.fetch(SIZES, list(TABLES))}
    finally:
        await conn.close()


async def append_forever(
    client: httpx.AsyncClient, ids: list[str], body: bytes, record: list[Append], stop: asyncio.Event
) -> None:
    while not stop.is_set():
        picked = random.choice(ids)
        began = time.time()
        try:
            answer = await client.post(f"/conversations/{picked}/turns", content=body)
            status = answer.status_code
            turn = uuid.UUID(answer.json()["id"]) if status == 201 else None
        except httpx.HTTPError:
            status, turn = 0, None
        record.append(Append(began, time.time(), status, turn))


# What the service's sessions wait on, sampled while the phases run: the wait event, and for a
# lock the statements of the sessions holding it up (pg_blocking_pids takes the lock manager's
# locks itself: only asked for lock waits, not while sessions wait on the WAL).
WAITING = """
SELECT a.pid, a.wait_event_type || ':' || a.wait_event,
       CASE WHEN a.wait_event_type = 'Lock' THEN
         (SELECT string_agg(DISTINCT left(regexp_replace(b.query, '\\s+', ' ', 'g'), 90), ' | ')
          FROM pg_stat_activity b WHERE b.pid = ANY(pg_blocking_pids(a.pid)))
       END
FROM pg_stat_activity a
WHERE a.datname = current_database() AND a.application_name = $1 AND a.state = 'active'
  AND a.wait_event_type IS NOT NULL AND a.wait_event_type <> 'Client'
"""
# And what the migration runs meanwhile.
MIGRATING = """
SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 90) FROM pg_stat_activity
WHERE datname = current_database() AND application_name = $1 AND state = 'active' AND pid <> pg_backend_pid()
"""
SAMPLE_EVERY = 0.01
# Seconds of appends not counted at all: the first requests of each connection, on cold caches.
WARM_UP = 5.0


@dataclass
class Wait:
    at: float  # wall-clock epoch seconds
    event: str  # the service session's wait event, or "migrating" for a migration's statement
    behind: str | None
    pid: int = 0  # the service session's


def longest_lock_wait(samples: list[Wait], since: float) -> float:
    """The longest a service session was seen waiting for a lock (heavyweight: a table's or a
    row's) since ``since``, from consecutive samples: what a migration's locks cost the service,
    apart from the machine's own stalls. Milliseconds, to within a sampling interval."""
    longest = 0.0
    started: dict[int, float] = {}
    seen_at: list[float] = sorted({w.at for w in samples if w.at >= since})
    waiting_at: dict[float, set[int]] = {}
    for w in samples:
        if w.at >= since and w.event.startswith("Lock:"):
            waiting_at.setdefault(w.at, set()).add(w.pid)
    for at in seen_at:
        now = waiting_at.get(at, set())
        for pid in list(started):
            if pid not in now:
                del started[pid]
        for pid in now:
            started.setdefault(pid, at)
            longest = max(longest, at - started[pid] + SAMPLE_EVERY)
    return longest * 1000


async def sample_waits(db: DatabaseTarget, samples: list[Wait], stop: asyncio.Event) -> None:
    conn = await connect(db)
    try:
        while not stop.is_set():
            now = time.time()
            rows = await conn.fetch(WAITING, SERVICE_APPLICATION_NAME)
            samples.extend(Wait(now, event, behind, pid) for pid, event, behind in rows)
            running = await conn.fetch(MIGRATING, MIGRATION_APPLICATION_NAME)
            samples.extend(Wait(now, "migrating", query) for (query,) in running)
            await asyncio.sleep(SAMPLE_EVERY)
    finally:
        await conn.close()


def worst_appends(record: list[Append], samples: list[Wait], count: int = 5) -> list[str]:
    """The ``count`` slowest appends, each with what the service's sessions waited on meanwhile."""
    lines = []
    start = min((a.began for a in record), default=0.0)
    for a in sorted(record, key=lambda a: a.ended - a.began, reverse=True)[:count]:
        seen: dict[str, int] = {}
        migrating: dict[str, int] = {}
        for w in samples:
            if a.began <= w.at <= a.ended:
                if w.event == "migrating":
                    migrating[w.behind or ""] = migrating.get(w.behind or "", 0) + 1
                else:
                    what = w.event + (f" behind {w.behind}" if w.behind else "")
                    seen[what] = seen.get(what, 0) + 1
        waits = "; ".join(f"{what} ({n}x)" for what, n in sorted(seen.items(), key=lambda kv: -kv[1])[:3])
        doing = "; ".join(query for query, _ in sorted(migrating.items(), key=lambda kv: -kv[1])[:2])
        lines.append(
            f"{(a.ended - a.began) * 1000:.0f} ms at {a.began - start:.1f} s: {waits or 'no wait sampled'}"
            f" (the migration meanwhile: {doing or 'nothing sampled'})"
        )
    return lines


def describe(record: list[Append]) -> str:
    ms = sorted((a.ended - a.began) * 1000 for a in record)
    if not ms:
        return "no appends"
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return f"{len(ms):,} appends, median {statistics.median(ms):.1f} ms, p99 {p99:.1f} ms, worst {ms[-1]:.1f} ms"


async def deploy(db: DatabaseTarget, server: Server, args: argparse.Namespace, ids: list[str]) -> list[Append]:
    """Both phases, one after the other, under the appends; returns every append's record."""
    body = dumps(turn_payload(tool_calls=3)).encode()
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    record: list[Append] = []
    samples: list[Wait] = []
    baseline = warm = 0
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=server.url(""), headers=headers, timeout=30) as client:
        clients = [asyncio.ensure_future(append_forever(client, ids, body, record, stop)) for _ in range(args.clients)]
        clients.append(asyncio.ensure_future(sample_waits(db, samples, stop)))
        try:
            if args.baseline > 0:
                # The same appends with nothing migrating, after WARM_UP: what this machine's own
                # stalls (a WAL fsync, a checkpoint, both CPUs busy) cost them, the yardstick for
                # the phases' figures.
                await asyncio.sleep(WARM_UP)
                warm = len(record)
                await asyncio.sleep(args.baseline)
                baseline = len(record)
                say(f"baseline, {args.baseline:.0f} s with no migration: {describe(record[warm:baseline])}")
                for line in worst_appends(record[warm:baseline], samples, 3):
                    say(f"    {line}")
            phases_began = time.time()
            for phase, command in (
                ("pre-deploy", ["upgrade", "head"]),
                ("post-deploy", ["-x", f"{PHASE_ARGUMENT}={POST_DEPLOY}", "upgrade", "head"]),
            ):
                began, first = time.monotonic(), len(record)
                code, output = await alembic(db, *command)
                for line in output.splitlines():
                    if "backend.migrations" in line or "Running upgrade" in line:
                        say(f"  {line.strip()}")
                if code != 0:
                    raise SystemExit(f"alembic {' '.join(command)} failed:\n{output}")
                say(f"{phase}: {time.monotonic() - began:.1f} s (the alembic process's start included)")
                say(f"  appends meanwhile: {describe(record[first:])}")
                say("  the slowest, with what the service's sessions waited on meanwhile (sampled every 10 ms):")
                for line in worst_appends(record[first:], samples):
                    say(f"    {line}")
        finally:
            stop.set()
            await asyncio.gather(*clients)
    if args.baseline > 0 and record[warm:baseline] and record[baseline:]:
        say(
            f"worst append during the phases {worst(record[baseline:]):.1f} ms, "
            f"with no migration {worst(record[warm:baseline]):.1f} ms"
        )
    say(
        f"longest lock wait of a service session during the phases: {longest_lock_wait(samples, phases_began):.0f} ms"
        f" (sampled every {SAMPLE_EVERY * 1000:.0f} ms)"
    )
    return record


def worst(record: list[Append]) -> float:
    return max((a.ended - a.began) * 1000 for a in record)


async def run(args: argparse.Namespace) -> None:
    settings = Settings()
    root = await bench_server(settings)
    if args.base not in read_revisions().graph:
        raise SystemExit(f"--base {args.base}: no such revision")
    async with scratch_database(root, "kraken_bench_deploy") as db:
        conn = await connect(db)
        try:
            await conn.execute(f"ALTER DATABASE {ident(db.database)} SET timezone = {literal(args.timezone)}")
        finally:
            await conn.close()
        await migrate(db, "upgrade", args.base)
        await fill(db, args.conversations, args.turns)
        conn = await connect(db)
        try:
            await conn.execute(SNAPSHOT)
            ids = [str(row[0]) for row in await conn.fetch("SELECT id FROM kraken_conversations LIMIT 10000")]
        finally:
            await conn.close()
        before = await sizes(db)
        with tempfile.TemporaryDirectory() as logs:
            # The pipeline migrates (the phases below), not the service at boot.
            server = start_kraken(db, args, Path(logs), migrate="off")
            try:
                server.wait_until_up()
                started = time.monotonic()
                record = await deploy(db, server, args, ids)
                total = time.monotonic() - started
            finally:
                server.stop()
        after = await sizes(db)
        conn = await connect(db)
        try:
            changed = await conn.fetchval(CHANGED)
            created = {
                row[0]: float(row[1]) for row in await conn.fetch(APPENDED, [a.turn_id for a in record if a.turn_id])
            }
        finally:
            await conn.close()
        # An appended turn's created_at is written while its request is in flight (the clocks of
        # this machine and its server are one clock; 1 ms of slack for the epoch's rounding).
        moved = sum(
            1
            for a in record
            if a.turn_id is not None and not (a.began - 0.001 <= created.get(a.turn_id, -1.0) <= a.ended + 0.001)
        )
        failed = [a for a in record if not 200 <= a.status < 300]
        say(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}; database time zone {args.timezone}")
        say(f"deploy: {total:.1f} s in all")
        say(f"appends over HTTP throughout: {describe(record)}")
        say(
            f"answers that were not 2xx: {len(failed)}"
            + (f" (statuses {sorted({a.status for a in failed})})" if failed else "")
        )
        say(f"stored instants that changed: {changed} (of the rows there before)")
        say(f"appended turns stamped outside the moments their request was in flight: {moved}")
        for name in TABLES:
            mb_before, mb_after = before[name] / 2**20, after[name] / 2**20
            say(f"{name}: {mb_before:,.0f} MB before, {mb_after:,.0f} MB after ({after[name] / before[name]:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="005", help="the revision the database is at before the deploy")
    parser.add_argument("--conversations", type=int, default=200_000)
    parser.add_argument("--turns", type=int, default=5, help="turns per conversation (one tool call each)")
    parser.add_argument("--timezone", default="America/New_York", help="the database's default time zone")
    parser.add_argument("--clients", type=int, default=4, help="connections appending over HTTP")
    parser.add_argument("--workers", type=int, default=2, help="kraken-backend's worker processes")
    parser.add_argument("--pool-size", type=int, default=8, help="database connections per worker process")
    parser.add_argument(
        "--baseline", type=float, default=30, help="seconds of appends with no migration first, the yardstick (0: none)"
    )
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
