"""Feedback on turns (issue 20): PUT gives a turn its feedback (201) or replaces it (200, idempotent),
DELETE removes it, the shared view shows it on each turn, GET /feedback exports it for the operator
in keyset pages; a user's key reaches only its own conversations' turns."""

import uuid
from typing import Any

import httpx
import pytest

from backend.feedback.schemas import MAX_COMMENT_CHARS
from backend.tests.helpers import new_conversation, new_user, rows, set_time, turn_body

POSITIVE = {"feedback_type": "positive", "comment": "spot on", "trace_id": "trace-1"}


def feedback_url(conversation_id: str, turn_number: int = 1) -> str:
    return f"/conversations/{conversation_id}/turns/{turn_number}/feedback"


async def conversation_with_turns(client: httpx.AsyncClient, turns: int = 1) -> str:
    conversation_id: str = (await new_conversation(client))["id"]
    for _ in range(turns):
        appended = await client.post(f"/conversations/{conversation_id}/turns", json=turn_body())
        assert appended.status_code == 201, appended.text
    return conversation_id


async def put(client: httpx.AsyncClient, conversation_id: str, body: dict[str, Any], turn: int = 1) -> httpx.Response:
    return await client.put(feedback_url(conversation_id, turn), json=body)


async def stored(db_connection, conversation_id: str) -> list[Any]:
    return await rows(
        db_connection,
        "SELECT f.feedback_type, f.comment, f.trace_id, t.turn_number FROM kraken_feedback f"
        " JOIN kraken_turns t ON t.id = f.turn_id WHERE f.conversation_id = :id ORDER BY t.turn_number",
        id=conversation_id,
    )


def not_found(response: httpx.Response, loc: list[str]) -> None:
    assert response.status_code == 404, response.text
    [item] = response.json()["detail"]
    assert (item["loc"], item["type"]) == (loc, "not_found")


# --- give, replace, remove -----------------------------------------------------------------


async def test_the_first_feedback_is_201_and_a_different_one_replaces_it_with_200(client, db_connection):
    conversation_id = await conversation_with_turns(client)

    first = await put(client, conversation_id, POSITIVE)
    assert first.status_code == 201, first.text
    given = first.json()
    assert {k: given[k] for k in POSITIVE} == POSITIVE
    assert given["created_at"] == given["updated_at"]

    second = await put(client, conversation_id, {"feedback_type": "negative"})
    assert second.status_code == 200, second.text
    replaced = second.json()
    # The whole feedback is replaced: the fields left out are null now.
    assert (replaced["feedback_type"], replaced["comment"], replaced["trace_id"]) == ("negative", None, None)
    assert replaced["created_at"] == given["created_at"]
    assert replaced["updated_at"] > given["updated_at"]
    assert [tuple(r) for r in await stored(db_connection, conversation_id)] == [("negative", None, None, 1)]


async def test_a_first_feedback_is_created_and_updated_at_one_instant(client):
    """Both read one clock: two readings in one row differ whenever a microsecond passes between
    them (a few times in a hundred here), which this many first feedbacks would show."""
    conversation_id = await conversation_with_turns(client, turns=100)
    for turn in range(1, 101):
        given = (await put(client, conversation_id, POSITIVE, turn=turn)).json()
        assert given["created_at"] == given["updated_at"], turn


async def test_the_same_feedback_again_is_200_and_changes_nothing(client, db_connection):
    conversation_id = await conversation_with_turns(client)
    first = (await put(client, conversation_id, POSITIVE)).json()

    for _ in range(2):
        again = await put(client, conversation_id, POSITIVE)
        assert again.status_code == 200, again.text
        assert again.json() == first  # updated_at included: nothing changed
    assert len(await stored(db_connection, conversation_id)) == 1


async def test_each_turn_has_its_own_feedback_and_ended_conversations_take_it(client, db_connection):
    conversation_id = await conversation_with_turns(client, 2)
    assert (await client.post(f"/conversations/{conversation_id}/end", json={"status": "completed"})).status_code == 200
    assert (await put(client, conversation_id, POSITIVE, turn=1)).status_code == 201
    assert (await put(client, conversation_id, {"feedback_type": "negative"}, turn=2)).status_code == 201
    assert [(r.feedback_type, r.turn_number) for r in await stored(db_connection, conversation_id)] == [
        ("positive", 1),
        ("negative", 2),
    ]


