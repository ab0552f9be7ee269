"""Behaviour under concurrent requests, on the app as it runs in production (pooled, real commits)."""

import asyncio
import json
import uuid
from decimal import Decimal
from typing import Any

import asyncpg
from starlette.types import Message

from backend.conversations import service
from backend.conversations.schemas import TurnCreate
from backend.db.engine import connect
from backend.db.url import DatabaseTarget
from backend.main import create_app
from backend.tests.helpers import API_KEY, CONVERSATION, new_conversation, turn_body, until_waiting_for_a_lock


async def fetch(target: DatabaseTarget, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await connect(target)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def test_concurrent_appends_get_distinct_gapless_numbers_and_exact_totals(live_client, live_db):
    conversation = await new_conversation(live_client)
    url = f"/conversations/{conversation['id']}/turns"
    bodies = [
        turn_body(
            user_query=f"question {i}",
            input_tokens=i,
            output_tokens=2 * i,
            cost_usd=f"0.{i:06d}",
            tool_calls=[{"tool_name": f"t{j}", "tool_args": {"i": i}, "tool_result": j} for j in range(i % 4)],
        )
        for i in range(1, 25)
    ]

    responses = await asyncio.gather(*(live_client.post(url, json=body) for body in bodies))

    assert [r.status_code for r in responses] == [201] * len(bodies), [
        r.text for r in responses if r.status_code != 201
    ]
    assert sorted(r.json()["turn_number"] for r in responses) == list(range(1, len(bodies) + 1))
    view = (await live_client.get(f"/conversations/{conversation['id']}")).json()
    assert view["total_turns"] == len(bodies)
    assert view["total_tokens"] == sum(b["input_tokens"] + b["output_tokens"] for b in bodies)
    assert Decimal(str(view["total_cost_usd"])) == sum(Decimal(b["cost_usd"]) for b in bodies)
    # Each stored turn is the one its response announced, with its own tool calls.
    numbered = {r.json()["turn_number"]: r.json()["user_query"] for r in responses}
    assert {t["turn_number"]: t["user_query"] for t in view["turns"]} == numbered
    assert [t["turn_number"] for t in view["turns"]] == list(range(1, len(bodies) + 1))
    assert all(len(t["tool_calls"]) == t["tool_calls_count"] for t in view["turns"])
    [stored] = await fetch(
        live_db,
        "SELECT count(*) AS turns, count(DISTINCT turn_number) AS numbers FROM kraken_turns WHERE conversation_id = $1",
        uuid.UUID(conversation["id"]),
    )
    assert (stored["turns"], stored["numbers"]) == (len(bodies), len(bodies))


async def test_ending_while_appending_keeps_totals_equal_to_the_stored_turns(live_client, live_db):
    conversation = await new_conversation(live_client)
    url = f"/conversations/{conversation['id']}"
    requests = [live_client.post(f"{url}/turns", json=turn_body(input_tokens=10, output_tokens=1)) for _ in range(8)]
    requests.insert(4, live_client.post(f"{url}/end", json={"status": "abandoned"}))

    responses = await asyncio.gather(*requests)

    appends = responses[:4] + responses[5:]
    assert responses[4].status_code == 200
    assert {r.status_code for r in appends} <= {201, 409}
    accepted = sum(r.status_code == 201 for r in appends)
    view = (await live_client.get(url)).json()
    assert (view["status"], view["total_turns"], view["total_tokens"]) == ("abandoned", accepted, 11 * accepted)
    assert len(view["turns"]) == accepted


async def test_a_delete_waiting_for_an_append_in_flight_removes_its_turn_too(live_client, live_db):
    """The append commits while the delete waits for it: the delete must still leave no turn behind."""
    conversation = await new_conversation(live_client)
    conversation_id = uuid.UUID(conversation["id"])
    in_flight = await connect(live_db)
    try:
        # An open transaction, which the append's statement joins: its row lock is held until
        # the commit below, the widest window a real append (one statement) leaves open.
        async with in_flight.transaction():
            recorded = await service.append_turn(
                in_flight, conversation_id, TurnCreate.model_validate(turn_body()), tool_result_max_bytes=10240
            )
            turn = recorded.value
            delete = asyncio.create_task(live_client.delete(f"/conversations/{conversation['id']}"))
            await until_waiting_for_a_lock(live_db)
        response = await delete
    finally:
        await in_flight.close()

    assert response.status_code == 204, response.text
    assert await fetch(live_db, "SELECT 1 FROM kraken_conversations WHERE id = $1", conversation_id) == []
    assert await fetch(live_db, "SELECT 1 FROM kraken_turns WHERE id = $1", turn.id) == []
    assert await fetch(live_db, "SELECT 1 FROM kraken_tool_calls WHERE turn_id = $1", turn.id) == []


async def test_a_write_is_committed_before_its_response_is_sent(live_db, settings_for):
    """A client that gets 201 can rely on the row: the next request (any replica) sees it."""
    app = create_app(settings_for(live_db, api_key=API_KEY))
    body = json.dumps(CONVERSATION).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/conversations",
        "raw_path": b"/conversations",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"authorization", f"Bearer {API_KEY}".encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("kraken", 80),
    }
    messages: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]
    seen_by_another_connection: list[int] = []
    status: list[int] = []
    observer = await connect(live_db)

    async def receive() -> Message:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])
        elif message["type"] == "http.response.body" and message.get("body"):
            created = uuid.UUID(json.loads(message["body"])["id"])
            count = await observer.fetchval("SELECT count(*) FROM kraken_conversations WHERE id = $1", created)
            seen_by_another_connection.append(count)

    try:
        async with app.router.lifespan_context(app):
            await app(scope, receive, send)
    finally:
        await observer.close()
    assert status == [201]
    assert seen_by_another_connection == [1]
