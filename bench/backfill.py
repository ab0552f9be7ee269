"""The backfill engine (ops.backfill_by_key) on a large live table: its rate, its batches, the
service's insert waits meanwhile, and what it does to the table's size.

    uv run python bench/backfill.py --conversations 200000 --turns 5

Creates a scratch database on DATABASE_URL's server (or the embedded one when it is unset),
migrates it to head and fills it (bench/support.py: 1M turns with the defaults), then runs, in an
`alembic upgrade` subprocess on a copy of the migration package, a revision that adds a nullable
column to kraken_turns and sets it from two others on every row (the engine with its defaults:
batches tuned to 100 ms, pauses for lock waiters, a VACUUM once the table has grown by a fifth), while one
connection writes a conversation, a turn and a tool call every 5 ms and times each write.
First --baseline seconds of the same writes with nothing migrating, the yardstick.
Prints the engine's progress lines as they come, then rows/s, the batches' p50/p99, the worst
insert wait, the table's size before and after, and drops the database. A benchmark, not a
test: the numbers depend on the machine (the load average is printed with them).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
from insert_wait import WRITE, fetchval
from support import bench_server, fill, migrate, say

from backend.config import PROJECT_ROOT, Settings, postgres_ms
from backend.db.admin import scratch_database
from backend.db.engine import connect
from backend.db.url import DatabaseTarget
from backend.migrations.revisions import read_revisions
from backend.tests.helpers import scratch_alembic

REVISION = "901"
# The revision the engine runs: a column added (a catalog change), then set on every row.
SOURCE = '''
"""Bench: a new column on kraken_turns, set on every row by the backfill engine."""

from alembic import op

from backend.migrations import ops

revision = "{revision}"
down_revision = "{head}"
branch_labels = None
depends_on = None

TOKENS = "CAST(input_tokens AS bigint) + output_tokens"


def upgrade() -> None:
    op.execute("ALTER TABLE kraken_turns ADD COLUMN bench_tokens bigint")
    ops.backfill_by_key(
        "kraken_turns",
        "id",
        f"UPDATE kraken_turns SET bench_tokens = {{TOKENS}}"
        f" WHERE id = ANY(CAST(:keys AS uuid[])) AND bench_tokens IS DISTINCT FROM {{TOKENS}}",
        1000,
        pending=f"bench_tokens IS DISTINCT FROM {{TOKENS}}",
        label="bench_tokens",
    )


def downgrade() -> None:
    op.execute("ALTER TABLE kraken_turns DROP COLUMN bench_tokens")
'''
SIZES = "SELECT pg_table_size('kraken_turns'), pg_total_relation_size('kraken_turns')"
# Rows of the fill left wrong (must be none). The writer's own rows are not counted: with random
# uuids some land behind the walk, and keeping rows written meanwhile right is the new code's job
# (or a trigger's), not the backfill's.
WRONG = (
    "SELECT count(*) FROM kraken_turns AS t JOIN kraken_conversations AS c ON c.id = t.conversation_id"
    " WHERE c.session_id <> 'bench-live'"
    " AND t.bench_tokens IS DISTINCT FROM CAST(t.input_tokens AS bigint) + t.output_tokens"
)
PACE = 0.005


def mb(size: int) -> str:
    return f"{size / 2**20:,.0f} MB"


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


async def sizes(db: DatabaseTarget) -> tuple[int, int]:
    conn = await connect(db)
    try:
        table, total = await conn.fetchrow(SIZES)
        return int(table), int(total)
    finally:
        await conn.close()


async def baseline(db: DatabaseTarget, seconds: float) -> None:
    """The same writer for ``seconds`` with nothing migrating: this machine's own stalls (a WAL
    fsync, a checkpoint), the yardstick for the inserts' waits during the backfill."""
    live = await connect(db)
    waits: list[float] = []
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            begun = time.monotonic()
            await live.execute(WRITE)
            waits.append((time.monotonic() - begun) * 1000)
            await asyncio.sleep(PACE)
    finally:
        await live.close()
    say(
        f"inserts with no migration ({seconds:g} s): {len(waits)}, median {statistics.median(waits):.1f} ms,"
        f" p99 {percentile(waits, 0.99):.1f} ms, worst {max(waits):.1f} ms"
    )