async def test_delete_removes_the_feedback_and_a_second_delete_is_a_404(client, db_connection):
    conversation_id = await conversation_with_turns(client)
    await put(client, conversation_id, POSITIVE)

    deleted = await client.delete(feedback_url(conversation_id))
    assert deleted.status_code == 204
    assert deleted.content == b""
    assert await stored(db_connection, conversation_id) == []

    again = await client.delete(feedback_url(conversation_id))
    not_found(again, ["path", "turn_number"])
    assert again.json()["detail"][0]["msg"] == "this turn has no feedback"
    # Given again after a delete, it is a first feedback.
    assert (await put(client, conversation_id, POSITIVE)).status_code == 201


async def test_deleting_the_conversation_deletes_its_feedback(client, db_connection):
    conversation_id = await conversation_with_turns(client, 2)
    other = await conversation_with_turns(client)
    for turn in (1, 2):
        await put(client, conversation_id, POSITIVE, turn)
    await put(client, other, POSITIVE)

    assert (await client.delete(f"/conversations/{conversation_id}")).status_code == 204

    assert await stored(db_connection, conversation_id) == []
    assert len(await stored(db_connection, other)) == 1
    not_found(await put(client, conversation_id, POSITIVE), ["path", "conversation_id"])


@pytest.mark.parametrize(
    ("conversation", "turn", "loc"),
    [
        ("unknown", 1, ["path", "conversation_id"]),
        ("not-a-uuid", 1, ["path", "conversation_id"]),
        ("known", 2, ["path", "turn_number"]),  # the conversation has one turn
    ],
)
async def test_an_unknown_conversation_or_turn_is_a_404_on_put_and_delete(
    client, db_connection, conversation, turn, loc
):
    conversation_id = await conversation_with_turns(client)
    target = {"unknown": str(uuid.uuid4()), "not-a-uuid": "nope", "known": conversation_id}[conversation]
    not_found(await put(client, target, POSITIVE, turn), loc)
    not_found(await client.delete(feedback_url(target, turn)), loc)
    assert await rows(db_connection, "SELECT 1 FROM kraken_feedback") == []


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"feedback_type": "meh"}, ["body", "feedback_type"]),
        ({}, ["body", "feedback_type"]),
        ({"feedback_type": None}, ["body", "feedback_type"]),
        ({"feedback_type": "positive", "rating": 5}, ["body", "rating"]),
        ({"feedback_type": "positive", "comment": "x" * (MAX_COMMENT_CHARS + 1)}, ["body", "comment"]),
        ({"feedback_type": "positive", "comment": "a\u0000b"}, ["body", "comment"]),
        ({"feedback_type": "positive", "comment": 5}, ["body", "comment"]),
        ({"feedback_type": "positive", "trace_id": ""}, ["body", "trace_id"]),
        ({"feedback_type": "positive", "trace_id": "t" * 256}, ["body", "trace_id"]),
    ],
)
async def test_a_malformed_feedback_is_a_422_naming_the_field_and_stores_nothing(client, db_connection, body, loc):
    conversation_id = await conversation_with_turns(client)
    await put(client, conversation_id, POSITIVE)

    response = await put(client, conversation_id, body)

    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == loc
    assert [tuple(r) for r in await stored(db_connection, conversation_id)] == [("positive", "spot on", "trace-1", 1)]


@pytest.mark.parametrize("turn", ["0", "-1", "abc", "1.5", "2147483648"])
async def test_a_turn_number_that_is_not_one_is_a_422_naming_it(client, turn):
    conversation_id = await conversation_with_turns(client)
    for response in (
        await client.put(f"/conversations/{conversation_id}/turns/{turn}/feedback", json=POSITIVE),
        await client.delete(f"/conversations/{conversation_id}/turns/{turn}/feedback"),
    ):
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["path", "turn_number"]


