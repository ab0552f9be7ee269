"""Idempotency-Key: a retried create or append answers what the first attempt stored, and stores nothing new."""

import asyncio
import hashlib
import json

import httpx

from backend.conversations.schemas import TurnCreate
from backend.tests.helpers import CONVERSATION, each_served_schema, new_conversation, rows, stored_counts, turn_body


@each_served_schema
async def test_a_retried_append_returns_the_stored_turn_and_stores_nothing(
    client: httpx.AsyncClient, db_connection
) -> None:
    conversation = await new_conversation(client)
    url = f"/conversations/{conversation['id']}/turns"
    key = {"Idempotency-Key": "7d2c1f7e-append-1"}

    first = await client.post(url, json=turn_body(), headers=key)
    again = await client.post(url, json=turn_body(), headers=key)

    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()  # same id, same number, same tool calls, as stored
    assert "idempotent-replayed" not in first.headers
    assert again.headers["Idempotent-Replayed"] == "true"
    assert await stored_counts(db_connection, conversation["id"]) == (1, 2)
    [totals] = await rows(
        db_connection,
        "SELECT total_turns, total_tokens FROM kraken_conversations WHERE id = :id",
        id=conversation["id"],
    )
    assert tuple(totals) == (1, 150)
    # Without a key, or with another one, the same body is a new turn.
    assert (await client.post(url, json=turn_body())).json()["turn_number"] == 2
    assert (await client.post(url, json=turn_body(), headers={"Idempotency-Key": "other"})).json()["turn_number"] == 3


async def test_key_order_and_spacing_do_not_make_another_request(client: httpx.AsyncClient) -> None:
    conversation = await new_conversation(client)
    url = f"/conversations/{conversation['id']}/turns"
    key = {"Idempotency-Key": "spacing"}
    body = turn_body()
    first = await client.post(url, json=body, headers=key)
    reordered = json.dumps(dict(reversed(list(body.items()))), indent=2)
    again = await client.post(url, content=reordered, headers={**key, "Content-Type": "application/json"})
    assert again.status_code == 201
    assert again.json()["id"] == first.json()["id"]


async def test_the_same_key_with_another_body_is_refused(client: httpx.AsyncClient, db_connection) -> None:
    conversation = await new_conversation(client)
    url = f"/conversations/{conversation['id']}/turns"
    key = {"Idempotency-Key": "reused"}
    assert (await client.post(url, json=turn_body(), headers=key)).status_code == 201

    other = await client.post(url, json=turn_body(user_query="something else"), headers=key)

    assert other.status_code == 409
    [error] = other.json()["detail"]
    assert error["type"] == "idempotency_key_reused"
    assert error["loc"] == ["header", "Idempotency-Key"]
    assert await stored_counts(db_connection, conversation["id"]) == (1, 2)


async def test_a_key_first_used_before_defaults_left_the_fingerprint_still_replays(
    client: httpx.AsyncClient, db_connection
) -> None:
    """Rows stored by releases that fingerprinted every field, defaults included (they live as
    long as their conversation): a retry of the same body is replayed, another body refused."""
    conversation = await new_conversation(client)
    url = f"/conversations/{conversation['id']}/turns"
    key = {"Idempotency-Key": "sent-before-the-deploy"}
    body = turn_body(cache_creation_tokens=0, cache_read_tokens=0)  # defaults, in that form's hash
    first = await client.post(url, json=body, headers=key)
    assert first.status_code == 201
    fields = TurnCreate.model_validate_json(json.dumps(body)).model_dump(mode="json")
    earlier_form = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).digest()
    await rows(
        db_connection,
        "UPDATE kraken_turns SET idempotency_fingerprint = :fingerprint WHERE id = :id",
        fingerprint=earlier_form,
        id=first.json()["id"],
    )

    again = await client.post(url, json=body, headers=key)
    other = await client.post(url, json={**body, "duration_ms": 851}, headers=key)

    assert again.status_code == 201
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert other.status_code == 409
    assert await stored_counts(db_connection, conversation["id"]) == (1, 2)


async def test_turn_keys_belong_to_their_conversation(client: httpx.AsyncClient) -> None:
    key = {"Idempotency-Key": "per-conversation"}
    first, second = await new_conversation(client), await new_conversation(client)
    a = await client.post(f"/conversations/{first['id']}/turns", json=turn_body(), headers=key)
    b = await client.post(f"/conversations/{second['id']}/turns", json=turn_body(), headers=key)
    assert (a.status_code, b.status_code) == (201, 201)
    assert a.json()["id"] != b.json()["id"]
    assert "idempotent-replayed" not in b.headers


@each_served_schema
async def test_a_retried_create_returns_the_stored_conversation(client: httpx.AsyncClient, db_connection) -> None:
    key = {"Idempotency-Key": "create-once"}
    first = await client.post("/conversations", json=CONVERSATION, headers=key)
    again = await client.post("/conversations", json=CONVERSATION, headers=key)
    reused = await client.post("/conversations", json={**CONVERSATION, "model": "another"}, headers=key)

    assert (first.status_code, again.status_code) == (201, 201)
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert reused.status_code == 409
    assert reused.json()["detail"][0]["type"] == "idempotency_key_reused"
    [count] = await rows(
        db_connection, "SELECT count(*) FROM kraken_conversations WHERE idempotency_key = 'create-once'"
    )
    assert count[0] == 1


async def test_malformed_keys_are_refused_naming_the_header(client: httpx.AsyncClient) -> None:
    for bad in (b"", b"has space", b"x" * 256, "caf\u00e9".encode()):
        response = await client.post("/conversations", json=CONVERSATION, headers={b"Idempotency-Key": bad})
        assert response.status_code == 422, bad
        assert response.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]


async def test_racing_retries_with_one_key_store_one_turn(live_client: httpx.AsyncClient) -> None:
    conversation = await new_conversation(live_client)
    url = f"/conversations/{conversation['id']}/turns"
    key = {"Idempotency-Key": "race"}

    answers = await asyncio.gather(*(live_client.post(url, json=turn_body(), headers=key) for _ in range(12)))

    assert [a.status_code for a in answers] == [201] * 12
    assert len({(a.json()["id"], a.json()["turn_number"]) for a in answers}) == 1
    assert sum(a.headers.get("Idempotent-Replayed") == "true" for a in answers) == 11
    view = (await live_client.get(f"/conversations/{conversation['id']}")).json()
    assert view["total_turns"] == 1
    assert len(view["turns"]) == 1


async def test_racing_creates_with_one_key_store_one_conversation(live_client: httpx.AsyncClient) -> None:
    key = {"Idempotency-Key": "race-create"}
    answers = await asyncio.gather(
        *(live_client.post("/conversations", json=CONVERSATION, headers=key) for _ in range(12))
    )
    assert [a.status_code for a in answers] == [201] * 12
    assert len({a.json()["id"] for a in answers}) == 1
