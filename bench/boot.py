"""What a boot at head costs: run_migrations() against a bare query and against the alembic CLI.

    uv run python bench/boot.py            # on the embedded PostgreSQL
    DATABASE_URL=postgresql://... uv run python bench/boot.py

Prints, from one run against one scratch database (created here, dropped at the end):
- median time of run_migrations() at head (which reads the version and the ledger's checksums in
  one query and validates them), of a bare asyncpg connect + SELECT version_num, and of spawning
  `alembic upgrade head`, with the two ratios the startup issue targets;
- how the at-head cost grows with 1, 50 and 200 revisions in the script directory (throwaway
  revisions in a temporary copy, each on record in the ledger), against the bare query on that
  database: warm (revision graph and checksums cached, as on every call after the first) and cold
  (both re-read from the files, as on a replica's first call).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from support import bench_server

from backend.config import PROJECT_ROOT, Settings
from backend.db.admin import scratch_database
from backend.db.engine import connect
from backend.db.url import DatabaseTarget
from backend.migrations.revisions import ALEMBIC_DIR, read_revisions
from backend.migrations.runner import run_migrations

ROUNDS = 200
CLI_ROUNDS = 5
SIZES = (1, 50, 200)


async def median_ms(call: Callable[[], Awaitable[object]], rounds: int = ROUNDS) -> float:
    await call()  # warm-up: imports, caches, the server's catalogue
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def settings_for(target: DatabaseTarget) -> Settings:
    return Settings.model_validate({"DATABASE_URL": target.dsn})


def cli_median_ms(target: DatabaseTarget) -> float:
    env = {**os.environ, "DATABASE_URL": target.dsn}
    samples = []
    for _ in range(CLI_ROUNDS):
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "alembic", "upgrade", "head"],
            cwd=PROJECT_ROOT,
            env=env,
            check=True,
            capture_output=True,
        )
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def script_copy(directory: Path, revisions: int) -> Path:
    """The migration package with exactly N revisions: the real ones up to N (they are numbered
    001, 002, ... in one line), then throwaway ones chained after them."""
    package = directory / f"alembic_{revisions}"
    shutil.copytree(ALEMBIC_DIR, package, ignore=shutil.ignore_patterns("__pycache__"))
    for path in (package / "versions").glob("*.py"):
        if int(path.name[:3]) > revisions:
            path.unlink()
    first = min(int(max(read_revisions().heads)), revisions) + 1
    for number in range(first, revisions + 1):
        (package / "versions" / f"{number:03d}_noop.py").write_text(
            f'"""Throwaway revision {number}."""\n\nrevision = "{number:03d}"\ndown_revision = "{number - 1:03d}"\n'
            "branch_labels = None\ndepends_on = None\n\n\ndef upgrade() -> None:\n    pass\n\n\n"
            "def downgrade() -> None:\n    pass\n"
        )
    return package


async def bare_query(target: DatabaseTarget) -> None:
    """The floor: one bare connection and one query."""
    conn = await connect(target)
    try:
        await conn.fetch("SELECT version_num FROM alembic_version")
    finally:
        await conn.close()


async def main() -> None:
    base = await bench_server()
    async with scratch_database(base, "kraken_bench_boot") as target:
        settings = settings_for(target)
        await run_migrations(settings)

        async def bare() -> None:
            await bare_query(target)

        async def at_head() -> None:
            status = await run_migrations(settings)
            assert status.at_head

        bare_ms = await median_ms(bare)
        boot_ms = await median_ms(at_head)
        cli_ms = await asyncio.to_thread(cli_median_ms, target)
    print(f"server: {target.safe}")
    print(f"{'bare asyncpg connect + SELECT version_num':48} {bare_ms:9.2f} ms  (median of {ROUNDS})")
    print(f"{'run_migrations() at head':48} {boot_ms:9.2f} ms  (median of {ROUNDS})")
    print(f"{'spawn `alembic upgrade head` at head':48} {cli_ms:9.2f} ms  (median of {CLI_ROUNDS})")
    print(f"run_migrations / bare = {boot_ms / bare_ms:.2f}x   (target <= 2.0x, validation included)")
    print(f"CLI / run_migrations  = {cli_ms / boot_ms:.0f}x   (target >= 50x)")

    print(f"\n{'revisions':>9} {'bare query':>11} {'warm at head':>13} {'ratio':>6} {'cold at head':>13} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in SIZES:
            package = script_copy(Path(tmp), size)
            async with scratch_database(base, f"kraken_bench_r{size}") as sized_db:
                sized = settings_for(sized_db)
                await run_migrations(sized, script_location=package)

                async def sized_bare(sized_db: DatabaseTarget = sized_db) -> None:
                    await bare_query(sized_db)

                async def warm(package: Path = package, sized: Settings = sized) -> None:
                    await run_migrations(sized, script_location=package)

                async def cold(package: Path = package, sized: Settings = sized) -> None:
                    read_revisions.cache_clear()
                    await run_migrations(sized, script_location=package)

                sized_bare_ms = await median_ms(sized_bare, 50)
                warm_ms = await median_ms(warm, 50)
                cold_ms = await median_ms(cold, 50)
            print(
                f"{len(read_revisions(package).graph):>9} {sized_bare_ms:>8.2f} ms {warm_ms:>10.2f} ms"
                f" {warm_ms / sized_bare_ms:>5.2f}x {cold_ms:>10.2f} ms {cold_ms / sized_bare_ms:>5.2f}x"
            )


if __name__ == "__main__":
    asyncio.run(main())