async def test_the_keyed_routes_need_a_key(client, anonymous):
    conversation_id = await conversation_with_turns(client)
    for response in (
        await put(anonymous, conversation_id, POSITIVE),
        await anonymous.delete(feedback_url(conversation_id)),
        await anonymous.get("/feedback"),
    ):
        assert response.status_code == 401, response.text
        assert response.json()["detail"][0]["loc"] == ["header", "Authorization"]


# --- the shared view -----------------------------------------------------------------------


async def test_the_shared_view_shows_each_turns_feedback(client, anonymous):
    conversation_id = await conversation_with_turns(client, 3)
    given = (await put(client, conversation_id, POSITIVE, turn=2)).json()
    await put(client, conversation_id, {"feedback_type": "negative"}, turn=3)

    view = (await anonymous.get(f"/conversations/{conversation_id}")).json()

    assert [turn["feedback"] for turn in view["turns"]][:2] == [None, given]
    assert view["turns"][2]["feedback"]["feedback_type"] == "negative"
    page = (await anonymous.get(f"/conversations/{conversation_id}", params={"after_turn": 1, "limit": 1})).json()
    assert [turn["feedback"] for turn in page["turns"]] == [given]


# --- ownership -----------------------------------------------------------------------------


async def test_a_users_key_reaches_only_its_own_turns_and_the_operator_every_one(client, db_connection, as_key):
    ada, bob = await new_user(client, "ada"), await new_user(client, "bob")
    async with as_key(ada["api_key"]) as a, as_key(bob["api_key"]) as b:
        hers = await conversation_with_turns(a)
        operators = await conversation_with_turns(client)
        unknown = str(uuid.uuid4())

        # Bob's key: Ada's conversation (and the operator's) answers exactly as an unknown one.
        for theirs in (hers, operators):
            for method, body in (("PUT", POSITIVE), ("DELETE", None)):
                found = await b.request(method, feedback_url(theirs), json=body)
                nobodys = await b.request(method, feedback_url(unknown), json=body)
                not_found(found, ["path", "conversation_id"])
                assert found.json() == nobodys.json()
        assert await rows(db_connection, "SELECT 1 FROM kraken_feedback") == []

        # Ada's key: her own turns.
        assert (await put(a, hers, POSITIVE)).status_code == 201
        assert (await put(a, hers, {"feedback_type": "negative"})).status_code == 200
        view = (await a.get(f"/conversations/{hers}")).json()
        assert view["turns"][0]["feedback"]["feedback_type"] == "negative"
        # Bob still cannot remove it, nor see it.
        not_found(await b.delete(feedback_url(hers)), ["path", "conversation_id"])
        assert (await b.get(f"/conversations/{hers}")).status_code == 404
        assert (await a.delete(feedback_url(hers))).status_code == 204

        # The operator's key: any conversation's turns.
        assert (await put(client, hers, POSITIVE)).status_code == 201
        assert (await put(a, hers, POSITIVE)).status_code == 200  # the same feedback, replaced by its owner
        assert (await client.delete(feedback_url(hers))).status_code == 204
        assert (await put(client, operators, POSITIVE)).status_code == 201

        # The export is the operator's: a user's key is a 403, once the key is checked.
        refused = await a.get("/feedback")
        assert refused.status_code == 403, refused.text
        assert refused.json()["detail"][0] | {"msg": ""} == {
            "loc": ["header", "Authorization"],
            "msg": "",
            "type": "forbidden",
        }
        assert [item["conversation_id"] for item in (await client.get("/feedback")).json()["items"]] == [operators]


async def test_a_rotated_users_key_answers_401_on_the_feedback_routes(client, as_key):
    ada = await new_user(client)
    async with as_key(ada["api_key"]) as a:
        hers = await conversation_with_turns(a)
        assert (await client.post(f"/users/{ada['id']}/keys")).status_code == 200
        for response in (await put(a, hers, POSITIVE), await a.delete(feedback_url(hers)), await a.get("/feedback")):
            assert response.status_code == 401, response.text
            assert response.json()["detail"][0]["loc"] == ["header", "Authorization"]


# --- the export ----------------------------------------------------------------------------


