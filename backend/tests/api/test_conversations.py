"""Every conversation endpoint, success and failure, through the ASGI app on a real database."""

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from backend.conversations import service
from backend.conversations.schemas import dumps
from backend.tests.helpers import (
    CONVERSATION,
    each_served_schema,
    instant,
    new_conversation,
    rows,
    set_time,
    stored_counts,
    turn_body,
    utc,
)

TS_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def parse_ts(value: str) -> datetime:
    """A time the API shows, which is always UTC with microseconds and a Z."""
    return datetime.strptime(value, TS_FORMAT).replace(tzinfo=UTC)


# --- POST /conversations -------------------------------------------------------------------


@each_served_schema  # in a database whose default time zone is New York: stored times are still UTC
async def test_create_starts_an_active_conversation_with_zero_totals(client, db_connection):
    created = await new_conversation(client)

    assert {key: created[key] for key in CONVERSATION} == CONVERSATION
    assert created["status"] == "active"
    assert created["ended_at"] is None
    assert (created["total_turns"], created["total_tokens"], created["total_cost_usd"]) == (0, 0, 0)
    [row] = await rows(
        db_connection,
        "SELECT started_at, clock_timestamp() AS now FROM kraken_conversations WHERE id = :id",
        id=created["id"],
    )
    assert parse_ts(created["started_at"]) == instant(row.started_at)
    assert timedelta(0) <= row.now - instant(row.started_at) < timedelta(minutes=5)
    assert timedelta(0) <= datetime.now(UTC) - parse_ts(created["started_at"]) < timedelta(minutes=5)


async def test_create_stores_sql_looking_text_verbatim(client, db_connection):
    hostile = "x'); DROP TABLE kraken_conversations; --"
    created = await new_conversation(client, session_id=hostile, agent_version="1' OR '1'='1")
    [row] = await rows(
        db_connection, "SELECT session_id, agent_version FROM kraken_conversations WHERE id = :id", id=created["id"]
    )
    assert tuple(row) == (hostile, "1' OR '1'='1")


# --- POST /conversations/{id}/turns --------------------------------------------------------


async def test_turns_are_numbered_in_order_and_added_to_the_totals(client):
    conversation = await new_conversation(client)
    url = f"/conversations/{conversation['id']}/turns"

    first = await client.post(url, json=turn_body())
    assert first.status_code == 201, first.text
    turn = first.json()
    assert turn["conversation_id"] == conversation["id"]
    assert turn["turn_number"] == 1
    assert turn["tool_calls_count"] == 2
    assert [(c["sequence_order"], c["tool_name"]) for c in turn["tool_calls"]] == [(1, "weather"), (2, "clock")]
    assert turn["tool_calls"][0]["tool_args"] == {"city": "Paris"}
    assert turn["tool_calls"][0]["tool_result"] == {"temp_c": 21, "sky": "sunny"}
    assert not any(c["result_truncated"] for c in turn["tool_calls"])

    second = await client.post(url, json=turn_body(input_tokens=1000, output_tokens=1, cost_usd="0.5", tool_calls=[]))
    assert second.status_code == 201, second.text
    assert (second.json()["turn_number"], second.json()["tool_calls_count"], second.json()["tool_calls"]) == (2, 0, [])

    view = (await client.get(f"/conversations/{conversation['id']}")).json()
    assert view["total_turns"] == 2
    assert view["total_tokens"] == 120 + 30 + 1000 + 1  # input + output; cache tokens are not in the total
    assert Decimal(str(view["total_cost_usd"])) == Decimal("0.501234")


async def test_cost_is_rounded_to_the_microdollar_the_column_holds(client):
    conversation = await new_conversation(client)
    turn = await client.post(f"/conversations/{conversation['id']}/turns", json=turn_body(cost_usd=0.0000125))
    assert turn.json()["cost_usd"] == 0.000012  # half-even, as stored
    view = (await client.get(f"/conversations/{conversation['id']}")).json()
    assert view["turns"][0]["cost_usd"] == 0.000012


