"""The autogenerate probe of issue 19 on a large live table: what `alembic revision --autogenerate`
writes for it, whether squawk passes it, and how long the service's inserts wait while it runs.

    uv run python bench/autogenerate_probe.py --conversations 200000 --turns 5

Creates a scratch database on DATABASE_URL's server (or the embedded one when it is unset),
migrates it to head and fills it (bench/support.py: 1M turns with the defaults). On a copy of
the migration package whose models gain the probe (backend/tests/migrations/autogenerate_probe.py:
a users table, a user_id foreign key and index on conversations, a ratings table with foreign
keys to turns and conversations, an index on turns, a new column), it runs the real CLI's
`alembic revision --autogenerate`, prints the revision's upgrade, lints it (`kraken-migrations
lint`, as CI does), then applies it while one connection keeps writing a conversation, a turn and
a tool call per transaction (bench/insert_wait.py's measure: lock_timeout as the migration's),
and prints the waits; then downgrades it and drops the database. A benchmark, not a test: the
numbers depend on the machine (the load average is printed with them).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from insert_wait import measure
from support import alembic, bench_server, fill, migrate, say

from backend.config import Settings
from backend.db.admin import scratch_database
from backend.tests.helpers import NEXT, PROBE_MODELS, run_kraken_migrations, scratch_alembic


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=200_000)
    parser.add_argument("--turns", type=int, default=5, help="turns per conversation (one tool call each)")
    args = parser.parse_args()

    settings = Settings()
    server = await bench_server(settings)
    async with scratch_database(server, "kraken_bench") as db:
        await migrate(db, "upgrade", "head")
        await fill(db, args.conversations, args.turns)
        with tempfile.TemporaryDirectory() as scratch:
            ini = scratch_alembic(Path(scratch), models=PROBE_MODELS)
            options = ("-c", str(ini))
            code, output = await alembic(db, *options, "revision", "--autogenerate", "-m", "probe")
            if code != 0:
                raise SystemExit(f"alembic revision --autogenerate failed:\n{output}")
            [path] = (Path(scratch) / "alembic" / "versions").glob(f"{NEXT}_probe.py")
            source = path.read_text()
            say(f"autogenerate wrote {path.name}:")
            for line in source.split("def upgrade() -> None:\n", 1)[1].split("\n\n\n", 1)[0].splitlines():
                say(f"  {line}")
            linted = await asyncio.to_thread(run_kraken_migrations, "lint", NEXT, target=None, config=ini)
            say(f"kraken-migrations lint {NEXT} (squawk on its offline SQL), exit {linted.returncode}:")
            for line in (linted.stdout + linted.stderr).strip().splitlines()[-5:]:
                say(f"  {line}")
            load = os.getloadavg()
            await measure(db, "head", settings.ddl_lock_timeout, [], [], options=options)
            started = time.monotonic()
            await migrate(db, *options, "downgrade", "-1")
            say(f"downgrade: {time.monotonic() - started:.1f} s (the alembic process's start included)")
        say(f"load average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in load)} before the upgrade,"
            f" {' '.join(f'{x:.2f}' for x in os.getloadavg())} after")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