async def export_all(client: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = await client.get("/feedback", params={**params, **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200, page.text
        items += page.json()["items"]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            return items


async def test_the_export_pages_newest_first_without_skipping_or_repeating(client):
    conversation_id = await conversation_with_turns(client, 5)
    for turn in range(1, 6):
        await put(client, conversation_id, {"feedback_type": "positive", "trace_id": f"t{turn}"}, turn)

    first = (await client.get("/feedback", params={"limit": 2})).json()
    assert [item["turn_number"] for item in first["items"]] == [5, 4]
    # Feedback given and replaced between pages: the new one is newer than the cursor, the replaced
    # one keeps its place (created_at).
    other = await conversation_with_turns(client)
    await put(client, other, POSITIVE)
    await put(client, conversation_id, {"feedback_type": "negative"}, 2)
    rest: list[dict[str, Any]] = []
    cursor = first["next_cursor"]
    while cursor is not None:
        page = (await client.get("/feedback", params={"limit": 2, "cursor": cursor})).json()
        rest += page["items"]
        cursor = page["next_cursor"]

    assert [item["turn_number"] for item in rest] == [3, 2, 1]
    assert rest[1]["feedback_type"] == "negative"
    item = first["items"][0]
    assert set(item) == {
        "id", "conversation_id", "turn_id", "turn_number", "feedback_type", "comment", "trace_id", "created_at",
        "updated_at",
    }  # fmt: skip
    assert (item["conversation_id"], item["trace_id"]) == (conversation_id, "t5")
    everything = await export_all(client, limit=3)
    assert [i["conversation_id"] for i in everything][:1] == [other]
    assert len(everything) == len({i["id"] for i in everything}) == 6
    created = [(i["created_at"], i["id"]) for i in everything]
    assert created == sorted(created, reverse=True)


async def test_the_export_filters_by_time_and_type(client, db_connection):
    conversation_id = await conversation_with_turns(client, 4)
    moments = {1: "2025-03-01 10:00", 2: "2025-03-02 00:00", 3: "2025-03-02 12:00", 4: "2025-03-03 00:00"}
    for turn, moment in moments.items():
        feedback = await put(client, conversation_id, {"feedback_type": "negative" if turn % 2 else "positive"}, turn)
        assert feedback.status_code == 201
        [(feedback_id,)] = await rows(
            db_connection,
            "SELECT f.id FROM kraken_feedback f JOIN kraken_turns t ON t.id = f.turn_id"
            " WHERE t.conversation_id = :c AND t.turn_number = :n",
            c=conversation_id,
            n=turn,
        )
        await set_time(db_connection, "kraken_feedback", "created_at", str(feedback_id), moment)

    async def turns(**params: Any) -> list[int]:
        return [item["turn_number"] for item in await export_all(client, **params)]

    assert await turns() == [4, 3, 2, 1]
    # Bounds as GET /usage reads them: from inclusive, to exclusive; a date is its midnight UTC.
    assert await turns(**{"from": "2025-03-02", "to": "2025-03-03"}) == [3, 2]
    assert await turns(**{"from": "2025-03-02T01:00:00+01:00"}) == [4, 3, 2]  # 00:00 UTC
    assert await turns(to="2025-03-02T00:00:00") == [1]
    assert await turns(feedback_type="positive") == [4, 2]
    assert await turns(feedback_type="negative", **{"from": "2025-03-02"}) == [3]
    assert await turns(**{"from": "2025-03-03", "to": "2025-03-01"}) == []  # empty, not refused


@pytest.mark.parametrize(
    ("params", "loc"),
    [
        ({"from": "yesterday"}, ["query", "from"]),
        ({"to": "2025-02-30"}, ["query", "to"]),
        ({"feedback_type": "meh"}, ["query", "feedback_type"]),
        ({"limit": "0"}, ["query", "limit"]),
        ({"limit": "501"}, ["query", "limit"]),
        ({"cursor": "not-a-cursor"}, ["query", "cursor"]),
        ({"session_id": "s"}, ["query", "session_id"]),
    ],
)
async def test_a_malformed_export_query_is_a_422_naming_the_parameter(client, params, loc):
    response = await client.get("/feedback", params=params)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == loc
