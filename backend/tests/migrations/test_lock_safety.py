"""The service keeps writing while schema changes run: no insert waits longer than the lock timeout.

Each test keeps inserting from another connection, with lock_timeout set to the migrations' lock
timeout, so an insert that would wait longer fails the test; the waits are measured and printed.
"""

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from backend.config import PROJECT_ROOT, Settings, postgres_ms
from backend.db.engine import connect
from backend.db.url import DatabaseTarget
from backend.migrations import ops
from backend.tests.helpers import (
    HEAD,
    NEXT,
    PROBE_MODELS,
    assert_schema_002,
    autogenerate,
    child_env,
    fetch,
    out,
    report,
    run_alembic,
    run_ops_async,
    scratch_alembic,
)

pytestmark = pytest.mark.slow

LOCK_TIMEOUT = float(Settings.model_fields["ddl_lock_timeout"].default)  # KRAKEN_DDL_LOCK_TIMEOUT's default
POLL = 0.005


async def migrate(db: DatabaseTarget, *args: str) -> None:
    result = await asyncio.to_thread(run_alembic, *args, target=db)
    assert result.returncode == 0, out(result)


async def writer(db: DatabaseTarget) -> asyncpg.Connection:
    conn = await connect(db)
    await conn.execute(f"SET lock_timeout = '{postgres_ms(LOCK_TIMEOUT)}ms'")
    return conn


async def timed(waits: list[tuple[float, float]], write: Callable[[], Awaitable[object]]) -> None:
    started = time.monotonic()
    await write()
    waits.append((started, time.monotonic()))


def longest(waits: list[tuple[float, float]]) -> float:
    return max(end - start for start, end in waits)


async def test_writes_continue_while_an_index_is_built_concurrently(
    empty_db: DatabaseTarget, record_property: Callable[[str, object], None]
) -> None:
    await fetch(empty_db, "CREATE TABLE items (id bigserial PRIMARY KEY, n integer NOT NULL, note text NOT NULL)")
    await fetch(empty_db, "INSERT INTO items (n, note) SELECT g % 1000, md5(g::text) FROM generate_series(1, 200000) g")
    # A writer whose transaction stays open: the concurrent build must wait for it to finish.
    holder = await connect(empty_db)
    held = holder.transaction()
    await held.start()
    await holder.execute("INSERT INTO items (n, note) VALUES (0, 'held')")
    live, watcher = await writer(empty_db), await connect(empty_db)
    waits: list[tuple[float, float]] = []

    async def insert() -> None:
        await timed(waits, lambda: live.execute("INSERT INTO items (n, note) VALUES (1, 'live')"))

    build = asyncio.ensure_future(
        run_ops_async(
            empty_db,
            lambda: ops.create_index_concurrently("ix_items_n", "items", ["n"]),
            lock_timeout=f"{postgres_ms(LOCK_TIMEOUT)}ms",
        )
    )
    try:
        waiting = (
            "SELECT a.wait_event_type = 'Lock' FROM pg_stat_progress_create_index p JOIN pg_stat_activity a USING (pid)"
            " WHERE p.relid = 'items'::regclass"
        )
        while not await watcher.fetchval(waiting):
            assert not build.done(), "the build did not wait for the open transaction"
            await asyncio.sleep(POLL)
        # The build waits for the holder, yet writes go straight through: they do not queue behind it.
        for _ in range(50):
            await insert()
        assert not build.done()
        while_waiting = longest(waits)

        await held.commit()
        while not build.done():
            await insert()
        await build
    finally:
        build.cancel()
        for conn in (holder, live, watcher):
            await conn.close()

    valid = await fetch(empty_db, "SELECT indisvalid FROM pg_index WHERE indexrelid = 'ix_items_n'::regclass")
    assert valid[0][0] is True
    assert (await fetch(empty_db, "SELECT count(*) FROM items"))[0][0] == 200_000 + 1 + len(waits)
    report(
        record_property,
        f"{len(waits)} inserts during a concurrent index build on 200,000 rows: longest wait "
        f"{longest(waits) * 1000:.1f} ms ({while_waiting * 1000:.1f} ms while the build waited for a writer); "
        f"lock timeout {LOCK_TIMEOUT:g} s",
    )
    assert longest(waits) < LOCK_TIMEOUT