async def test_turn_text_and_json_that_look_like_sql_are_stored_verbatim(client, db_connection):
    conversation = await new_conversation(client)
    hostile = "'; DELETE FROM kraken_turns; --"
    args = {"query": "SELECT * FROM users WHERE name = '' OR 1=1", "$1": "::jsonb", "\\": "\"'"}
    body = turn_body(user_query=hostile, tool_calls=[{"tool_name": "sql", "tool_args": args, "tool_result": hostile}])
    assert (await client.post(f"/conversations/{conversation['id']}/turns", json=body)).status_code == 201

    [row] = await rows(
        db_connection,
        "SELECT t.user_query, tc.tool_args, tc.tool_result FROM kraken_turns t"
        " JOIN kraken_tool_calls tc ON tc.turn_id = t.id WHERE t.conversation_id = :id",
        id=conversation["id"],
    )
    assert tuple(row) == (hostile, args, hostile)


async def test_appending_to_an_unknown_conversation_is_404_and_stores_nothing(client, db_connection):
    [before] = await rows(db_connection, "SELECT count(*) AS n FROM kraken_turns")
    response = await client.post(f"/conversations/{uuid.uuid4()}/turns", json=turn_body())
    assert response.status_code == 404
    assert response.json()["detail"][0]["loc"] == ["path", "conversation_id"]
    [after] = await rows(db_connection, "SELECT count(*) AS n FROM kraken_turns")
    assert after.n == before.n


async def test_a_turn_that_would_overflow_a_total_is_409_and_stores_nothing(client, db_connection):
    conversation = await new_conversation(client)
    await rows(
        db_connection,
        "UPDATE kraken_conversations SET total_tokens = 2147483647 - 100 WHERE id = :id",
        id=conversation["id"],
    )
    response = await client.post(
        f"/conversations/{conversation['id']}/turns", json=turn_body(input_tokens=60, output_tokens=41)
    )
    assert response.status_code == 409
    assert response.json()["detail"][0]["type"] == "totals_full"
    assert "total_tokens" in response.json()["detail"][0]["msg"]
    assert await stored_counts(db_connection, conversation["id"]) == (0, 0)

    # Exactly up to the limit still fits.
    fits = await client.post(
        f"/conversations/{conversation['id']}/turns", json=turn_body(input_tokens=60, output_tokens=40)
    )
    assert fits.status_code == 201
    view = (await client.get(f"/conversations/{conversation['id']}")).json()
    assert view["total_tokens"] == 2147483647


async def test_a_cost_that_would_overflow_the_total_cost_is_409(client, db_connection):
    conversation = await new_conversation(client)
    await rows(
        db_connection, "UPDATE kraken_conversations SET total_cost_usd = 9999.5 WHERE id = :id", id=conversation["id"]
    )
    response = await client.post(f"/conversations/{conversation['id']}/turns", json=turn_body(cost_usd=0.5))
    assert response.status_code == 409
    assert "total_cost_usd" in response.json()["detail"][0]["msg"]
    assert await stored_counts(db_connection, conversation["id"]) == (0, 0)


async def test_a_turn_the_database_rejects_part_way_leaves_no_trace(client, db_connection):
    """The second of three tool calls violates a constraint: no turn, no tool call, no totals."""
    conversation = await new_conversation(client)
    await db_connection.exec_driver_sql(
        "ALTER TABLE kraken_tool_calls ADD CONSTRAINT no_boom CHECK (tool_name <> 'boom') NOT VALID"
    )
    calls: list[dict[str, Any]] = [{"tool_name": n, "tool_args": {}, "tool_result": None} for n in ("ok", "boom", "ok")]

    response = await client.post(f"/conversations/{conversation['id']}/turns", json=turn_body(tool_calls=calls))

    assert response.status_code == 409
    assert response.json()["detail"][0]["type"] == "turn_rejected"
    assert "no_boom" in response.json()["detail"][0]["msg"]
    assert await stored_counts(db_connection, conversation["id"]) == (0, 0)
    view = (await client.get(f"/conversations/{conversation['id']}")).json()
    assert (view["total_turns"], view["total_tokens"], view["total_cost_usd"], view["turns"]) == (0, 0, 0, [])
    # The next turn is number 1: the failed one left no gap.
    retry = await client.post(f"/conversations/{conversation['id']}/turns", json=turn_body(tool_calls=calls[:1]))
    assert retry.json()["turn_number"] == 1


# --- tool result truncation ----------------------------------------------------------------

LIMIT = 10240  # the default KRAKEN_TOOL_RESULT_MAX_BYTES


