"""When the database fails mid-flight: JSON 503/504 with Retry-After, nothing half-stored, one log
line when trouble starts and one when it clears; an unexpected error is a JSON 500, logged once."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

import httpx
import pytest

from backend.api.deps import ConnectionDep
from backend.db import pool as db_pool
from backend.db import statements
from backend.db.engine import connect
from backend.db.statements import Statement
from backend.db.url import DatabaseTarget, parse_database_url
from backend.main import create_app
from backend.migrations.runner import run_migrations
from backend.tests.conftest import settings_of
from backend.tests.helpers import API_KEY, CONVERSATION, fetch, live, new_conversation, turn_body
from backend.tests.rigs.cluster import Cluster, running_cluster
from backend.tests.rigs.relay import Relay


@pytest.fixture
def own_server() -> Iterator[Cluster]:
    """A server of this test's own, to stop and start."""
    with running_cluster("faults") as cluster:
        yield cluster


def fault_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "database trouble" in r.getMessage()]


@pytest.mark.slow
async def test_a_server_stopped_under_writes_gets_json_503s_then_writes_resume(
    own_server: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    target = parse_database_url(own_server.url())
    await run_migrations(settings_of(target))
    app = create_app(settings_of(target, api_key=API_KEY, db_pool_size=4, db_max_overflow=4))
    seen: list[tuple[float, httpx.Response]] = []
    stop = asyncio.Event()

    async def write(client: httpx.AsyncClient, conversation: str) -> None:
        while not stop.is_set():
            response = await client.post(f"/conversations/{conversation}/turns", json=turn_body())
            seen.append((time.monotonic(), response))
            if response.status_code != 201:
                await asyncio.sleep(0.05)

    with caplog.at_level(logging.INFO):
        async with live(app) as client:
            conversations = [(await new_conversation(client))["id"] for _ in range(8)]
            writers = [asyncio.create_task(write(client, c)) for c in conversations]
            await asyncio.sleep(0.5)
            await asyncio.to_thread(own_server.stop, "fast")
            await asyncio.sleep(2.0)
            await asyncio.to_thread(own_server.start)
            restarted = time.monotonic()
            while not any(t > restarted and r.status_code == 201 for t, r in seen):
                assert time.monotonic() - restarted < 30, "writes never resumed"
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*writers)

    refused = [r for _, r in seen if r.status_code != 201]
    assert refused, "the server stopped, yet no request noticed"
    assert {r.status_code for r in refused} == {503}
    for response in refused:
        assert response.headers["content-type"] == "application/json"
        assert response.json()["detail"][0]["type"] == "database_unavailable"
        assert int(response.headers["Retry-After"]) > 0
    started, over = fault_records(caplog)
    assert started.levelno == over.levelno == logging.WARNING
    assert started.getMessage().startswith("database trouble (unavailable):")
    assert f"at {target.safe}" in started.getMessage()
    assert f"{len(refused)} request(s) were answered 503/504 meanwhile" in over.getMessage()
    assert not [r for r in caplog.records if r.exc_info]  # an expected fault: no traceback
    # Nothing half-stored: every conversation's turns are numbered 1..total_turns, totals add up.
    for conversation in conversations:
        [state] = await fetch(
            target,
            "SELECT c.total_turns, count(t.id), coalesce(max(t.turn_number), 0), c.total_tokens,"
            " coalesce(sum(t.input_tokens + t.output_tokens), 0)"
            " FROM kraken_conversations c LEFT JOIN kraken_turns t ON t.conversation_id = c.id"
            " WHERE c.id = $1 GROUP BY c.id",
            conversation,
        )
        total, count, highest, tokens, summed = state
        assert total == count == highest
        assert tokens == summed


async def test_an_exhausted_pool_answers_503_busy_in_bounded_time(live_db: DatabaseTarget) -> None:
    app = create_app(settings_of(live_db, api_key=API_KEY, db_pool_size=1, db_max_overflow=0, db_pool_timeout=0.5))
    async with live(app) as client:
        conversation = await new_conversation(client)
        async with app.state.pool.acquire():  # the pool's only connection, held
            started = time.monotonic()
            response = await client.post(f"/conversations/{conversation['id']}/turns", json=turn_body())
            waited = time.monotonic() - started
        assert response.status_code == 503
        assert response.json()["detail"][0]["type"] == "database_busy"
        assert response.headers["Retry-After"] == "1"
        assert 0.4 < waited < 3
        # The connection back in the pool, the same request goes through.
        again = await client.post(f"/conversations/{conversation['id']}/turns", json=turn_body())
        assert again.status_code == 201


async def test_a_statement_past_the_timeout_answers_504_and_stores_nothing(live_db: DatabaseTarget) -> None:
    app = create_app(settings_of(live_db, api_key=API_KEY, db_statement_timeout=0.5))
    async with live(app) as client:
        conversation = (await new_conversation(client))["id"]
        blocker = await connect(live_db)
        try:
            async with blocker.transaction():
                # Holds the conversation's row: the append waits for it past its timeout.
                await blocker.execute("SELECT 1 FROM kraken_conversations WHERE id = $1 FOR UPDATE", conversation)
                started = time.monotonic()
                response = await client.post(f"/conversations/{conversation}/turns", json=turn_body())
                waited = time.monotonic() - started
                # Cancelled on the server too, not left waiting for the lock.
                waiting = await blocker.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted AND pid <> pg_backend_pid()"
                    # this database's sessions (a row lock's wait is on a transaction id, of no database)
                    " AND pid IN (SELECT pid FROM pg_stat_activity WHERE datname = current_database())"
                )
        finally:
            await blocker.close()
        assert response.status_code == 504
        assert response.json()["detail"][0]["type"] == "database_timeout"
        assert "Retry-After" in response.headers
        assert 0.4 < waited < 3
        assert waiting == 0
        view = (await client.get(f"/conversations/{conversation}")).json()
        assert (view["total_turns"], view["turns"]) == (0, [])
        assert (await client.post(f"/conversations/{conversation}/turns", json=turn_body())).status_code == 201