SEED_002 = [
    "INSERT INTO kraken_conversations (session_id, model, system_prompt_hash, agent_version)"
    " SELECT 's' || g, 'm', 'h', 'v' FROM generate_series(1, 20000) g",
    "INSERT INTO kraken_turns (conversation_id, turn_number, user_query, assistant_response, model, input_tokens)"
    " SELECT c.id, n, 'q', 'a', 'm', n * 10 FROM kraken_conversations c, generate_series(1, 5) n",
    "INSERT INTO kraken_tool_calls (turn_id, tool_name, tool_args, tool_result, sequence_order)"
    " SELECT id, 'search', '{}', '{}', 1 FROM kraken_turns",
]
WRITE_A_TURN = """
WITH c AS (
    INSERT INTO kraken_conversations (session_id, model, system_prompt_hash, agent_version)
    VALUES ('live', 'm', 'h', 'v') RETURNING id
), t AS (
    INSERT INTO kraken_turns (conversation_id, turn_number, user_query, assistant_response, model)
    SELECT id, 1, 'q', 'a', 'm' FROM c RETURNING id
)
INSERT INTO kraken_tool_calls (turn_id, tool_name, tool_args, tool_result, sequence_order)
SELECT id, 'search', '{}', '{}', 1 FROM t
"""


async def test_writes_continue_while_002_runs(
    empty_db: DatabaseTarget, record_property: Callable[[str, object], None]
) -> None:
    await migrate(empty_db, "upgrade", "001")
    for statement in SEED_002:
        await fetch(empty_db, statement)
    live, watcher = await writer(empty_db), await connect(empty_db)
    waits: list[tuple[float, float]] = []
    building: list[float] = []  # moments at which a concurrent index build was running

    migration = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "alembic", "upgrade", "002",
        cwd=PROJECT_ROOT, env=child_env(empty_db), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    finished = asyncio.ensure_future(migration.communicate())

    async def watch() -> None:
        while not finished.done():
            if await watcher.fetchval("SELECT count(*) FROM pg_stat_progress_create_index"):
                building.append(time.monotonic())
            await asyncio.sleep(POLL)

    watching = asyncio.ensure_future(watch())
    try:
        while not finished.done():
            await timed(waits, lambda: live.execute(WRITE_A_TURN))
        output = (await finished)[0].decode()
        await watching
    finally:
        for conn in (live, watcher):
            await conn.close()

    assert migration.returncode == 0, output
    await asyncio.to_thread(assert_schema_002, empty_db)
    assert (await fetch(empty_db, "SELECT count(*) FROM kraken_turns"))[0][0] == 100_000 + len(waits)
    during_builds = [(s, e) for s, e in waits if any(s - POLL <= t <= e + POLL for t in building)]
    report(
        record_property,
        f"{len(waits)} writes (conversation + turn + tool call) while 002 ran on 100,000 turns: longest wait "
        f"{longest(waits) * 1000:.1f} ms; {len(during_builds)} of them during its concurrent index builds, longest "
        + (f"{longest(during_builds) * 1000:.1f} ms" if during_builds else "-")
        + f"; lock timeout {LOCK_TIMEOUT:g} s",
    )
    assert longest(waits) < LOCK_TIMEOUT


