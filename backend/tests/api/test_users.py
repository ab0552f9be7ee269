"""Users and their keys (issue 20): the operator's user routes, and a user's key through every
conversation route: what it creates is the user's, another user's conversation is an unknown one,
a rotated or deactivated key answers 401 at once, the operator's key sees everything."""

import contextlib
import hashlib
import json
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from backend.api.deps import INVALID_KEY
from backend.conversations import service
from backend.db.statements import fetch_one
from backend.tests.helpers import (
    API_KEY,
    CONVERSATION,
    bearer,
    driver_of,
    new_conversation,
    new_user,
    rows,
    set_time,
    stored_counts,
    turn_body,
)

WINDOW = {"from": "2000-01-01", "to": "2100-01-01"}


@contextlib.contextmanager
def statements_sent(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """A list that gets an entry for each statement the service sends to the database meanwhile."""
    import backend.db.statements as statements

    sent: list[str] = []
    run = statements._run

    async def counting(conn: Any, statement: Any) -> Any:
        sent.append("statement")
        return await run(conn, statement)

    monkeypatch.setattr(statements, "_run", counting)
    try:
        yield sent
    finally:
        monkeypatch.setattr(statements, "_run", run)


async def refused(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json() == {
        "detail": [{"loc": ["header", "Authorization"], "msg": INVALID_KEY, "type": "unauthorized"}]
    }


# --- the user routes -----------------------------------------------------------------------


async def test_a_new_user_gets_a_key_shown_once_and_stored_as_its_hash(client, db_connection):
    user = await new_user(client, "ada")

    assert user["name"] == "ada"
    assert user["is_active"] is True
    assert user["last_active"] is None
    assert user["api_key"].startswith("kraken_")
    assert len(user["api_key"]) == len("kraken_") + 43  # token_urlsafe(32)
    [stored] = await rows(db_connection, "SELECT api_key_hash FROM kraken_users WHERE id = :id", id=user["id"])
    assert bytes(stored.api_key_hash) == hashlib.sha256(user["api_key"].encode()).digest()
    listed = (await client.get("/users")).json()["items"]
    assert [u["id"] for u in listed] == [user["id"]]
    assert "api_key" not in listed[0]
    assert user["api_key"] not in json.dumps(listed)


async def test_answers_that_hold_a_key_may_not_be_cached(client):
    created = await client.post("/users", json={"name": "ada"})
    rotated = await client.post(f"/users/{created.json()['id']}/keys")
    listed = await client.get("/users")
    for answer in (created, rotated):
        assert (answer.headers["cache-control"], answer.headers["pragma"]) == ("no-store", "no-cache")
    assert "cache-control" not in listed.headers  # no key in it


async def test_users_are_listed_oldest_first(client):
    first, second = await new_user(client, "a"), await new_user(client, "b")
    assert [u["id"] for u in (await client.get("/users")).json()["items"]] == [first["id"], second["id"]]


async def test_the_user_routes_take_the_operators_key_only(client, anonymous, as_key):
    user = await new_user(client)
    async with as_key(user["api_key"]) as own:
        for method, path, body in [
            ("POST", "/users", {"name": "eve"}),
            ("GET", "/users", None),
            ("POST", f"/users/{user['id']}/keys", None),
            ("POST", f"/users/{user['id']}/deactivate", None),
        ]:
            for caller in (own, anonymous):
                answer = await caller.request(method, path, json=body)
                assert answer.status_code == 401, (method, path, answer.text)
                assert answer.json()["detail"][0]["loc"] == ["header", "Authorization"]
    assert [u["is_active"] for u in (await client.get("/users")).json()["items"]] == [True]


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        pytest.param({}, ["body", "name"], id="missing"),
        pytest.param({"name": ""}, ["body", "name"], id="empty"),
        pytest.param({"name": "x" * 256}, ["body", "name"], id="too-long"),
        pytest.param({"name": "a\x00b"}, ["body", "name"], id="nul"),
        pytest.param({"name": 5}, ["body", "name"], id="not-a-string"),
        pytest.param({"name": "ada", "admin": True}, ["body", "admin"], id="unknown-field"),
    ],
)
async def test_a_malformed_user_is_a_422_naming_the_field_and_stores_nothing(client, db_connection, body, loc):
    answer = await client.post("/users", json=body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"][0]["loc"] == loc
    assert await rows(db_connection, "SELECT id FROM kraken_users") == []


@pytest.mark.parametrize("action", ["keys", "deactivate"])
@pytest.mark.parametrize("user_id", [str(uuid.uuid4()), "not-a-uuid"], ids=["unknown-uuid", "not-a-uuid"])
async def test_an_unknown_user_is_a_404(client, action, user_id):
    answer = await client.post(f"/users/{user_id}/{action}")
    assert answer.status_code == 404
    assert answer.json()["detail"] == [{"loc": ["path", "user_id"], "msg": "no user with this id", "type": "not_found"}]


# --- ownership through every route ----------------------------------------------------------


async def test_what_a_user_creates_is_theirs_and_another_users_key_finds_nothing(client, db_connection, as_key):
    ada, bob = await new_user(client, "ada"), await new_user(client, "bob")
    async with as_key(ada["api_key"]) as a, as_key(bob["api_key"]) as b:
        mine = await new_conversation(a)
        [row] = await rows(db_connection, "SELECT user_id FROM kraken_conversations WHERE id = :id", id=mine["id"])
        assert str(row.user_id) == ada["id"]
        appended = await a.post(f"/conversations/{mine['id']}/turns", json=turn_body())
        assert appended.status_code == 201, appended.text
        url = f"/conversations/{mine['id']}"
        unknown = f"/conversations/{uuid.uuid4()}"

        # Bob's key: Ada's conversation answers exactly as an unknown id, on every route.
        for method, path, body in [
            ("GET", "", None),
            ("POST", "/turns", turn_body()),
            ("POST", "/end", {"status": "completed"}),
            ("DELETE", "", None),
        ]:
            theirs = await b.request(method, url + path, json=body)
            nobodys = await b.request(method, unknown + path, json=body)
            assert theirs.status_code == 404, (method, path, theirs.text)
            assert theirs.json() == nobodys.json(), (method, path)
        assert await stored_counts(db_connection, mine["id"]) == (1, 2)
        listed = await b.get("/conversations", params={"session_id": CONVERSATION["session_id"]})
        assert listed.json() == {"items": [], "next_cursor": None}
        assert (await b.get("/usage", params=WINDOW)).json()["groups"] == []

        # Ada's key: all of it.
        view = await a.get(url)
        assert view.status_code == 200
        assert view.json()["total_turns"] == 1
        listed = await a.get("/conversations", params={"session_id": CONVERSATION["session_id"]})
        assert [c["id"] for c in listed.json()["items"]] == [mine["id"]]
        [group] = (await a.get("/usage", params=WINDOW)).json()["groups"]
        assert (group["key"], group["turns"], group["total_tokens"]) == ("claude-test", 1, 150)
        ended = await a.post(f"{url}/end", json={"status": "completed"})
        assert ended.status_code == 200
        assert ended.json()["status"] == "completed"
        assert (await a.delete(url)).status_code == 204
        assert (await client.get(url)).status_code == 404


async def test_the_operators_key_sees_and_writes_every_conversation(client, as_key):
    ada = await new_user(client)
    async with as_key(ada["api_key"]) as a:
        hers = await new_conversation(a)
        theirs = await new_conversation(client)  # the operator's: user_id NULL, as every row before issue 20
        # A user's key does not see the operator's conversations either.
        assert (await a.get(f"/conversations/{theirs['id']}")).status_code == 404
        assert (await a.post(f"/conversations/{theirs['id']}/turns", json=turn_body())).status_code == 404
    listed = await client.get("/conversations", params={"session_id": CONVERSATION["session_id"]})
    assert {c["id"] for c in listed.json()["items"]} == {hers["id"], theirs["id"]}
    assert (await client.post(f"/conversations/{hers['id']}/turns", json=turn_body())).status_code == 201
    assert (await client.get(f"/conversations/{hers['id']}")).json()["total_turns"] == 1
    assert (await client.post(f"/conversations/{hers['id']}/end", json={"status": "error"})).status_code == 200
    assert (await client.delete(f"/conversations/{hers['id']}")).status_code == 204


async def test_the_shared_view_stays_open_without_a_key(client, anonymous, as_key):
    ada = await new_user(client)
    async with as_key(ada["api_key"]) as a:
        hers = await new_conversation(a)
    assert (await anonymous.get(f"/conversations/{hers['id']}")).status_code == 200
    # Another scheme (a proxy's Basic credentials) is not a key: the view stays open.
    basic = await anonymous.get(f"/conversations/{hers['id']}", headers={"Authorization": "Basic eDp5"})
    assert basic.status_code == 200
    # A bearer key is checked.
    wrong = await anonymous.get(f"/conversations/{hers['id']}", headers=bearer("kraken_never-issued"))
    await refused(wrong)


async def test_listing_a_users_session_pages_through_their_conversations_only(client, as_key):
    ada, bob = await new_user(client, "ada"), await new_user(client, "bob")
    async with as_key(ada["api_key"]) as a, as_key(bob["api_key"]) as b:
        hers = [(await new_conversation(a))["id"] for _ in range(3)]
        for _ in range(2):
            await new_conversation(b)
        await new_conversation(client)
        seen: list[str] = []
        params: dict[str, Any] = {"session_id": CONVERSATION["session_id"], "limit": 2}
        while True:
            page = (await a.get("/conversations", params=params)).json()
            seen += [c["id"] for c in page["items"]]
            if page["next_cursor"] is None:
                break
            params["cursor"] = page["next_cursor"]
    assert seen == list(reversed(hers))


async def test_an_idempotency_key_another_user_used_replays_nothing_of_theirs(client, db_connection, as_key):
    ada, bob = await new_user(client, "ada"), await new_user(client, "bob")
    key = {"Idempotency-Key": "create-1"}
    async with as_key(ada["api_key"]) as a, as_key(bob["api_key"]) as b:
        hers = (await a.post("/conversations", json=CONVERSATION, headers=key)).json()
        taken = await b.post("/conversations", json=CONVERSATION, headers=key)
        assert taken.status_code == 409
        assert taken.json()["detail"][0]["type"] == "idempotency_key_reused"
        assert hers["id"] not in taken.text
        again = await a.post("/conversations", json=CONVERSATION, headers=key)
        assert again.json() == hers
        assert again.headers["Idempotent-Replayed"] == "true"

        # A turn's key in Ada's conversation: Bob's retry of it is a 404, not her turn.
        turn_key = {"Idempotency-Key": "turn-1"}
        url = f"/conversations/{hers['id']}/turns"
        first = await a.post(url, json=turn_body(), headers=turn_key)
        assert first.status_code == 201
        theirs = await b.post(url, json=turn_body(), headers=turn_key)
        assert theirs.status_code == 404
        assert first.json()["id"] not in theirs.text
    assert await stored_counts(db_connection, hers["id"]) == (1, 2)


# --- rotation and deactivation ----------------------------------------------------------------


async def every_route(caller: httpx.AsyncClient, conversation_id: str) -> list[httpx.Response]:
    url = f"/conversations/{conversation_id}"
    return [
        await caller.post("/conversations", json=CONVERSATION),
        await caller.post(f"{url}/turns", json=turn_body()),
        await caller.post(f"{url}/end", json={"status": "completed"}),
        await caller.get(url),
        await caller.get("/conversations", params={"session_id": CONVERSATION["session_id"]}),
        await caller.get("/usage", params=WINDOW),
        await caller.delete(url),
    ]


async def test_a_rotated_key_answers_401_at_once_and_the_new_one_owns_the_conversations(client, db_connection, as_key):
    ada = await new_user(client)
    async with as_key(ada["api_key"]) as old:
        hers = await new_conversation(old)
        rotated = await client.post(f"/users/{ada['id']}/keys")
        assert rotated.status_code == 200, rotated.text
        new_key = rotated.json()["api_key"]
        assert new_key != ada["api_key"]
        assert rotated.json()["id"] == ada["id"]
        for answer in await every_route(old, hers["id"]):
            await refused(answer)
    [count] = await rows(db_connection, "SELECT count(*) AS n FROM kraken_conversations")
    assert count.n == 1  # the refused create stored nothing
    assert await stored_counts(db_connection, hers["id"]) == (0, 0)
    async with as_key(new_key) as new:
        statuses = [answer.status_code for answer in await every_route(new, hers["id"])]
    assert statuses == [201, 201, 200, 200, 200, 200, 204]


async def test_a_deactivated_users_key_answers_401_and_gets_no_new_key(client, db_connection, as_key):
    ada = await new_user(client)
    async with as_key(ada["api_key"]) as a:
        hers = await new_conversation(a)
        deactivated = await client.post(f"/users/{ada['id']}/deactivate")
        assert deactivated.status_code == 200
        assert deactivated.json()["is_active"] is False
        assert "api_key" not in deactivated.json()
        for answer in await every_route(a, hers["id"]):
            await refused(answer)
    again = await client.post(f"/users/{ada['id']}/deactivate")
    assert again.status_code == 200  # idempotent
    rotate = await client.post(f"/users/{ada['id']}/keys")
    assert rotate.status_code == 409
    assert rotate.json()["detail"][0] == {
        "loc": ["path", "user_id"],
        "msg": "the user is deactivated; a deactivated user gets no key",
        "type": "user_deactivated",
    }
    [listed] = (await client.get("/users")).json()["items"]
    assert listed["is_active"] is False
    # The user's conversations stay, for the operator.
    assert (await client.get(f"/conversations/{hers['id']}")).status_code == 200
    assert await stored_counts(db_connection, hers["id"]) == (0, 0)


@pytest.mark.parametrize("key", ["kraken_never-issued", "kraken_", "kraken_" + "A" * 43])
async def test_a_key_that_was_never_issued_answers_401(client, as_key, key):
    conversation = await new_conversation(client)
    async with as_key(key) as stranger:
        for answer in await every_route(stranger, conversation["id"]):
            await refused(answer)


@pytest.mark.parametrize(
    "key", ["kraken_", "kraken_x", "kraken_" + "A" * 42, "kraken_" + "A" * 44, "kraken_" + "A" * 42 + "="]
)
async def test_a_key_not_of_the_issued_shape_is_refused_before_any_statement(client, as_key, key, monkeypatch):
    conversation = await new_conversation(client)
    with statements_sent(monkeypatch) as sent:
        async with as_key(key) as stranger:
            for answer in await every_route(stranger, conversation["id"]):
                await refused(answer)
    assert sent == []


async def test_a_create_racing_a_rotation_replays_nothing_of_the_operators(client, db_connection, as_key):
    """The fallback after a create lost its Idempotency-Key's race reads the prior conversation as
    the key's user: a key that names no active user by then (rotated, deactivated) owns nothing,
    not even the operator's conversations (user_id NULL), and gets no row (a 401)."""
    ada = await new_user(client)
    shared = await client.post("/conversations", json=CONVERSATION, headers={"Idempotency-Key": "race-1"})
    assert shared.status_code == 201
    driver = await driver_of(db_connection)
    prior = service.PRIOR_CONVERSATION_AS_USER
    hers = hashlib.sha256(ada["api_key"].encode()).digest()
    found = await fetch_one(driver, prior, idempotency_key="race-1", key_hash=hers)
    assert found is not None
    assert found["owned"] is False  # ada's key: the operator's conversation is not hers
    assert (await client.post(f"/users/{ada['id']}/keys")).status_code == 200
    assert await fetch_one(driver, prior, idempotency_key="race-1", key_hash=hers) is None


# --- usage per user --------------------------------------------------------------------------


async def test_usage_per_user_is_the_operators(client, as_key):
    ada, bob = await new_user(client, "ada"), await new_user(client, "bob")
    async with as_key(ada["api_key"]) as a, as_key(bob["api_key"]) as b:
        for caller, turns in ((a, 2), (b, 1), (client, 1)):
            conversation = await new_conversation(caller)
            for _ in range(turns):
                answer = await caller.post(f"/conversations/{conversation['id']}/turns", json=turn_body())
                assert answer.status_code == 201
        report = await client.get("/usage", params={**WINDOW, "group_by": "user"})
        assert report.status_code == 200, report.text
        groups = {g["key"]: (g["turns"], g["total_tokens"]) for g in report.json()["groups"]}
        assert groups == {ada["id"]: (2, 300), bob["id"]: (1, 150), "shared": (1, 150)}
        assert [g["key"] for g in report.json()["groups"]] == sorted(groups)  # key order; "shared" last
        forbidden = await a.get("/usage", params={**WINDOW, "group_by": "user"})
        assert forbidden.status_code == 403
        assert forbidden.json()["detail"] == [
            {
                "loc": ["query", "group_by"],
                "msg": "group_by=user takes the operator's key (KRAKEN_API_KEY), not a user's",
                "type": "forbidden",
            }
        ]
        by_day = (await b.get("/usage", params={**WINDOW, "group_by": "day"})).json()["groups"]
        assert [g["turns"] for g in by_day] == [1]


# --- last_active -----------------------------------------------------------------------------


async def user_row(db_connection, user_id: str) -> Any:
    [row] = await rows(
        db_connection, "SELECT last_active, xmin::text AS version FROM kraken_users WHERE id = :id", id=user_id
    )
    return row


async def test_last_active_is_written_at_most_once_a_minute(client, db_connection, as_key):
    ada = await new_user(client)
    async with as_key(ada["api_key"]) as a:
        conversation = await new_conversation(a)
        first = await user_row(db_connection, ada["id"])
        assert first.last_active is not None
        for _ in range(3):
            assert (await a.post(f"/conversations/{conversation['id']}/turns", json=turn_body())).status_code == 201
            assert (await a.get("/conversations", params={"session_id": "session-1"})).status_code == 200
        # Not written again: the same value, and the same row version (no update at all).
        assert await user_row(db_connection, ada["id"]) == first
        await set_time(db_connection, "kraken_users", "last_active", ada["id"], "2025-01-01 00:00")
        before = await user_row(db_connection, ada["id"])
        assert (await a.post(f"/conversations/{conversation['id']}/turns", json=turn_body())).status_code == 201
        after = await user_row(db_connection, ada["id"])
        assert after.last_active > before.last_active
        assert after.last_active > first.last_active
    listed = (await client.get("/users")).json()["items"][0]
    assert listed["last_active"] is not None
    # The operator's requests are no user's activity.
    await client.post(f"/conversations/{conversation['id']}/turns", json=turn_body())
    assert await user_row(db_connection, ada["id"]) == after


# --- the write path ----------------------------------------------------------------------------


async def test_a_user_keys_append_is_one_statement_with_its_key_check(client, as_key, monkeypatch):
    ada = await new_user(client)
    async with as_key(ada["api_key"]) as a:
        conversation = await new_conversation(a)
        for path, body in (
            (f"/conversations/{conversation['id']}/turns", turn_body()),
            ("/conversations", CONVERSATION),
        ):
            with statements_sent(monkeypatch) as sent:
                answer = await a.post(path, json=body)
            assert answer.status_code == 201
            assert sent == ["statement"], path


async def test_no_key_reaches_the_log(client, as_key, caplog):
    caplog.set_level(logging.DEBUG)
    ada = await new_user(client)
    rotated = (await client.post(f"/users/{ada['id']}/keys")).json()
    async with as_key(rotated["api_key"]) as a:
        await new_conversation(a)
    async with as_key(ada["api_key"]) as old:
        await old.post("/conversations", json=CONVERSATION)
    for secret in (ada["api_key"], rotated["api_key"], API_KEY):
        assert secret not in caplog.text


# --- without KRAKEN_API_KEY (development) --------------------------------------------------------


async def test_without_an_operator_key_user_keys_are_still_scoped(app, anonymous, as_key):
    app.state.settings = app.state.settings.model_copy(update={"api_key": None})
    created = await anonymous.post("/users", json={"name": "ada"})  # the operator's routes are open
    assert created.status_code == 201
    ada = created.json()
    async with as_key(ada["api_key"]) as a, as_key("not-a-user-key") as other:
        hers = await new_conversation(a)
        theirs = await new_conversation(anonymous)
        assert (await a.get(f"/conversations/{theirs['id']}")).status_code == 404
        # Any other credentials are the operator's, as before issue 20.
        assert (await other.get(f"/conversations/{hers['id']}")).status_code == 200
        assert (await other.post(f"/conversations/{hers['id']}/turns", json=turn_body())).status_code == 201
        await anonymous.post(f"/users/{ada['id']}/keys")
        await refused(await a.post("/conversations", json=CONVERSATION))
