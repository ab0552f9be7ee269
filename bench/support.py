"""What the benchmarks share: the server to use, alembic in a subprocess, a large table of turns,
and the workload's bodies.

Imported by the scripts beside it (``uv run python bench/<script>.py`` puts bench/ on the path).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from datetime import UTC, datetime

import asyncpg

from backend.config import PROJECT_ROOT, Settings, load_settings
from backend.conversations.schemas import ConversationCreate
from backend.db.embedded import embedded_server
from backend.db.engine import connect
from backend.db.url import DatabaseTarget


def say(line: str) -> None:
    """A progress or result line, out at once (a long run shows where it is)."""
    print(line, flush=True)


async def bench_server(settings: Settings | None = None) -> DatabaseTarget:
    """DATABASE_URL's server, or the embedded one when it is unset: where scratch databases go."""
    settings = settings or load_settings()
    return settings.database_target() or await embedded_server(settings.embedded_pgdata)


async def alembic(db: DatabaseTarget, *args: str) -> tuple[int, str]:
    """Run the alembic CLI on ``db`` as an operator would; (exit code, everything it printed)."""
    env = {k: v for k, v in os.environ.items() if k != "MIGRATIONS_DATABASE_URL"}
    env["DATABASE_URL"] = db.dsn
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "alembic", *args,
        cwd=PROJECT_ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output = (await process.communicate())[0].decode()
    assert process.returncode is not None
    return process.returncode, output


async def migrate(db: DatabaseTarget, *args: str) -> None:
    """``alembic`` that stops the benchmark, with alembic's output, when it fails."""
    code, output = await alembic(db, *args)
    if code != 0:
        raise SystemExit(f"alembic {' '.join(args)} failed:\n{output}")


def last_day(now: datetime | None = None) -> datetime:
    """Midnight UTC today (naive, as stored): the filled turns end there."""
    now = now or datetime.now(UTC)
    return now.replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)


# One batch of conversations with their turns (one tool call each) in one statement. Turns are
# spread evenly over [$5 - $4 days, $5), in the order they are written, as a live service writes them.
# Each conversation's totals are the sums of its turns (turn n: 100 n + 300 tokens, 0.0042 USD).
# Only 001's columns: it fills a database at any revision.
_FILL_BATCH = """
WITH c AS (
    INSERT INTO kraken_conversations (session_id, model, system_prompt_hash, agent_version,
                                      total_turns, total_tokens, total_cost_usd, started_at)
    SELECT 's' || g, 'claude-' || (g % 3), 'h', 'v',
           $3::int, 50 * $3::int * ($3::int + 1) + 300 * $3::int, 0.0042 * $3::int,
           $5::timestamp - make_interval(days => $4::int)
           + ((g - 1) * $3::int) * ($4::int * 86400.0 / $6::bigint) * interval '1 second'
    FROM generate_series($1::int, $2::int) g
    RETURNING id, session_id, model, started_at
), t AS (
    INSERT INTO kraken_turns (conversation_id, turn_number, user_query, assistant_response, model,
                              input_tokens, output_tokens, cache_read_tokens, cost_usd, duration_ms, created_at)
    SELECT c.id, n, repeat('q', 200), repeat('a', 800), c.model, 100 * n, 300, 50, 0.0042, 1200,
           c.started_at + (n - 1) * ($4::int * 86400.0 / $6::bigint) * interval '1 second'
    FROM c, generate_series(1, $3::int) n
    RETURNING id
)
INSERT INTO kraken_tool_calls (turn_id, tool_name, tool_args, tool_result, sequence_order)
SELECT id, 'search', '{"q": 1}', '{"hits": 3}', 1 FROM t
"""


async def fill(
    db: DatabaseTarget,
    conversations: int,
    turns: int,
    *,
    days: int = 100,
    batches: int = 20,
    end: datetime | None = None,
) -> None:
    """``conversations`` conversations of ``turns`` turns each (one tool call per turn), created
    over the ``days`` days before ``end`` (default: midnight UTC today); then VACUUM ANALYZE, as
    autovacuum would do on a live table (index-only scans need its visibility map), and a CHECKPOINT."""
    end = end or last_day()
    total = conversations * turns
    size = max(1, -(-conversations // batches))
    started = time.monotonic()
    conn = await connect(db)
    try:
        for first in range(1, conversations + 1, size):
            last = min(conversations, first + size - 1)
            await conn.execute(_FILL_BATCH, first, last, turns, days, end, total)
            say(f"  loaded {last * turns:,} of {total:,} turns ({time.monotonic() - started:.0f} s)")
        say("  VACUUM ANALYZE (as autovacuum would after such a load) ...")
        await conn.execute("VACUUM ANALYZE")
        # The load left gigabytes of WAL, and the checkpoint it calls for would otherwise come
        # during the measurement that follows (writers waited up to 200 ms for it in its first
        # second). A live server has settled long since. Superusers and pg_checkpoint may.
        try:
            await conn.execute("CHECKPOINT")
        except asyncpg.InsufficientPrivilegeError:
            say("  (no CHECKPOINT: this role may not; the first writes may wait for the server's own)")
    finally:
        await conn.close()
    say(f"{conversations:,} conversations, {total:,} turns and as many tool calls over {days} days before "
        f"{end:%Y-%m-%d} written in {time.monotonic() - started:.0f} s")  # fmt: skip


def conversation() -> ConversationCreate:
    return ConversationCreate(
        session_id="bench-" + uuid.uuid4().hex[:8], model="claude-bench", system_prompt_hash="0" * 16, agent_version="1"
    )


def turn_payload(tool_calls: int) -> dict[str, object]:
    """A turn like the chatbot's: a question, a few paragraphs, tool calls with ~400-byte results."""
    rows = [
        {"id": i, "name": f"Station {i}", "temp_c": 20.5 + i, "wind_kmh": 12, "sky": "partly cloudy"} for i in range(5)
    ]
    return {
        "user_query": "What is the weather like in Paris this afternoon, and should I take an umbrella? " * 2,
        "assistant_response": "It is partly cloudy in Paris with temperatures around 21 degrees. " * 8,
        "model": "claude-bench",
        "input_tokens": 1500,
        "output_tokens": 300,
        "cache_creation_tokens": 0,
        "cache_read_tokens": 1200,
        "cost_usd": 0.0123,
        "duration_ms": 2400,
        "tool_calls": [
            {
                "tool_name": f"weather_{j}",
                "tool_args": {"city": "Paris", "when": "15:00", "units": "metric"},
                "tool_result": {"stations": rows},
            }
            for j in range(tool_calls)
        ],
    }