async def test_a_revision_retried_after_lock_timeout_keeps_the_index_it_built(empty_db: DatabaseTarget) -> None:
    await migrate(empty_db, "upgrade", "001")
    await fetch(empty_db, SEED_002[0].replace("20000", "1"))
    await fetch(empty_db, SEED_002[1].replace("generate_series(1, 5)", "generate_series(1, 1)"))
    # A reader idle in its transaction: the concurrent unique index build does not wait for it (it
    # holds no snapshot and writes nothing), the ACCESS EXCLUSIVE lock that attaches the
    # constraint does, hits lock_timeout, and env.py rolls back and retries the revision.
    holder = await connect(empty_db)
    held = holder.transaction()
    await held.start()
    # The simple query protocol: asyncpg's extended one would keep the statement's snapshot.
    await holder.execute("SELECT count(*) FROM kraken_turns")
    migration = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "alembic", "upgrade", "002",
        cwd=PROJECT_ROOT,
        env=child_env(empty_db, KRAKEN_DDL_LOCK_TIMEOUT="0.5", KRAKEN_DDL_LOCK_RETRIES="8"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert migration.stdout is not None
    lines: list[str] = []
    index = "SELECT indexrelid::int, indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)"
    name = "kraken_turns_conversation_id_turn_number_key"
    try:
        while not any("hit lock_timeout" in line for line in lines):
            line = (await asyncio.wait_for(migration.stdout.readline(), 60)).decode()
            assert line, "".join(lines)
            lines.append(line)
        built = [tuple(r) for r in await fetch(empty_db, index, name)]
        assert [valid for _, valid in built] == [True]
    finally:
        await held.commit()
        await holder.close()
    rest = (await asyncio.wait_for(migration.communicate(), 120))[0].decode()
    output = "".join(lines) + rest
    assert migration.returncode == 0, output
    # The retry found the index valid and kept it: the same index, not a rebuild.
    assert [tuple(r) for r in await fetch(empty_db, index, name)] == built
    assert "is INVALID" not in output
    await asyncio.to_thread(assert_schema_002, empty_db)


async def test_a_revision_picked_as_deadlock_victim_is_retried(head_db: DatabaseTarget, tmp_path: Path) -> None:
    # Child first, then parent: the order that deadlocks with the service's writes.
    ini = scratch_alembic(
        tmp_path,
        {
            f"{NEXT}_lock_in_the_wrong_order.py": f"""
                from alembic import op

                revision = "{NEXT}"
                down_revision = "{HEAD}"
                branch_labels = None
                depends_on = None


                def upgrade():
                    op.execute("LOCK TABLE kraken_turns IN ACCESS EXCLUSIVE MODE")
                    op.execute("LOCK TABLE kraken_conversations IN ACCESS EXCLUSIVE MODE")


                def downgrade():
                    pass
            """
        },
    )
    writer, watcher = await connect(head_db), await connect(head_db)
    # Whichever session checks for a deadlock first is the victim; the writer checks last.
    await writer.execute("SET deadlock_timeout = '30s'")
    migration = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "alembic", "-c", str(ini), "upgrade", "head",
        cwd=PROJECT_ROOT, env=child_env(head_db), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        async with writer.transaction():
            conversation = await writer.fetchval(
                "INSERT INTO kraken_conversations (session_id, model, system_prompt_hash, agent_version)"
                " VALUES ('s', 'm', 'h', 'v') RETURNING id"
            )
            blocked = (
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name = 'kraken-migrate' AND wait_event_type = 'Lock'"
            )
            while not await watcher.fetchval(blocked):
                await asyncio.sleep(POLL)
            # The migration holds the turns and waits for the conversations this writer holds; this
            # insert closes the circle.
            await writer.execute(
                "INSERT INTO kraken_turns (conversation_id, turn_number, user_query, assistant_response, model)"
                " VALUES ($1, 1, 'q', 'a', 'm')",
                conversation,
            )
        output = (await asyncio.wait_for(migration.communicate(), 120))[0].decode()
    finally:
        await writer.close()
        await watcher.close()
    assert migration.returncode == 0, output
    assert "revision was picked as a deadlock victim (attempt 1 of 5); rolled back, retrying" in output
    assert [r[0] for r in await fetch(head_db, "SELECT version_num FROM alembic_version")] == [NEXT]


async def test_writes_continue_while_an_autogenerated_revision_runs(
    head_db: DatabaseTarget, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    # The probe of issue 19, as autogenerate wrote it (no edits): two new tables with foreign keys
    # to the busy ones, a column with a foreign key and its index, another column, an index.
    # Autogenerate compares with a database at head (head_db: post-deploy revisions too).
    for statement in SEED_002:
        await fetch(head_db, statement)
    ini, generated = await asyncio.to_thread(autogenerate, tmp_path, head_db, PROBE_MODELS)
    assert generated.returncode == 0, out(generated)
    live = await writer(head_db)
    waits: list[tuple[float, float]] = []
    migration = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "alembic", "-c", str(ini), "upgrade", "head",
        cwd=PROJECT_ROOT, env=child_env(head_db), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    finished = asyncio.ensure_future(migration.communicate())
    try:
        while not finished.done():
            await timed(waits, lambda: live.execute(WRITE_A_TURN))
        output = (await finished)[0].decode()
    finally:
        await live.close()

    assert migration.returncode == 0, output
    assert [r[0] for r in await fetch(head_db, "SELECT version_num FROM alembic_version")] == [NEXT]
    assert (await fetch(head_db, "SELECT count(*) FROM kraken_turns"))[0][0] == 100_000 + len(waits)
    report(
        record_property,
        f"{len(waits)} writes (conversation + turn + tool call) while the autogenerated probe ran on 100,000 turns: "
        f"longest wait {longest(waits) * 1000:.1f} ms; lock timeout {LOCK_TIMEOUT:g} s",
    )
    assert longest(waits) < LOCK_TIMEOUT
