"""What tests share besides fixtures: running the CLI as a user would, one-off SQL, running
revision helpers, the API's test data, and the schema revisions leave."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from alembic.operations import Operations
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncConnection

from backend.config import PROJECT_ROOT, Settings
from backend.database import create_service_pool, service_lender
from backend.db.engine import connect, create_migration_engine
from backend.db.pool import PoolLender
from backend.db.url import DatabaseTarget
from backend.migrations import ops
from backend.migrations.revisions import SchemaStatus, alembic_config, read_revisions
from backend.tests import preloaded

RUN_ID = secrets.token_hex(4)
# The real script directory's head, and the id `alembic revision` gives the next file. (With two
# heads, test_revision_graph fails and says how to fix it; the other tests take the highest.)
HEAD = max(read_revisions().heads)
NEXT = f"{int(HEAD) + 1:03d}"


def _served() -> str:
    """The revision the pre-deploy phase reaches on an empty database (`alembic upgrade head`, a
    boot): the last one before the trailing post-deploy revisions, HEAD when there are none (the
    boot's own rule, ``SchemaStatus.post_deploy_pending``)."""
    empty = SchemaStatus((), read_revisions())
    return [rev for rev in empty.pending if rev not in empty.post_deploy_pending][-1]


SERVED = _served()
# The revisions that phase applies on an empty database, in order (001 ... SERVED).
SERVED_REVISIONS = sorted(rev for rev in read_revisions().graph if rev <= SERVED)
# What `alembic current` prints after `alembic upgrade head` (the pre-deploy phase).
SERVED_CURRENT = SERVED + (" (head)" if SERVED == HEAD else "")
POST_DEPLOY_UPGRADE = ("-x", "phase=post-deploy", "upgrade", "head")  # both phases: the schema the models describe
# Scratch copies (scratch_alembic) run the real revisions in the pre-deploy phase: see there.
_POST_DEPLOY_LINE = re.compile(r'^phase(\s*:\s*str)?\s*=\s*"post-deploy"[^\n]*\n', re.MULTILINE)


def url_of(target: DatabaseTarget) -> str:
    """The URL as a string a child process can take as DATABASE_URL."""
    return target.dsn


def child_env(target: DatabaseTarget | None, **extra: str) -> dict[str, str]:
    """Environment for a subprocess that should use ``target`` (or no database at all)."""
    env = {k: v for k, v in os.environ.items() if k != "MIGRATIONS_DATABASE_URL" and not k.startswith("KRAKEN_")}
    env.pop("DATABASE_URL", None)
    if target is not None:
        env["DATABASE_URL"] = url_of(target)
    env.update(extra)
    return env


def run_alembic(
    *args: str,
    target: DatabaseTarget | None,
    config: Path | None = None,
    cwd: Path = PROJECT_ROOT,
    fresh: bool = False,
    **extra: str,
) -> subprocess.CompletedProcess[str]:
    """Run the alembic CLI as a user would, from the repository root (or ``cwd``): in a process
    forked from one that has imported it (``backend.tests.preloaded``), or with ``fresh`` as a new
    program (``python -m alembic``), for the tests of what a new interpreter's start decides."""
    argv = [*(["-c", str(config)] if config is not None else []), *args]
    return preloaded.run("alembic", argv, cwd=cwd, env=child_env(target, **extra), fresh=fresh)


MEASUREMENT = "measurement"


def report(record_property: Callable[[str, object], None], text: str) -> None:
    """A measurement for the run's summary (conftest prints them at the end: a test's own output
    is not shown when it passes, nor from a worker of ``-n``)."""
    record_property(MEASUREMENT, text)


def run_kraken_migrations(
    *args: str, target: DatabaseTarget | None, config: Path | None = None, fresh: bool = False, **extra: str
) -> subprocess.CompletedProcess[str]:
    """Run the `kraken-migrations` console script as a user would, from the repository root
    (forked from the preloaded process, or with ``fresh`` as a new program: see ``run_alembic``)."""
    argv = [*(["-c", str(config)] if config is not None else []), *args]
    return preloaded.run("kraken-migrations", argv, cwd=PROJECT_ROOT, env=child_env(target, **extra), fresh=fresh)


def out(result: subprocess.CompletedProcess[str]) -> str:
    """Everything a command printed (alembic prints FAILED lines on stdout, logs on stderr)."""
    return result.stdout + result.stderr


def trailing_post_deploy(doc: str, upgrade_sql: str, downgrade_sql: str) -> str:
    """Source of a post-deploy revision NEXT after HEAD, for ``scratch_alembic``: the real package
    has no post-deploy revision trailing its head, and the state a release is in from its restart
    until the post-deploy phase runs is built with a copy of the package that has one."""
    return f'''
    """{doc}"""
    from alembic import op

    revision = "{NEXT}"
    down_revision = "{HEAD}"
    phase = "post-deploy"


    def upgrade() -> None:
        op.execute("{upgrade_sql}")


    def downgrade() -> None:
        op.execute("{downgrade_sql}")
'''


def scratch_alembic(directory: Path, revisions: dict[str, str] | None = None, *, models: str | None = None) -> Path:
    """A copy of the migration package in ``directory``, plus extra revision files; returns its ini.

    For tests that add revisions (slow ones, lock-hungry ones) without touching the real package.
    ``models``: Python source that adds to the models (``from backend.models import Base``, then
    tables of its own, columns and indexes appended to existing ones); the copy's env.py imports it
    after the models, so autogenerate compares the database with both.
    The real revisions are copied as pre-deploy ones (their ``phase = "post-deploy"`` line left
    out): the extra revisions come after the real head, and `alembic upgrade head` would refuse a
    pre-deploy one behind a post-deploy revision not yet run. The real phases are tested on the
    real package (test_previous_release.py, test_downgrades.py, test_revision_007.py);
    test_phases.py gives its own revisions their phases. On a database at head (``head_db``) the
    copy's 007 reads as edited since it was applied (its checksum lacks the phase): a development
    run warns and carries on, so a test there that runs the copy as production would be refused.
    """
    package = directory / "alembic"
    shutil.copytree(
        PROJECT_ROOT / "backend" / "alembic", package, ignore=shutil.ignore_patterns("__pycache__", "README.md")
    )
    if models is not None:
        (directory / "scratch_models.py").write_text(textwrap.dedent(models))
        env = package / "env.py"
        source = env.read_text()
        anchor = "from backend.models import Base\n"
        assert anchor in source, "env.py no longer imports the models as scratch_alembic expects"
        extra = f"sys.path.insert(0, {str(directory)!r})\nimport scratch_models  # noqa: F401, E402\n"
        env.write_text(source.replace(anchor, f"{anchor}import sys  # noqa: E402\n{extra}", 1))
    for copied in (package / "versions").glob("*.py"):
        copied.write_text(_POST_DEPLOY_LINE.sub("", copied.read_text()))
    for filename, source in (revisions or {}).items():
        (package / "versions" / filename).write_text(textwrap.dedent(source))
    ini = (PROJECT_ROOT / "alembic.ini").read_text()
    ini = ini.replace("script_location = backend:alembic", f"script_location = {package}")
    path = directory / "alembic.ini"
    path.write_text(ini)
    return path


# The autogenerate probe of issue 19 (backend/tests/migrations/autogenerate_probe.py): its source
# only, for a scratch copy's env.py to import (importing it here would change the models of the
# test process).
PROBE_MODELS = (PROJECT_ROOT / "backend" / "tests" / "migrations" / "autogenerate_probe.py").read_text()


def autogenerate(
    directory: Path, target: DatabaseTarget, models: str, message: str = "probe"
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """``alembic revision --autogenerate`` (the CLI) on a scratch copy whose models have ``models``
    added, against ``target`` (at head); the copy's ini and the command's result."""
    ini = scratch_alembic(directory, models=models)
    return ini, run_alembic("revision", "--autogenerate", "-m", message, target=target, config=ini)


# Runners in real processes, forked from the preloaded one (backend.tests.preloaded): each reports
# ready, then waits for the starting gun, so that all of them reach the database within a few
# milliseconds of each other.
BARRIER = """
import sys, time
from pathlib import Path
here = Path(sys.argv[1])
(here / f"ready-{{__import__('os').getpid()}}").touch()
while not (here / "go").exists():
    time.sleep(0.002)
{body}
"""
RUN_MIGRATIONS = BARRIER.format(
    body="""
import asyncio
from backend.migrations.runner import run_migrations
print(asyncio.run(run_migrations()).revision)
"""
)


def race(script: str, count: int, db: DatabaseTarget, directory: Path) -> list[subprocess.CompletedProcess[str]]:
    """Run ``script`` in ``count`` processes released at the same moment; their results."""
    directory.mkdir()
    env = child_env(db)
    children = [preloaded.start("python -c", [script, str(directory)], cwd=PROJECT_ROOT, env=env) for _ in range(count)]
    deadline = time.monotonic() + 120
    while len(list(directory.glob("ready-*"))) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    (directory / "go").touch()
    return [child.wait(180) for child in children]


async def fetch(target: DatabaseTarget, query: str, *args: object) -> list[asyncpg.Record]:
    """Run one statement on ``target`` on its own connection."""
    conn = await connect(target)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


def sql(target: DatabaseTarget, query: str, *args: object) -> list[asyncpg.Record]:
    """``fetch`` for synchronous test code."""
    return asyncio.run(fetch(target, query, *args))


async def until_waiting_for_a_lock(
    target: DatabaseTarget, count: int = 1, *, statement: str = "", for_more_than: float = 0.0
) -> None:
    """Until ``count`` sessions in ``target``'s database wait for a lock (those running a query
    that starts with ``statement``, waiting for more than ``for_more_than`` seconds), polled on a
    connection of its own (inside a transaction, pg_stat_activity would not change)."""
    query = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        " AND starts_with(query, $1) AND clock_timestamp() - query_start > make_interval(secs => $2)"
    )
    conn = await connect(target)
    try:
        async with asyncio.timeout(60 + for_more_than):  # a safety net, not a measurement
            while await conn.fetchval(query, statement, for_more_than) < count:
                await asyncio.sleep(0.01)
    finally:
        await conn.close()


async def run_ops_async(
    target: DatabaseTarget,
    operations: Callable[[], object],
    *,
    lock_timeout: str = "5s",
    long_waits: ops.LongWaits | None = None,
    x: Sequence[str] = (),
) -> None:
    """Run ``operations`` (calls to backend.migrations.ops) as a revision runs: on a connection of
    its own, with lock_timeout set (and ``long_waits``, as runner.py sets them), inside a
    MigrationContext whose transactions Alembic manages; ``x``: what ``alembic -x`` would pass."""
    engine = create_migration_engine(target)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(
                lambda sync: run_ops_on(sync, operations, lock_timeout=lock_timeout, long_waits=long_waits, x=x)
            )
    finally:
        await engine.dispose()


def run_ops_on(
    connection: Connection,
    operations: Callable[[], object],
    *,
    lock_timeout: str = "5s",
    long_waits: ops.LongWaits | None = None,
    x: Sequence[str] = (),
) -> None:
    """``run_ops_async`` on a connection the caller has (a sync driver's, say); ``x``: what
    ``alembic -x`` would pass."""
    connection.execute(text(f"SET lock_timeout = '{lock_timeout}'"))
    connection.commit()
    if long_waits is not None:
        connection.info[ops.LONG_WAITS] = long_waits
    config = alembic_config()
    config.cmd_opts = argparse.Namespace(x=list(x))
    environment = EnvironmentContext(config, ScriptDirectory.from_config(config))
    context = MigrationContext.configure(
        connection, environment_context=environment, opts={"transaction_per_migration": True}
    )
    with Operations.context(context), context.begin_transaction(_per_migration=True):
        operations()


def run_ops(
    target: DatabaseTarget,
    operations: Callable[[], object],
    *,
    lock_timeout: str = "5s",
    long_waits: ops.LongWaits | None = None,
    x: Sequence[str] = (),
) -> None:
    """``run_ops_async`` for synchronous test code."""
    asyncio.run(run_ops_async(target, operations, lock_timeout=lock_timeout, long_waits=long_waits, x=x))


def revision_module(revision: str) -> Any:
    """The real revision file ``revision`` as Alembic loaded it (its ``CHANGES``, its steps)."""
    script = ScriptDirectory.from_config(alembic_config()).get_revision(revision)
    assert script is not None, revision
    return script.module


def offline_ops(operations: Callable[[], object]) -> str:
    """The SQL ``operations`` emit in --sql mode: no connection exists, so nothing can be looked up."""
    buffer = io.StringIO()
    context = MigrationContext.configure(
        dialect_name="postgresql", opts={"as_sql": True, "output_buffer": buffer, "transaction_per_migration": True}
    )
    with Operations.context(context), context.begin_transaction(_per_migration=True):
        operations()
    return buffer.getvalue()


async def execute_script(db: DatabaseTarget, script: str) -> None:
    """Run offline SQL as psql -f does: in one session, statement after statement (Alembic
    separates them with a blank line; CREATE INDEX CONCURRENTLY must come on its own)."""
    conn = await connect(db)
    try:
        for statements in script.split("\n\n"):
            # A comment alone ("-- Running upgrade ...") is an empty query, which asyncpg cannot take.
            if any(line.strip() and not line.startswith("--") for line in statements.splitlines()):
                await conn.execute(statements)
    finally:
        await conn.close()


# --- the service as a process -------------------------------------------------------------------

SERVICE = str(Path(sys.executable).parent / "kraken-backend")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Service:
    """`kraken-backend` (or ``command``) in a child process, its output collected line by line as it comes."""

    def __init__(self, env: dict[str, str], command: list[str] | None = None) -> None:
        # One process unless a test asks for workers: they cost seconds to start and are what
        # backend/tests/test_workers.py is about.
        env = {"KRAKEN_WORKERS": "1", **env}
        self.process = subprocess.Popen(
            command or [SERVICE], cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert self.process.poll() is None, "\n".join(self.lines)
            assert time.monotonic() < deadline, "\n".join(self.lines)
            time.sleep(0.05)

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(timeout=30)
        self.reader.join(timeout=10)
        assert self.process.stdout is not None
        self.process.stdout.close()
        return "\n".join(self.lines)


@contextlib.contextmanager
def service(env: dict[str, str], command: list[str] | None = None) -> Iterator[Service]:
    running = Service(env, command)
    try:
        yield running
    finally:
        running.stop()


def get_json(port: int, path: str, deadline: float) -> dict[str, object]:
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
                return dict(json.load(response))
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# --- the docs ------------------------------------------------------------------------------

FENCE = re.compile(r"^(?P<indent> *)```(?P<info>[^`]*)$")


def fenced_blocks(doc: Path) -> list[tuple[str, int, list[str]]]:
    """The fenced blocks of a markdown file: (info string, line of its first line, its lines)."""
    found: list[tuple[str, int, list[str]]] = []
    lines = doc.read_text().splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent = opening["indent"]
        first = index + 2  # the block's first line, counted from 1
        body: list[str] = []
        index += 1
        while index < len(lines) and lines[index].strip() != "```":
            body.append(lines[index].removeprefix(indent))
            index += 1
        found.append((opening["info"].strip(), first, body))
        index += 1
    return found


# --- the conversation API ------------------------------------------------------------------

API_KEY = "test-api-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


CONVERSATION = {
    "session_id": "session-1",
    "model": "claude-test",
    "system_prompt_hash": "0123456789abcdef",
    "agent_version": "1.2.3",
}


def turn_body(**overrides: Any) -> dict[str, Any]:
    """A valid turn; keyword arguments replace fields."""
    body: dict[str, Any] = {
        "user_query": "What is the weather in Paris?",
        "assistant_response": "Sunny, 21 degrees.",
        "model": "claude-test",
        "input_tokens": 120,
        "output_tokens": 30,
        "cache_creation_tokens": 5,
        "cache_read_tokens": 7,
        "cost_usd": 0.001234,
        "duration_ms": 850,
        "tool_calls": [
            {"tool_name": "weather", "tool_args": {"city": "Paris"}, "tool_result": {"temp_c": 21, "sky": "sunny"}},
            {"tool_name": "clock", "tool_args": {}, "tool_result": "12:00"},
        ],
    }
    body.update(overrides)
    return body


@contextlib.asynccontextmanager
async def live(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client of ``app`` as it runs in production (lifespan, pooled engine, real commits), with the API key."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://kraken", headers=AUTH) as client:
            yield client


# The schemas this release serves (conftest's new_york_dbs): after the pre-deploy phase (from
# the restart on), and at head (after the post-deploy phase); one when no post-deploy revision
# trails. A test marked so runs on each. (The schemas older releases meet, the timestamp columns
# without time zone among them, are test_previous_release's: each release's own tests.)
SERVED_SCHEMAS = ("served", "head") if SERVED != HEAD else ("head",)
each_served_schema = pytest.mark.parametrize("served_schema", SERVED_SCHEMAS)


def utc(moment: str) -> datetime:
    """An instant written without an offset, as UTC: ``utc("2025-01-01 10:00")``."""
    return datetime.fromisoformat(moment).replace(tzinfo=UTC)


def instant(value: datetime) -> datetime:
    """A time read from either form of column (naive UTC wall-clock, or aware) as an aware UTC datetime."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


async def set_time(connection: AsyncConnection, table: str, column: str, row_id: str, moment: str) -> None:
    """Store the instant ``moment`` (UTC) in ``table.column`` of row ``row_id``, whichever form the column has."""
    await rows(
        connection, f"UPDATE {table} SET {column} = CAST(:at AS timestamptz) WHERE id = :id", at=utc(moment), id=row_id
    )


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def new_user(client: httpx.AsyncClient, name: str = "ada") -> dict[str, Any]:
    """A user made with the operator's ``client``, with its key (``api_key``)."""
    response = await client.post("/users", json={"name": name})
    assert response.status_code == 201, response.text
    user: dict[str, Any] = response.json()
    return user


async def new_conversation(client: httpx.AsyncClient, **overrides: Any) -> dict[str, Any]:
    response = await client.post("/conversations", json={**CONVERSATION, **overrides})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def rows(connection: AsyncConnection, query: str, **params: Any) -> list[Any]:
    """Rows of ``query`` on the test's connection (sees the test's uncommitted writes); [] for a write."""
    result = await connection.execute(text(query), params)
    return list(result.all()) if result.returns_rows else []


async def stored_counts(connection: AsyncConnection, conversation_id: str) -> tuple[int, int]:
    """(turns, tool calls) stored for a conversation."""
    [row] = await rows(
        connection,
        "SELECT count(DISTINCT t.id) AS turns, count(tc.id) AS calls FROM kraken_turns t"
        " LEFT JOIN kraken_tool_calls tc ON tc.turn_id = t.id WHERE t.conversation_id = :id",
        id=conversation_id,
    )
    return row.turns, row.calls


# --- metrics ------------------------------------------------------------------------------


def metric(text: str, name: str, **labels: str) -> float:
    """The sample ``name`` with exactly ``labels`` in a Prometheus text exposition; 0 when absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


# --- the schema revision 002 leaves --------------------------------------------------------

# Everything 002 leaves on the three tables, spelled out from the issue, not read from the revision.
EXPECTED_CONSTRAINTS = {
    ("kraken_conversations", "kraken_conversations_pkey"): "PRIMARY KEY (id)",
    ("kraken_conversations", "kraken_conversations_total_turns_check"): "CHECK ((total_turns >= 0))",
    ("kraken_conversations", "kraken_conversations_total_tokens_check"): "CHECK ((total_tokens >= 0))",
    ("kraken_conversations", "kraken_conversations_total_cost_usd_check"): "CHECK ((total_cost_usd >= (0)::numeric))",
    ("kraken_turns", "kraken_turns_pkey"): "PRIMARY KEY (id)",
    ("kraken_turns", "kraken_turns_conversation_id_fkey"): (
        "FOREIGN KEY (conversation_id) REFERENCES kraken_conversations(id) ON DELETE CASCADE"
    ),
    ("kraken_turns", "kraken_turns_conversation_id_turn_number_key"): "UNIQUE (conversation_id, turn_number)",
    ("kraken_turns", "kraken_turns_input_tokens_check"): "CHECK ((input_tokens >= 0))",
    ("kraken_turns", "kraken_turns_output_tokens_check"): "CHECK ((output_tokens >= 0))",
    ("kraken_turns", "kraken_turns_cost_usd_check"): "CHECK ((cost_usd >= (0)::numeric))",
    ("kraken_turns", "kraken_turns_duration_ms_check"): "CHECK ((duration_ms >= 0))",
    ("kraken_turns", "kraken_turns_tool_calls_count_check"): "CHECK ((tool_calls_count >= 0))",
    ("kraken_turns", "kraken_turns_cache_creation_tokens_check"): "CHECK ((cache_creation_tokens >= 0))",
    ("kraken_turns", "kraken_turns_cache_read_tokens_check"): "CHECK ((cache_read_tokens >= 0))",
    ("kraken_tool_calls", "kraken_tool_calls_pkey"): "PRIMARY KEY (id)",
    ("kraken_tool_calls", "kraken_tool_calls_turn_id_fkey"): (
        "FOREIGN KEY (turn_id) REFERENCES kraken_turns(id) ON DELETE CASCADE"
    ),
    ("kraken_tool_calls", "kraken_tool_calls_turn_id_sequence_order_key"): "UNIQUE (turn_id, sequence_order)",
}
EXPECTED_INDEXES = {
    "kraken_conversations_pkey": "(id)",
    "ix_kraken_conversations_session_id": "(session_id)",
    "ix_kraken_conversations_started_at": "(started_at)",
    "kraken_turns_pkey": "(id)",
    "ix_kraken_turns_conversation_id": "(conversation_id)",
    "kraken_turns_conversation_id_turn_number_key": "(conversation_id, turn_number)",
    "kraken_tool_calls_pkey": "(id)",
    "ix_kraken_tool_calls_turn_id": "(turn_id)",
    "kraken_tool_calls_turn_id_sequence_order_key": "(turn_id, sequence_order)",
}


# What 003 adds (partial unique indexes for Idempotency-Keys) and what 004 changes: the usage index
# by time covering what GET /usage reads, and 001's two single-column indexes that 002's unique
# indexes made redundant, gone.
INDEXES_003_ADDS = {
    "ix_kraken_conversations_idempotency_key": "(idempotency_key) WHERE (idempotency_key IS NOT NULL)",
    "ix_kraken_turns_conversation_id_idempotency_key": (
        "(conversation_id, idempotency_key) WHERE (idempotency_key IS NOT NULL)"
    ),
}
INDEXES_004_ADDS = {
    "ix_kraken_turns_created_at": (
        "(created_at) INCLUDE (model, input_tokens, output_tokens, cache_creation_tokens, cache_read_tokens, cost_usd)"
    ),
}
INDEXES_004_DROPS = {"ix_kraken_turns_conversation_id", "ix_kraken_tool_calls_turn_id"}
EXPECTED_INDEXES_003 = {**EXPECTED_INDEXES, **INDEXES_003_ADDS}
EXPECTED_INDEXES_004 = {
    **{name: columns for name, columns in EXPECTED_INDEXES_003.items() if name not in INDEXES_004_DROPS},
    **INDEXES_004_ADDS,
}

# 006 adds a timestamptz copy of each timestamp column (a type change under way), each indexed as its column is.
INDEXES_006_ADDS = {
    "ix_kraken_conversations_started_at__new": "(started_at__new)",
    "ix_kraken_turns_created_at__new": (
        "(created_at__new) INCLUDE (model, input_tokens, output_tokens, cache_creation_tokens, cache_read_tokens,"
        " cost_usd)"
    ),
}
EXPECTED_INDEXES_006 = {**EXPECTED_INDEXES_004, **INDEXES_006_ADDS}
# 007 swaps them: each index keeps its name on the column of that name (timestamptz now), and the
# old column's takes the suffix.
EXPECTED_INDEXES_007 = {
    name.replace("__new", "__old"): columns.replace("__new", "__old") for name, columns in EXPECTED_INDEXES_006.items()
}

# Users and their keys (issue 20): kraken_users, and kraken_conversations.user_id referring to it, indexed.
CONSTRAINTS_USERS_ADDS = {
    ("kraken_users", "kraken_users_pkey"): "PRIMARY KEY (id)",
    ("kraken_users", "kraken_users_api_key_hash_key"): "UNIQUE (api_key_hash)",
    ("kraken_conversations", "kraken_conversations_user_id_fkey"): "FOREIGN KEY (user_id) REFERENCES kraken_users(id)",
}
INDEXES_USERS_ADDS = {
    "kraken_users_pkey": "(id)",
    "kraken_users_api_key_hash_key": "(api_key_hash)",
    "ix_kraken_conversations_user_id": "(user_id)",
}
EXPECTED_INDEXES_008 = {**EXPECTED_INDEXES_007, **INDEXES_USERS_ADDS}
# 009 drops the old columns, their indexes with them.
EXPECTED_INDEXES_009 = {name: columns for name, columns in EXPECTED_INDEXES_008.items() if "__old" not in name}
# Feedback on turns (issue 20, 010): one row per turn, cascading from its turn and its conversation;
# indexed by conversation and for the export's keyset order.
CONSTRAINTS_FEEDBACK_ADDS = {
    ("kraken_feedback", "kraken_feedback_pkey"): "PRIMARY KEY (id)",
    ("kraken_feedback", "kraken_feedback_turn_id_key"): "UNIQUE (turn_id)",
    ("kraken_feedback", "kraken_feedback_feedback_type_check"): (
        "CHECK (((feedback_type)::text = ANY ((ARRAY['positive'::character varying, "
        "'negative'::character varying])::text[])))"
    ),
    ("kraken_feedback", "kraken_feedback_turn_id_fkey"): (
        "FOREIGN KEY (turn_id) REFERENCES kraken_turns(id) ON DELETE CASCADE"
    ),
    ("kraken_feedback", "kraken_feedback_conversation_id_fkey"): (
        "FOREIGN KEY (conversation_id) REFERENCES kraken_conversations(id) ON DELETE CASCADE"
    ),
}
INDEXES_FEEDBACK_ADDS = {
    "kraken_feedback_pkey": "(id)",
    "kraken_feedback_turn_id_key": "(turn_id)",
    "ix_kraken_feedback_conversation_id": "(conversation_id)",
    "ix_kraken_feedback_created_at_id": "(created_at, id)",
}
EXPECTED_INDEXES_010 = {**EXPECTED_INDEXES_009, **INDEXES_FEEDBACK_ADDS}
EXPECTED_CONSTRAINTS_HEAD = {**EXPECTED_CONSTRAINTS, **CONSTRAINTS_USERS_ADDS, **CONSTRAINTS_FEEDBACK_ADDS}
EXPECTED_INDEXES_HEAD = EXPECTED_INDEXES_010


def constraints(db: DatabaseTarget) -> dict[tuple[str, str], tuple[str, bool]]:
    rows = sql(
        db,
        "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid), convalidated FROM pg_constraint"
        # PostgreSQL 18 records NOT NULL as constraints too (contype n); columns cover those.
        " WHERE conrelid::regclass::text LIKE 'kraken\\_%' AND contype <> 'n'",
    )
    return {(r[0], r[1]): (r[2], r[3]) for r in rows}


def indexes(db: DatabaseTarget) -> dict[str, tuple[str, bool]]:
    """index -> (its key columns, valid)"""
    rows = sql(
        db,
        "SELECT indexrelid::regclass::text, substring(pg_get_indexdef(indexrelid) from '\\(.*\\)$'),"
        " indisvalid AND indisready FROM pg_index WHERE indrelid::regclass::text LIKE 'kraken\\_%'",
    )
    return {r[0]: (r[1], r[2]) for r in rows}


def assert_schema_002(db: DatabaseTarget) -> None:
    found = constraints(db)
    assert {key: definition for key, (definition, _) in found.items()} == EXPECTED_CONSTRAINTS
    assert all(validated for _, validated in found.values())
    assert indexes(db) == {name: (columns, True) for name, columns in EXPECTED_INDEXES.items()}


def assert_indexes(db: DatabaseTarget, expected: dict[str, str]) -> None:
    """The tables' indexes are exactly ``expected`` (name -> columns), all valid."""
    assert indexes(db) == {name: (columns, True) for name, columns in expected.items()}


# --- the request path on a test's transaction ------------------------------------------------


class SavepointLender:
    """Lends the test's connection, each request in a savepoint of the test's transaction: a
    request that fails rolls back to it, as a failed statement does in production, and the test
    leaves nothing behind."""

    def __init__(self, connection: asyncpg.Connection) -> None:
        self.connection = connection

    async def lend(self) -> SavepointLender:
        await self.connection.execute("SAVEPOINT request")
        return self

    async def give_back(self, succeeded: bool) -> None:
        if succeeded:
            try:
                await self.connection.execute("RELEASE SAVEPOINT request")
                return
            except asyncpg.InFailedSQLTransactionError:
                pass  # a statement failed and the request answered anyway (a handled unique violation)
        await self.connection.execute("ROLLBACK TO SAVEPOINT request; RELEASE SAVEPOINT request")


@contextlib.asynccontextmanager
async def lender_on(target: DatabaseTarget, settings: Settings) -> AsyncIterator[PoolLender]:
    """The service's pool on ``target`` as the lifespan makes it, with its lender; closed at the end."""
    lender = service_lender(await create_service_pool(target, settings), settings)
    try:
        yield lender
    finally:
        await lender.close()


async def driver_of(connection: AsyncConnection) -> asyncpg.Connection:
    """The asyncpg connection under a SQLAlchemy one."""
    driver: asyncpg.Connection = (await connection.get_raw_connection()).driver_connection
    return driver