async def backfill(db: DatabaseTarget, ini: Path, lock_timeout: float) -> None:
    """The revision in a subprocess while a writer writes every ``PACE`` s; the figures."""
    env = {k: v for k, v in os.environ.items() if k != "MIGRATIONS_DATABASE_URL"}
    env["DATABASE_URL"] = db.dsn
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "alembic", "-c", str(ini), "upgrade", REVISION,
        cwd=PROJECT_ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert process.stdout is not None
    output: list[str] = []
    batches: list[float] = []
    waits: list[tuple[float, float]] = []  # (when it began, how long it took), in monotonic seconds
    vacuums: list[tuple[float, float]] = []  # (start, end) of the engine's VACUUMs, as their lines say
    failures = 0
    done = asyncio.Event()
    live = await connect(db)
    await live.execute(f"SET lock_timeout = '{postgres_ms(lock_timeout)}ms'")

    async def read() -> None:
        assert process.stdout is not None
        async for raw in process.stdout:
            line = raw.decode().rstrip()
            output.append(line)
            if "batch of" in line and " ms" in line:
                batches.append(float(line.split(" changed, ")[1].split(" ms")[0]))
            elif "backend.migrations.ops" in line:
                say(f"  {line}")
                if ": VACUUM " in line and " took " in line:
                    took = float(line.rsplit(" took ", 1)[1].split(" s")[0])
                    vacuums.append((time.monotonic() - took, time.monotonic()))
        done.set()

    async def write() -> None:
        nonlocal failures
        while not done.is_set():
            begun = time.monotonic()
            try:
                await live.execute(WRITE)
            except asyncpg.LockNotAvailableError:
                failures += 1
            waits.append((begun, time.monotonic() - begun))
            await asyncio.sleep(PACE)

    started = time.monotonic()
    try:
        await asyncio.gather(read(), write())
    finally:
        await live.close()
    elapsed = time.monotonic() - started
    if await process.wait() != 0:
        raise SystemExit("alembic upgrade failed:\n" + "\n".join(output[-30:]))
    walked = next((line for line in reversed(output) if "row(s) changed" in line), "")
    rows = int(walked.split(" of ")[1].split(" row(s)")[0]) if walked else 0
    say(f"revision {REVISION}: {elapsed:.1f} s in all (the alembic process's start included)")
    say(f"rows walked: {rows:,}, {rows / elapsed:,.0f} rows/s over the whole run")
    if batches:
        say(
            f"batches: {len(batches)}, p50 {statistics.median(batches):.0f} ms, p99 {percentile(batches, 0.99):.0f} ms,"
            f" longest {max(batches):.0f} ms"
        )
    ms = sorted(wait * 1000 for _, wait in waits)
    say(
        f"inserts meanwhile: {len(ms)}, median {statistics.median(ms):.1f} ms, p99 {percentile(ms, 0.99):.1f} ms,"
        f" worst {ms[-1]:.1f} ms; {failures} hit the lock timeout ({lock_timeout:g} s)"
    )

    def during(begun: float, wait: float) -> str:
        overlaps = any(begun < end and begun + wait > start for start, end in vacuums)
        return "during a VACUUM" if overlaps else "during the batches"

    # Where the worst waits fall: the batches' WAL and locks, or the engine's VACUUM passes.
    worst = sorted(waits, key=lambda each: each[1], reverse=True)[:5]
    say(
        "worst inserts: "
        + "; ".join(f"{wait * 1000:.0f} ms at {begun - started:.1f} s {during(begun, wait)}" for begun, wait in worst)
    )
    for phase in ("during the batches", "during a VACUUM"):
        phase_ms = sorted(wait * 1000 for begun, wait in waits if during(begun, wait) == phase)
        if phase_ms:
            say(
                f"  {phase}: {len(phase_ms)} inserts, p99 {percentile(phase_ms, 0.99):.1f} ms,"
                f" worst {phase_ms[-1]:.1f} ms"
            )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=200_000)
    parser.add_argument("--turns", type=int, default=5, help="turns per conversation (one tool call each)")
    parser.add_argument(
        "--baseline", type=float, default=20, help="seconds of the writer with no migration first, the yardstick"
    )
    args = parser.parse_args()

    settings = Settings()
    server = await bench_server(settings)
    [head] = read_revisions().heads
    async with scratch_database(server, "kraken_bench") as db:
        await migrate(db, "upgrade", "head")
        await fill(db, args.conversations, args.turns)
        with tempfile.TemporaryDirectory() as scratch:
            ini = scratch_alembic(
                Path(scratch), {f"{REVISION}_bench_backfill.py": SOURCE.format(revision=REVISION, head=head)}
            )
            # The engine's line per batch (DEBUG) gives the batch times.
            ini.write_text(ini.read_text().replace("[logger_backend]\nlevel = INFO", "[logger_backend]\nlevel = DEBUG"))
            before = await sizes(db)
            load = os.getloadavg()
            if args.baseline > 0:
                await baseline(db, args.baseline)
            await backfill(db, ini, settings.ddl_lock_timeout)
            after = await sizes(db)
        say(
            f"kraken_turns: table {mb(before[0])} before, {mb(after[0])} after ({after[0] / before[0]:.2f}x);"
            f" with its indexes {mb(before[1])} before, {mb(after[1])} after ({after[1] / before[1]:.2f}x)"
        )
        say(f"rows of the fill left wrong: {await fetchval(db, WRONG)}")
        say(f"load average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in load)} before the backfill,"
            f" {' '.join(f'{x:.2f}' for x in os.getloadavg())} after")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