@pytest.mark.parametrize(
    ("size", "truncated"),
    [(LIMIT - 1, False), (LIMIT, False), (LIMIT + 1, True)],
    ids=["just-below", "at-the-limit", "just-above"],
)
async def test_tool_results_over_the_limit_are_stored_truncated(client, size, truncated):
    result = {"rows": "é" * ((size - len('{"rows":""}')) // 2)}  # two bytes per character
    result["rows"] += "x" * (size - len(dumps(result).encode()))
    assert len(dumps(result).encode()) == size
    conversation = await new_conversation(client)
    call = {"tool_name": "search", "tool_args": {"q": "paris"}, "tool_result": result}

    posted = await client.post(f"/conversations/{conversation['id']}/turns", json=turn_body(tool_calls=[call]))
    assert posted.status_code == 201, posted.text

    [stored] = (await client.get(f"/conversations/{conversation['id']}")).json()["turns"][0]["tool_calls"]
    assert stored == posted.json()["tool_calls"][0]
    assert stored["result_truncated"] is truncated
    if not truncated:
        assert stored["tool_result"] == result
    else:
        assert stored["tool_result"]["original_size_bytes"] == size
        assert dumps(result).startswith(stored["tool_result"]["preview"])
        assert len(stored["tool_result"]["preview"]) > LIMIT // 2 - 100  # most of the budget (2-byte characters)
        assert len(dumps(stored["tool_result"]).encode()) <= LIMIT


async def test_the_truncation_limit_is_a_setting(client, app):
    app.state.settings = app.state.settings.model_copy(update={"tool_result_max_bytes": 1000})
    conversation = await new_conversation(client)
    call = {"tool_name": "t", "tool_args": {}, "tool_result": "x" * 999}  # 1001 bytes of JSON
    posted = await client.post(f"/conversations/{conversation['id']}/turns", json=turn_body(tool_calls=[call]))
    assert posted.json()["tool_calls"][0]["result_truncated"] is True
    assert posted.json()["tool_calls"][0]["tool_result"]["original_size_bytes"] == 1001


# --- POST /conversations/{id}/end ----------------------------------------------------------


@each_served_schema
@pytest.mark.parametrize("status", ["completed", "abandoned", "error"])
async def test_end_sets_the_status_and_ended_at(client, status):
    conversation = await new_conversation(client)
    response = await client.post(f"/conversations/{conversation['id']}/end", json={"status": status})
    assert response.status_code == 200, response.text
    ended = response.json()
    assert ended["status"] == status
    assert parse_ts(ended["ended_at"]) >= parse_ts(ended["started_at"])
    view = (await client.get(f"/conversations/{conversation['id']}")).json()
    assert (view["status"], view["ended_at"]) == (status, ended["ended_at"])


async def test_an_ended_conversation_refuses_turns_and_a_second_end(client, db_connection):
    conversation = await new_conversation(client)
    await client.post(f"/conversations/{conversation['id']}/turns", json=turn_body())
    await client.post(f"/conversations/{conversation['id']}/end", json={"status": "completed"})

    append = await client.post(f"/conversations/{conversation['id']}/turns", json=turn_body())
    assert append.status_code == 409
    assert append.json()["detail"][0]["type"] == "conversation_ended"
    assert await stored_counts(db_connection, conversation["id"]) == (1, 2)
    view = (await client.get(f"/conversations/{conversation['id']}")).json()
    assert view["total_turns"] == 1

    again = await client.post(f"/conversations/{conversation['id']}/end", json={"status": "error"})
    assert again.status_code == 409
    assert (await client.get(f"/conversations/{conversation['id']}")).json()["status"] == "completed"


@pytest.mark.parametrize("body", [{"status": "active"}, {"status": "done"}, {}, {"status": "completed", "why": 1}])
async def test_end_with_a_bad_status_is_422_naming_the_field(client, body):
    conversation = await new_conversation(client)
    response = await client.post(f"/conversations/{conversation['id']}/end", json=body)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][:2] in (["body", "status"], ["body", "why"])
    assert (await client.get(f"/conversations/{conversation['id']}")).json()["status"] == "active"


# --- GET /conversations/{id} ---------------------------------------------------------------


@each_served_schema
async def test_the_shared_view_is_what_was_posted_in_order(client, anonymous):
    conversation = await new_conversation(client)
    posted = []
    for i in range(3):
        calls = [{"tool_name": f"tool-{i}-{j}", "tool_args": {"j": j}, "tool_result": [j, None]} for j in range(i + 1)]
        response = await client.post(
            f"/conversations/{conversation['id']}/turns", json=turn_body(user_query=f"question {i}", tool_calls=calls)
        )
        posted.append(response.json())

    response = await anonymous.get(f"/conversations/{conversation['id']}")  # no key: ids are share links

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    view = response.json()
    # Same fields, same formats as the write responses; with each turn's feedback (none given here).
    assert view["turns"] == [{**turn, "feedback": None} for turn in posted]
    assert [t["turn_number"] for t in view["turns"]] == [1, 2, 3]
    assert [len(t["tool_calls"]) for t in view["turns"]] == [1, 2, 3]
    assert {key: value for key, value in view.items() if key != "turns"} == {
        **conversation,
        "total_turns": 3,
        "total_tokens": 450,
        "total_cost_usd": 0.003702,
        "next_after_turn": None,  # all of it in one page
    }


async def test_rows_from_before_the_service_are_still_readable(client, db_connection):
    """A status this service never writes (older writers did) is shown, not a 500."""
    conversation = await new_conversation(client, session_id="legacy")
    await rows(
        db_connection, "UPDATE kraken_conversations SET status = 'archived' WHERE id = :id", id=conversation["id"]
    )
    assert (await client.get(f"/conversations/{conversation['id']}")).json()["status"] == "archived"
    listed = (await client.get("/conversations", params={"session_id": "legacy"})).json()
    assert [item["status"] for item in listed["items"]] == ["archived"]
    appended = await client.post(f"/conversations/{conversation['id']}/turns", json=turn_body())
    assert appended.status_code == 409  # only an active conversation takes turns


async def test_the_shared_view_of_a_conversation_without_turns(client):
    conversation = await new_conversation(client)
    view = (await client.get(f"/conversations/{conversation['id']}")).json()
    assert view == {**conversation, "turns": [], "next_after_turn": None}


async def add_turns(db_connection, conversation_id: str, count: int) -> None:
    """``count`` turns (a tool call on every tenth) written at once in SQL, as if appended one by one."""
    await rows(
        db_connection,
        "WITH t AS (INSERT INTO kraken_turns (conversation_id, turn_number, user_query, assistant_response, model)"
        " SELECT :id, n, 'q' || n, 'a', 'm' FROM generate_series(1, :count) n RETURNING id, turn_number)"
        " INSERT INTO kraken_tool_calls (turn_id, tool_name, tool_args, tool_result, sequence_order)"
        " SELECT id, 'search', '{}', '[]', 1 FROM t WHERE turn_number % 10 = 0",
        id=conversation_id,
        count=count,
    )
    await rows(
        db_connection,
        "UPDATE kraken_conversations SET total_turns = :count WHERE id = :id",
        id=conversation_id,
        count=count,
    )


async def test_a_10000_turn_conversation_is_served_in_pages_each_turn_once_in_order(anonymous, client, db_connection):
    conversation = await new_conversation(client)
    await add_turns(db_connection, conversation["id"], 10_000)

    seen: list[int] = []
    pages = 0
    after_turn = 0
    while after_turn is not None:
        response = await anonymous.get(
            f"/conversations/{conversation['id']}", params={"after_turn": after_turn, "limit": 1000}
        )
        assert response.status_code == 200, response.text
        view = response.json()
        numbers = [turn["turn_number"] for turn in view["turns"]]
        assert len(numbers) == 1000
        assert view["next_after_turn"] == (numbers[-1] if numbers[-1] < 10_000 else None)
        assert [len(turn["tool_calls"]) for turn in view["turns"]] == [int(n % 10 == 0) for n in numbers]
        seen += numbers
        pages += 1
        after_turn = view["next_after_turn"]

    assert pages == 10
    assert seen == list(range(1, 10_001))


async def test_the_shared_view_pages_by_default_and_from_any_turn(client, db_connection):
    conversation = await new_conversation(client)
    await add_turns(db_connection, conversation["id"], 250)
    url = f"/conversations/{conversation['id']}"

    first = (await client.get(url)).json()  # no parameters: the first 200 turns
    assert [t["turn_number"] for t in first["turns"]] == list(range(1, 201))
    assert first["next_after_turn"] == 200
    rest = (await client.get(url, params={"after_turn": 200})).json()
    assert [t["turn_number"] for t in rest["turns"]] == list(range(201, 251))
    assert rest["next_after_turn"] is None
    assert {k: v for k, v in rest.items() if k not in ("turns", "next_after_turn")} == {
        k: v for k, v in first.items() if k not in ("turns", "next_after_turn")
    }

    middle = (await client.get(url, params={"after_turn": 7, "limit": 3})).json()
    assert [t["turn_number"] for t in middle["turns"]] == [8, 9, 10]
    assert middle["next_after_turn"] == 10
    exact = (await client.get(url, params={"after_turn": 240, "limit": 10})).json()  # ends on the last turn
    assert [t["turn_number"] for t in exact["turns"]] == list(range(241, 251))
    assert exact["next_after_turn"] is None
    past = (await client.get(url, params={"after_turn": 2_147_483_647})).json()
    assert (past["turns"], past["next_after_turn"], past["total_turns"]) == ([], None, 250)


@pytest.mark.parametrize(
    ("params", "loc"),
    [
        ({"after_turn": -1}, ["query", "after_turn"]),
        ({"after_turn": 2_147_483_648}, ["query", "after_turn"]),
        ({"after_turn": "first"}, ["query", "after_turn"]),
        ({"limit": 0}, ["query", "limit"]),
        ({"limit": 1001}, ["query", "limit"]),
        ({"page": 2}, ["query", "page"]),
    ],
)
async def test_bad_shared_view_parameters_are_422_naming_them(anonymous, client, params, loc):
    conversation = await new_conversation(client)
    response = await anonymous.get(f"/conversations/{conversation['id']}", params=params)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == loc


MALFORMED_IDS = ["nope", "123", "00000000-0000-0000-0000-00000000000g", "' OR '1'='1", "%00", "%F0%9F%90%99"]


@pytest.mark.parametrize("conversation_id", [*MALFORMED_IDS, str(uuid.UUID(int=0))])
@pytest.mark.parametrize(
    ("method", "suffix", "body"),
    [
        ("GET", "", None),
        ("POST", "/turns", turn_body()),
        ("POST", "/end", {"status": "completed"}),
        ("DELETE", "", None),
    ],
)
async def test_malformed_and_unknown_ids_are_404(client, conversation_id, method, suffix, body):
    response = await client.request(method, f"/conversations/{conversation_id}{suffix}", json=body)
    assert response.status_code == 404, response.text
    assert response.json()["detail"][0]["loc"] == ["path", "conversation_id"]


# --- GET /conversations?session_id= --------------------------------------------------------


@each_served_schema
async def test_listing_is_newest_first_and_pages_without_gaps_or_repeats(client, db_connection):
    ids = [(await new_conversation(client, session_id="listed"))["id"] for _ in range(7)]
    await new_conversation(client, session_id="another session")
    # Two pairs share a start time: the cursor must break ties by id.
    starts = ["2025-01-01 10:00", "2025-01-01 11:00", "2025-01-01 11:00", "2025-01-02 09:00", "2025-01-03 00:00"]
    starts += ["2025-01-03 00:00", "2025-01-04 00:00"]
    for conversation_id, start in zip(ids, starts, strict=True):
        await set_time(db_connection, "kraken_conversations", "started_at", conversation_id, start)
    expected = [i for _, i in sorted(zip(starts, [uuid.UUID(i) for i in ids], strict=True), reverse=True)]
    shown = {uuid.UUID(i): f"{utc(start):%Y-%m-%dT%H:%M:%S}.000000Z" for i, start in zip(ids, starts, strict=True)}

    seen, cursor, pages = [], None, 0
    while True:
        params = {"session_id": "listed", "limit": 2} | ({"cursor": cursor} if cursor else {})
        response = await client.get("/conversations", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        seen += [uuid.UUID(item["id"]) for item in page["items"]]
        assert all(item["started_at"] == shown[uuid.UUID(item["id"])] for item in page["items"])  # the instants kept
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == expected
    assert pages == 4


@each_served_schema
async def test_any_cursor_of_the_documented_form_is_a_position(client, db_connection):
    ids = [(await new_conversation(client, session_id="positions"))["id"] for _ in range(2)]
    for conversation_id, start in zip(ids, ["2025-01-01 10:00", "2025-01-01 11:00"], strict=True):
        await set_time(db_connection, "kraken_conversations", "started_at", conversation_id, start)

    async def page(cursor: str) -> list[str]:
        response = await client.get("/conversations", params={"session_id": "positions", "cursor": cursor})
        assert response.status_code == 200, response.text
        return [item["id"] for item in response.json()["items"]]

    assert await page(f"0-{'0' * 32}") == []  # before every conversation
    assert await page(f"{10**18 - 1}-{'f' * 32}") == [ids[1], ids[0]]  # after the last time datetime holds
    between = service.encode_cursor(utc("2025-01-01 10:30"), uuid.UUID(int=0))
    assert await page(between) == [ids[0]]
    # The first conversation's own position: what comes after it in the listing, not it.
    assert await page(service.encode_cursor(utc("2025-01-01 10:00"), uuid.UUID(ids[0]))) == []
    assert await page(service.encode_cursor(utc("2025-01-01 11:00"), uuid.UUID(ids[1]))) == [ids[0]]


async def test_listing_an_unknown_session_is_empty(client):
    response = await client.get("/conversations", params={"session_id": "nobody"})
    assert response.json() == {"items": [], "next_cursor": None}


@pytest.mark.parametrize(
    ("params", "loc"),
    [
        ({}, ["query", "session_id"]),
        ({"session_id": ""}, ["query", "session_id"]),
        ({"session_id": "s", "limit": 0}, ["query", "limit"]),
        ({"session_id": "s", "limit": 101}, ["query", "limit"]),
        ({"session_id": "s", "limit": "ten"}, ["query", "limit"]),
        ({"session_id": "s", "cursor": "not-a-cursor"}, ["query", "cursor"]),
        ({"session_id": "s", "cursor": "MjAyNXxub3BlfA"}, ["query", "cursor"]),
        ({"session_id": "s", "cursor": "x" * 201}, ["query", "cursor"]),
        ({"session_id": "s", "cursor": f"1-{'A' * 32}"}, ["query", "cursor"]),
        ({"session_id": "s\x00"}, ["query", "session_id"]),
        ({"session_id": "s", "sort": "asc"}, ["query", "sort"]),
    ],
)
async def test_bad_listing_parameters_are_422_naming_them(client, params, loc):
    response = await client.get("/conversations", params=params)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == loc


# --- GET /usage ----------------------------------------------------------------------------


async def _turn_at(client, db_connection, conversation_id, created_at, **fields):
    turn = (await client.post(f"/conversations/{conversation_id}/turns", json=turn_body(**fields))).json()
    await set_time(db_connection, "kraken_turns", "created_at", turn["id"], created_at)


@each_served_schema
async def test_usage_sums_turns_tokens_and_cost_per_model_and_per_day(client, db_connection):
    conversation = (await new_conversation(client))["id"]
    tokens = {"cache_creation_tokens": 0, "cache_read_tokens": 1}
    a = {"model": "model-a", "input_tokens": 100, "output_tokens": 10, **tokens, "cost_usd": 0.25}
    b = {"model": "model-b", "input_tokens": 7, "output_tokens": 3, "cache_creation_tokens": 2, "cost_usd": 0.000001}
    await _turn_at(client, db_connection, conversation, "2025-03-01 00:00:00", **a)  # first instant: included
    await _turn_at(client, db_connection, conversation, "2025-03-01 23:59:59.999999", **a)
    await _turn_at(client, db_connection, conversation, "2025-03-02 12:00:00", **b)
    await _turn_at(client, db_connection, conversation, "2025-03-03 00:00:00", **b)  # `to` is exclusive
    await _turn_at(client, db_connection, conversation, "2025-02-28 23:59:59.999999", **a)  # before `from`
    window = {"from": "2025-03-01T00:00:00", "to": "2025-03-03T00:00:00"}

    by_model = await client.get("/usage", params={**window, "group_by": "model"})
    assert by_model.status_code == 200, by_model.text
    assert by_model.json() == {
        "from": "2025-03-01T00:00:00.000000Z",
        "to": "2025-03-03T00:00:00.000000Z",
        "group_by": "model",
        "groups": [
            {
                "key": "model-a",
                "turns": 2,
                "input_tokens": 200,
                "output_tokens": 20,
                "cache_creation_tokens": 0,
                "cache_read_tokens": 2,
                "total_tokens": 220,
                "cost_usd": 0.5,
            },
            {
                "key": "model-b",
                "turns": 1,
                "input_tokens": 7,
                "output_tokens": 3,
                "cache_creation_tokens": 2,
                "cache_read_tokens": 7,
                "total_tokens": 10,
                "cost_usd": 0.000001,
            },
        ],
    }
    by_day = (await client.get("/usage", params={**window, "group_by": "day"})).json()
    assert [(g["key"], g["turns"], g["total_tokens"], g["cost_usd"]) for g in by_day["groups"]] == [
        ("2025-03-01", 2, 220, 0.5),
        ("2025-03-02", 1, 10, 0.000001),
    ]


@each_served_schema
async def test_usage_takes_offsets_and_reads_times_without_one_as_utc(client, db_connection):
    conversation = (await new_conversation(client))["id"]
    await _turn_at(client, db_connection, conversation, "2025-03-01 22:30:00")
    # 2025-03-02T00:00+02:00 is 2025-03-01T22:00Z, so the turn at 22:30Z is inside.
    inside = await client.get("/usage", params={"from": "2025-03-02T00:00:00+02:00", "to": "2025-03-02T00:00:00Z"})
    assert inside.json()["from"] == "2025-03-01T22:00:00.000000Z"
    assert [g["turns"] for g in inside.json()["groups"]] == [1]
    outside = await client.get("/usage", params={"from": "2025-03-01T23:00:00", "to": "2025-03-02T00:00:00"})
    assert outside.json()["groups"] == []


@each_served_schema
async def test_usage_takes_a_date_as_its_midnight_utc(client, db_connection):
    conversation = (await new_conversation(client))["id"]
    await _turn_at(client, db_connection, conversation, "2025-03-01 00:00:00")
    report = (await client.get("/usage", params={"from": "2025-03-01", "to": "2025-03-02"})).json()
    assert (report["from"], report["to"]) == ("2025-03-01T00:00:00.000000Z", "2025-03-02T00:00:00.000000Z")
    assert [g["turns"] for g in report["groups"]] == [1]


@pytest.mark.parametrize(
    ("start", "end"),
    [
        ("2025-03-01T00:00:00Z", "2025-03-01T00:00:00Z"),
        ("2025-03-02", "2025-03-01"),
        ("2025-03-01T01:00:00+01:00", "2025-03-01"),
    ],
)
async def test_an_interval_ending_at_or_before_its_start_is_empty(client, db_connection, start, end):
    conversation = (await new_conversation(client))["id"]
    await _turn_at(client, db_connection, conversation, "2025-03-01 00:00:00")
    response = await client.get("/usage", params={"from": start, "to": end})
    assert response.status_code == 200, response.text
    assert response.json()["groups"] == []


@pytest.mark.parametrize(
    ("start", "shown"),
    [
        # The fuzzer's find: %Y wrote the year as 385, which is not RFC 3339.
        ("0385-01-11T19:26:07+16:52", "0385-01-11T02:34:07.000000Z"),
        ("0001-01-02T00:00:00+23:59", "0001-01-01T00:01:00.000000Z"),
        ("0001-01-01", "0001-01-01T00:00:00.000000Z"),
        ("0009-12-31T23:59:59.9999999", "0009-12-31T23:59:59.999999Z"),
        ("9999-12-30T23:59:59-23:59", "9999-12-31T23:58:59.000000Z"),
    ],
)
@each_served_schema
async def test_usage_writes_every_year_it_accepts_as_rfc_3339(client, start, shown):
    response = await client.get("/usage", params={"from": start, "to": "9999-12-31"})
    assert response.status_code == 200, response.text
    assert response.json()["from"] == shown


@pytest.mark.parametrize(
    ("params", "loc"),
    [
        ({"to": "2025-01-02"}, ["query", "from"]),
        ({"from": "2025-01-01"}, ["query", "to"]),
        ({"from": "yesterday", "to": "2025-01-01"}, ["query", "from"]),
        ({"from": "1735689600", "to": "2025-01-01"}, ["query", "from"]),  # no Unix times
        ({"from": "2025-01-01 00:00:00", "to": "2025-01-02"}, ["query", "from"]),
        ({"from": "2025-01-01T00:00Z", "to": "2025-01-02"}, ["query", "from"]),
        ({"from": "2025-01-01t00:00:00z", "to": "2025-01-02"}, ["query", "from"]),
        ({"from": "2016-12-31T23:59:60Z", "to": "2025-01-02"}, ["query", "from"]),  # no leap second
        ({"from": "2025-02-29", "to": "2025-03-01"}, ["query", "from"]),
        ({"from": "2025-02-29T00:00:00", "to": "2025-03-01"}, ["query", "from"]),
        ({"from": "0000-01-01", "to": "2025-01-01"}, ["query", "from"]),
        # The first and last days: an offset could carry them out of the years datetime holds.
        ({"from": "0001-01-01T00:00:00+01:00", "to": "2025-01-01"}, ["query", "from"]),
        ({"from": "2025-01-01", "to": "9999-12-31T23:00:00-01:00"}, ["query", "to"]),
        ({"from": "2025-01-01", "to": "2025-01-02", "group_by": "week"}, ["query", "group_by"]),
        ({"from": "2025-01-01", "to": "2025-01-02", "model": "x"}, ["query", "model"]),
    ],
)
async def test_bad_usage_parameters_are_422_naming_them(client, params, loc):
    response = await client.get("/usage", params=params)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == loc


# --- DELETE /conversations/{id} ------------------------------------------------------------


async def test_delete_removes_the_conversation_its_turns_and_tool_calls(client, db_connection):
    doomed = (await new_conversation(client))["id"]
    kept = (await new_conversation(client))["id"]
    for conversation_id in (doomed, doomed, kept):
        await client.post(f"/conversations/{conversation_id}/turns", json=turn_body())

    response = await client.delete(f"/conversations/{doomed}")

    assert response.status_code == 204
    assert response.content == b""
    assert (await client.get(f"/conversations/{doomed}")).status_code == 404
    assert await rows(db_connection, "SELECT 1 FROM kraken_conversations WHERE id = :id", id=doomed) == []
    assert await stored_counts(db_connection, doomed) == (0, 0)
    [orphans] = await rows(
        db_connection,
        "SELECT count(*) AS n FROM kraken_tool_calls tc"
        " WHERE NOT EXISTS (SELECT 1 FROM kraken_turns t WHERE t.id = tc.turn_id)",
    )
    assert orphans.n == 0
    assert await stored_counts(db_connection, kept) == (1, 2)
    assert (await client.delete(f"/conversations/{doomed}")).status_code == 404


# --- bodies --------------------------------------------------------------------------------


async def test_a_body_over_the_size_limit_is_413_and_stores_nothing(client, app, db_connection):
    limit = app.state.settings.max_body_bytes
    conversation = await new_conversation(client)
    url = f"/conversations/{conversation['id']}/turns"
    big = turn_body(assistant_response="x" * limit)

    declared = await client.post(url, json=big)
    assert declared.status_code == 413
    assert declared.json()["detail"][0]["loc"] == ["body"]

    async def chunks():  # no Content-Length: counted as it arrives
        body = dumps(big).encode()
        for start in range(0, len(body), 65536):
            yield body[start : start + 65536]

    streamed = await client.post(url, content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413
    assert streamed.json()["detail"][0] == {"loc": ["body"], "msg": "Content Too Large", "type": "body_too_large"}
    assert await stored_counts(db_connection, conversation["id"]) == (0, 0)


async def test_the_body_limit_is_a_setting(client, app):
    app.state.settings = app.state.settings.model_copy(update={"max_body_bytes": 2048})
    conversation = await new_conversation(client)
    url = f"/conversations/{conversation['id']}/turns"
    assert (await client.post(url, json=turn_body(user_query="q" * 1000))).status_code == 201
    refused = await client.post(url, json=turn_body(user_query="q" * 2048))
    assert refused.status_code == 413
    assert "the limit is 2048" in refused.json()["detail"][0]["msg"]


async def test_openapi_documents_the_api_and_its_security(client):
    spec = (await client.get("/openapi.json")).json()
    paths = spec["paths"]
    assert set(paths) >= {"/conversations", "/conversations/{conversation_id}", "/usage"}
    assert set(paths["/conversations/{conversation_id}"]) == {"get", "delete"}
    assert paths["/conversations/{conversation_id}"]["get"]["security"] == [{}, {"HTTPBearer": []}]
    assert paths["/conversations/{conversation_id}"]["delete"]["security"] == [{"HTTPBearer": []}]
    assert paths["/conversations/{conversation_id}/turns"]["post"]["security"] == [{"HTTPBearer": []}]
    view = paths["/conversations/{conversation_id}"]["get"]["responses"]["200"]["content"]["application/json"]
    assert view["schema"] == {"$ref": "#/components/schemas/ConversationDetail"}