async def test_an_unexpected_error_is_a_json_500_with_the_request_id_logged_once(
    live_db: DatabaseTarget, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(settings_of(live_db, api_key=API_KEY))

    async def broken() -> None:
        raise RuntimeError("a bug, with internals: secret-table-name")

    app.add_api_route("/broken", broken)
    with caplog.at_level(logging.INFO):
        async with live(app) as client:
            response = await client.get("/broken", headers={"X-Request-ID": "req-42"})
    assert response.status_code == 500
    assert response.headers["X-Request-ID"] == "req-42"
    assert response.json() == {
        "detail": [{"loc": [], "msg": "internal error (request req-42)", "type": "internal_error"}]
    }
    assert "secret-table-name" not in response.text
    logged = [r for r in caplog.records if r.exc_info]
    assert len(logged) == 1
    assert logged[0].getMessage() == "unexpected error answering GET /broken"


async def test_a_pooled_connection_the_server_ended_while_idle_is_an_outage_not_a_bug(
    live_db: DatabaseTarget, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's farewell (a FATAL to an idle connection) read as the next statement starts:
    asyncpg raises a protocol error ("another operation is in progress") and closes the connection.
    That request met an outage: 503, no traceback; the next one gets a new connection. (The stopped
    server under writes above meets this by chance; the relay makes it certain.)"""
    monkeypatch.setattr(db_pool, "PING_AFTER_IDLE_SECONDS", 3600.0)  # no check on lending: the statement meets it
    async with Relay(live_db).running() as relay:
        app = create_app(settings_of(relay.relayed, api_key=API_KEY, db_pool_size=1, db_max_overflow=0))
        with caplog.at_level(logging.INFO):
            async with live(app) as client:
                conversation = (await new_conversation(client))["id"]
                async with app.state.pool.acquire() as conn:  # the pool's only connection
                    pid = await conn.fetchval("SELECT pg_backend_pid()")
                relay.holding = True
                [[ended]] = await fetch(live_db, "SELECT pg_terminate_backend($1)", pid)
                assert ended is True
                await relay.server_closed.wait()  # its FATAL relayed, its socket still open
                await asyncio.sleep(0.1)
                response = await client.post(f"/conversations/{conversation}/turns", json=turn_body())
                relay.release()
                again = await client.post(f"/conversations/{conversation}/turns", json=turn_body())
    assert response.status_code == 503, response.text
    assert response.json()["detail"][0]["type"] == "database_unavailable"
    assert again.status_code == 201
    assert not [r for r in caplog.records if r.exc_info]
    started, over = fault_records(caplog)
    assert started.getMessage().startswith("database trouble (unavailable):")
    assert "1 request(s) were answered 503/504 meanwhile" in over.getMessage()


async def test_a_connection_used_by_two_statements_at_once_is_a_bug_answered_500_and_logged_once(
    live_db: DatabaseTarget, caplog: pytest.LogCaptureFixture
) -> None:
    """asyncpg's "another operation is in progress" for a connection used concurrently is a bug of
    the code, not an outage: 500, one log line with its traceback, no database trouble reported."""
    app = create_app(settings_of(live_db, api_key=API_KEY, db_pool_size=1, db_max_overflow=0))
    slow, quick = Statement.of("SELECT pg_sleep(0.2)"), Statement.of("SELECT 1")

    async def concurrent(conn: ConnectionDep) -> None:
        await asyncio.gather(statements.fetch_one(conn, slow), statements.fetch_one(conn, quick))

    app.add_api_route("/concurrent", concurrent)
    with caplog.at_level(logging.INFO):
        async with live(app) as client:
            response = await client.get("/concurrent")
            conversation = await client.post("/conversations", json=CONVERSATION)
    assert response.status_code == 500
    assert response.json()["detail"][0]["type"] == "internal_error"
    assert conversation.status_code == 201
    [logged] = [r for r in caplog.records if r.exc_info]
    assert logged.getMessage() == "unexpected error answering GET /concurrent"
    assert logged.exc_info is not None
    assert "another operation is in progress" in str(logged.exc_info[1])
    assert fault_records(caplog) == []


async def test_request_ids_are_echoed_or_made(client: httpx.AsyncClient) -> None:
    given = await client.get("/health", headers={"X-Request-ID": "abc-123"})
    assert given.headers["X-Request-ID"] == "abc-123"
    made = await client.get("/health")
    invalid = await client.get("/health", headers={"X-Request-ID": "has space and {braces}"})
    assert len(made.headers["X-Request-ID"]) == 32
    assert invalid.headers["X-Request-ID"] not in ("has space and {braces}", made.headers["X-Request-ID"])
    refused = await client.post("/conversations", json={**CONVERSATION, "model": ""}, headers={"X-Request-ID": "r-1"})
    assert refused.status_code == 422
    assert refused.headers["X-Request-ID"] == "r-1"
