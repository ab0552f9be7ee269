"""Appends to conversations whose totals lag their turns, as the original KRAKEN client left them
(a turn written, the totals' statement never run): the next free number, and right totals."""

import asyncio
import uuid
from decimal import Decimal
from typing import Any

import httpx

from backend.db.engine import connect
from backend.tests.helpers import fetch, new_conversation, rows, turn_body, until_waiting_for_a_lock

LAG = "UPDATE kraken_conversations SET total_turns = 1, total_tokens = :tokens, total_cost_usd = :cost WHERE id = :id"


def bodies(first: int, count: int) -> list[dict[str, Any]]:
    """Turns with tokens and costs of their own, so a sum that misses one shows."""
    return [
        turn_body(
            user_query=f"question {i}", input_tokens=10 * i, output_tokens=i, cost_usd=f"0.{i:06d}", tool_calls=[]
        )
        for i in range(first, first + count)
    ]


def sums(posted: list[dict[str, Any]]) -> tuple[int, int, Decimal]:
    return (
        len(posted),
        sum(b["input_tokens"] + b["output_tokens"] for b in posted),
        sum((Decimal(b["cost_usd"]) for b in posted), Decimal(0)),
    )


async def with_turns(client: httpx.AsyncClient, count: int) -> tuple[str, str, list[dict[str, Any]]]:
    """A new conversation with ``count`` turns: (its id, its URL, the turns posted)."""
    conversation = await new_conversation(client)
    url = f"/conversations/{conversation['id']}"
    posted = bodies(1, count)
    for body in posted:
        assert (await client.post(f"{url}/turns", json=body)).status_code == 201
    return conversation["id"], url, posted


def totals(view: dict[str, Any]) -> tuple[int, int, Decimal]:
    return view["total_turns"], view["total_tokens"], Decimal(str(view["total_cost_usd"]))


async def test_appends_to_a_lagging_conversation_get_the_next_free_numbers_and_right_totals(client, db_connection):
    conversation_id, url, first = await with_turns(client, 3)
    # Turns 2 and 3 were written, their totals never were.
    await rows(db_connection, LAG, id=conversation_id, tokens=11, cost=Decimal("0.000001"))
    assert totals((await client.get(url)).json()) == (1, 11, Decimal("0.000001"))

    later = bodies(4, 2)
    responses = [await client.post(f"{url}/turns", json=body) for body in later]

    assert [r.status_code for r in responses] == [201, 201], [r.text for r in responses]
    assert [r.json()["turn_number"] for r in responses] == [4, 5]
    view = (await client.get(url)).json()
    assert totals(view) == sums(first + later)
    assert [(t["turn_number"], t["user_query"]) for t in view["turns"]] == [
        (n, body["user_query"]) for n, body in enumerate(first + later, start=1)
    ]


async def test_a_conversation_whose_totals_were_never_written_is_healed_by_its_next_append(client, db_connection):
    conversation_id, url, first = await with_turns(client, 2)
    await rows(
        db_connection,
        "UPDATE kraken_conversations SET total_turns = 0, total_tokens = 0, total_cost_usd = 0 WHERE id = :id",
        id=conversation_id,
    )

    later = bodies(3, 1)
    response = await client.post(f"{url}/turns", json=later[0])

    assert response.status_code == 201, response.text
    assert response.json()["turn_number"] == 3
    assert totals((await client.get(url)).json()) == sums(first + later)


async def test_a_lagging_conversation_whose_turns_fill_a_total_is_409_naming_it(client, db_connection):
    """The overflow check is on the totals the turns really make, not the lagging ones: a 409, not a 500."""
    conversation = await new_conversation(client)
    url = f"/conversations/{conversation['id']}"
    # A turn of the original client's (larger than the API takes), its totals never written.
    await rows(
        db_connection,
        "INSERT INTO kraken_turns (conversation_id, turn_number, user_query, assistant_response, model, input_tokens)"
        " VALUES (:id, 1, 'q', 'a', 'm', 2147483000)",
        id=conversation["id"],
    )

    response = await client.post(f"{url}/turns", json=turn_body(input_tokens=600, output_tokens=48))

    assert response.status_code == 409
    assert response.json()["detail"][0]["type"] == "totals_full"
    assert "total_tokens" in response.json()["detail"][0]["msg"]
    [stored] = await rows(
        db_connection, "SELECT count(*) AS n FROM kraken_turns WHERE conversation_id = :id", id=conversation["id"]
    )
    assert stored.n == 1
    fits = await client.post(f"{url}/turns", json=turn_body(input_tokens=600, output_tokens=47))
    assert fits.status_code == 201, fits.text
    assert (fits.json()["turn_number"], (await client.get(url)).json()["total_tokens"]) == (2, 2147483647)


async def test_appends_racing_on_a_lagging_conversation_stay_gapless_with_right_totals(live_client, live_db):
    """Every append reads the turns before the first one holds the row: all but one wait for the
    row lock and then see the row the one before them committed (READ COMMITTED re-evaluation)."""
    key, url, first = await with_turns(live_client, 3)
    conversation_id = uuid.UUID(key)
    await fetch(
        live_db,
        "UPDATE kraken_conversations SET total_turns = 1, total_tokens = 11, total_cost_usd = 0.000001 WHERE id = $1",
        conversation_id,
    )
    later = bodies(4, 8)

    holder = await connect(live_db)
    try:
        # The row held, so every append below starts (and reads the turns) while it still lags.
        async with holder.transaction():
            await holder.execute("SELECT 1 FROM kraken_conversations WHERE id = $1 FOR UPDATE", conversation_id)
            appends = [asyncio.create_task(live_client.post(f"{url}/turns", json=body)) for body in later]
            await until_waiting_for_a_lock(live_db, len(later))
        responses = await asyncio.gather(*appends)
    finally:
        await holder.close()

    assert [r.status_code for r in responses] == [201] * len(later), [r.text for r in responses]
    assert sorted(r.json()["turn_number"] for r in responses) == list(range(4, 4 + len(later)))
    view = (await live_client.get(url)).json()
    assert totals(view) == sums(first + later)
    assert [t["turn_number"] for t in view["turns"]] == list(range(1, 4 + len(later)))
