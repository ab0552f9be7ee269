"""A primary with a synchronous hot standby behind a libpq multi-host URL: migrations find the
primary and never touch a standby, and the service rides out a fail-over under writes."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import pytest

from backend.db.url import parse_database_url
from backend.migrations.runner import DatabaseUnavailable, read_schema_status, run_migrations
from backend.models import Base
from backend.tests.conftest import settings_of
from backend.tests.helpers import (
    API_KEY,
    AUTH,
    CONVERSATION,
    SERVED,
    child_env,
    free_port,
    out,
    report,
    run_alembic,
    service,
)
from backend.tests.helpers import turn_body as valid_turn
from backend.tests.rigs.cluster import Cluster, format_url
from backend.tests.rigs.replication import ReplicationPair

pytestmark = pytest.mark.slow

TABLES = "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'kraken%' OR tablename = 'alembic_version'"


def new_database(pair: ReplicationPair) -> str:
    """A database made on the primary (and so on the standby too)."""
    name = f"kraken_ha_{secrets.token_hex(4)}"
    pair.primary.execute_sync(f'CREATE DATABASE "{name}"')
    pair.wait_replayed()
    return name


async def test_migrates_on_the_primary_when_the_standby_is_listed_first(replication: ReplicationPair) -> None:
    database = new_database(replication)
    url = replication.multi_host_url("read-write", database=database, standby_first=True)

    status = await run_migrations(settings_of(parse_database_url(url)))

    assert status.current == (SERVED,)
    # The tables of the served schema (every table of the models: SERVED is head) and alembic_version.
    assert await replication.primary.fetchval(TABLES, database=database) == len(Base.metadata.tables) + 1
    replication.wait_replayed()
    # Replicated, not run there.
    assert await replication.standby.fetchval(TABLES, database=database) == len(Base.metadata.tables) + 1


@pytest.mark.parametrize("attrs", ["read-write", None])
async def test_refuses_in_one_line_when_only_standbys_answer(replication: ReplicationPair, attrs: str | None) -> None:
    # Only the standby is listed. With no target_session_attrs (libpq's default: any server),
    # migrations still insist on a server that accepts writes.
    database = new_database(replication)
    query = {"target_session_attrs": attrs} if attrs else {}
    url = format_url([("127.0.0.1", replication.standby.port)], database=database, query=query)
    where = f"postgres@127.0.0.1:{replication.standby.port}/{database}"

    settings = settings_of(parse_database_url(url), db_connect_timeout=1)
    with pytest.raises(DatabaseUnavailable) as caught:
        await run_migrations(settings)
    assert str(caught.value) == (
        f"no server in {where} is a primary that accepts writes (target_session_attrs=read-write) (waited 1 s)"
    )
    cli = await asyncio.to_thread(
        run_alembic, "upgrade", "head", target=None, DATABASE_URL=url, KRAKEN_DB_CONNECT_TIMEOUT="1"
    )
    assert cli.returncode != 0
    # The CLI does not wait for the database: a deploy step fails at once (the boot waits).
    refusal = f"no server in {where} is a primary that accepts writes (target_session_attrs=read-write)"
    assert out(cli).strip() == f"FAILED: {refusal}"
    assert await replication.standby.fetchval(TABLES, database=database) == 0
    assert await replication.primary.fetchval(TABLES, database=database) == 0
    # Reading the standby as such is fine: only migrations need the primary.
    standby = parse_database_url(format_url([("127.0.0.1", replication.standby.port)], database=database))
    assert (await read_schema_status(standby)).current == ()


@dataclass
class Writes:
    """What the writers saw: every status, and each acknowledged turn."""

    statuses: list[tuple[float, int]] = field(default_factory=list)
    acknowledged: list[tuple[str, str, int]] = field(default_factory=list)  # (conversation, turn id, number)
    bodies: dict[int, str] = field(default_factory=dict)


async def write_until(client: httpx.AsyncClient, conversation: str, stop: asyncio.Event, seen: Writes) -> None:
    while not stop.is_set():
        try:
            response = await client.post(f"/conversations/{conversation}/turns", json=valid_turn(tool_calls=[]))
        except httpx.TransportError:
            await asyncio.sleep(0.05)  # the service itself never went away: see the assertion on statuses
            seen.statuses.append((time.monotonic(), 0))
            continue
        seen.statuses.append((time.monotonic(), response.status_code))
        if response.status_code == 201:
            turn = response.json()
            seen.acknowledged.append((conversation, turn["id"], turn["turn_number"]))
        else:
            seen.bodies.setdefault(response.status_code, response.text)
            await asyncio.sleep(0.05)


async def until_acknowledged(seen: Writes, count: int) -> None:
    """Until the writers have ``count`` acknowledged turns: writes counted, not timed (a loaded
    machine writes fewer in a second)."""
    async with asyncio.timeout(120):  # a safety net, not a measurement
        while len(seen.acknowledged) < count:
            await asyncio.sleep(0.05)


async def test_the_service_writes_again_after_a_failover_without_losing_an_acknowledged_turn(
    replication: ReplicationPair, record_property: Callable[[str, object], None]
) -> None:
    database = new_database(replication)
    url = replication.multi_host_url("read-write", database=database, standby_first=True)
    port = free_port()
    env = child_env(None, DATABASE_URL=url, KRAKEN_PORT=str(port), KRAKEN_API_KEY=API_KEY)
    seen, stop = Writes(), asyncio.Event()
    with service(env) as running:
        running.wait_for("Uvicorn running")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=30) as client:
            conversations = []
            for _ in range(8):
                created = await client.post("/conversations", json=CONVERSATION)
                assert created.status_code == 201, created.text
                conversations.append(created.json()["id"])
            # Two writers per conversation: appends to one conversation also race each other.
            writers = [
                asyncio.create_task(write_until(client, conversation, stop, seen)) for conversation in conversations * 2
            ]
            await until_acknowledged(seen, 60)
            await asyncio.to_thread(replication.stop_primary, "immediate")
            await asyncio.sleep(1.0)
            new_primary: Cluster = await asyncio.to_thread(replication.promote_standby)
            promoted = time.monotonic()
            deadline = promoted + 30
            while time.monotonic() < deadline and not any(t > promoted and s == 201 for t, s in seen.statuses):
                await asyncio.sleep(0.05)
            await until_acknowledged(seen, len(seen.acknowledged) + 50)  # and keep writing on the new primary
            stop.set()
            await asyncio.gather(*writers)
        log = running.stop()

    statuses = {status for _, status in seen.statuses}
    assert statuses <= {201, 503}, (seen.bodies, log)
    recovered = min(t for t, s in seen.statuses if t > promoted and s == 201) - promoted
    assert recovered < 10, f"wrote again {recovered:.1f} s after the promotion"
    assert 503 in statuses  # the gap was answered, as JSON with Retry-After (checked below)
    assert '"type":"database_unavailable"' in seen.bodies[503]
    assert "Traceback" not in log

    rows = await new_primary.connect(database)
    try:
        stored = {
            row["id"]: (str(row["conversation_id"]), row["turn_number"])
            for row in await rows.fetch("SELECT id::text, conversation_id, turn_number FROM kraken_turns")
        }
        totals = dict(await rows.fetch("SELECT id::text, total_turns FROM kraken_conversations"))
    finally:
        await rows.close()
    for conversation, turn_id, number in seen.acknowledged:
        assert stored.get(turn_id) == (conversation, number), f"acknowledged turn {turn_id} is not on the new primary"
    for conversation in conversations:
        numbers = sorted(n for c, n in stored.values() if c == conversation)
        assert numbers == list(range(1, totals[conversation] + 1)), f"{conversation}: {numbers}"
    assert len(seen.acknowledged) > 100  # writes really went on before and after
    answered = [s for _, s in seen.statuses]
    report(
        record_property,
        f"fail-over under 16 writers: {answered.count(201)} turns acknowledged, {answered.count(503)} answered 503, "
        f"none 500; writing again {recovered:.2f} s after the promotion",
    )
