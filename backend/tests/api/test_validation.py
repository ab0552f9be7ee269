"""Input is never trusted: each client mistake is a 4xx JSON body naming the field, and stores nothing."""

import json
from typing import Any

import pytest

from backend.conversations.schemas import (
    MAX_DURATION_MS,
    MAX_JSON_DEPTH,
    MAX_NAME_CHARS,
    MAX_TEXT_CHARS,
    MAX_TOKENS,
    MAX_TOOL_ARGS_BYTES,
    MAX_TOOL_CALLS,
)
from backend.tests.helpers import CONVERSATION, new_conversation, rows, stored_counts, turn_body


def nested(depth: int) -> Any:
    """``depth`` lists, one inside the other."""
    value: Any = "bottom"
    for _ in range(depth):
        value = [value]
    return value


def call(**overrides: Any) -> dict[str, Any]:
    return {"tool_name": "search", "tool_args": {"q": "x"}, "tool_result": {"hits": 1}, **overrides}


def assert_error(response, status: int, loc: list[Any], type_: str | None = None, msg_part: str = "") -> None:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert all(set(item) == {"loc", "msg", "type"} for item in detail)  # the input is never echoed
    [match] = [item for item in detail if item["loc"] == loc] or [detail[0]]
    assert match["loc"] == loc, detail
    if type_ is not None:
        assert match["type"] == type_, detail
    assert msg_part in match["msg"]


TURN_MISTAKES = [
    pytest.param({"input_tokens": -1}, ["body", "input_tokens"], "greater_than_equal", id="negative-count"),
    pytest.param({"output_tokens": MAX_TOKENS + 1}, ["body", "output_tokens"], "less_than_equal", id="absurd-count"),
    pytest.param({"input_tokens": 2**70}, ["body", "input_tokens"], None, id="huge-integer"),
    pytest.param({"output_tokens": "5"}, ["body", "output_tokens"], "int_type", id="count-as-string"),
    pytest.param({"output_tokens": 5.5}, ["body", "output_tokens"], "int_type", id="count-with-a-fraction"),
    pytest.param({"cache_read_tokens": True}, ["body", "cache_read_tokens"], "int_type", id="count-as-bool"),
    pytest.param({"cache_creation_tokens": None}, ["body", "cache_creation_tokens"], "int_type", id="count-null"),
    pytest.param({"duration_ms": -5}, ["body", "duration_ms"], "greater_than_equal", id="negative-duration"),
    pytest.param({"duration_ms": MAX_DURATION_MS + 1}, ["body", "duration_ms"], "less_than_equal", id="long-duration"),
    pytest.param({"cost_usd": -0.01}, ["body", "cost_usd"], "greater_than_equal", id="negative-cost"),
    pytest.param({"cost_usd": 1000.000001}, ["body", "cost_usd"], "less_than_equal", id="absurd-cost"),
    pytest.param({"cost_usd": "1e999999"}, ["body", "cost_usd"], "decimal_string", id="cost-huge-exponent"),
    pytest.param({"cost_usd": "cheap"}, ["body", "cost_usd"], "decimal_string", id="cost-not-a-number"),
    pytest.param({"cost_usd": "NaN"}, ["body", "cost_usd"], "decimal_string", id="cost-nan-string"),
    pytest.param({"cost_usd": ""}, ["body", "cost_usd"], "decimal_string", id="cost-empty-string"),
    pytest.param({"cost_usd": " 1"}, ["body", "cost_usd"], "decimal_string", id="cost-string-with-a-space"),
    pytest.param({"cost_usd": "1e-3"}, ["body", "cost_usd"], "decimal_string", id="cost-string-exponent"),
    pytest.param({"cost_usd": "-0.5"}, ["body", "cost_usd"], "decimal_string", id="cost-string-negative"),
    pytest.param({"cost_usd": "1000.000001"}, ["body", "cost_usd"], "decimal_string", id="cost-string-over-1000"),
    pytest.param({"cost_usd": True}, ["body", "cost_usd"], "decimal_type", id="cost-as-bool"),
    pytest.param({"user_query": "x" * (MAX_TEXT_CHARS + 1)}, ["body", "user_query"], "string_too_long", id="long-text"),
    pytest.param({"user_query": 42}, ["body", "user_query"], "string_type", id="text-as-number"),
    pytest.param({"user_query": "a\x00b"}, ["body", "user_query"], "nul_character", id="nul-in-text"),
    pytest.param({"assistant_response": "\ud800"}, ["body", "assistant_response"], "string_unicode", id="surrogate"),
    pytest.param({"model": ""}, ["body", "model"], "string_too_short", id="empty-model"),
    pytest.param({"model": "m" * (MAX_NAME_CHARS + 1)}, ["body", "model"], "string_too_long", id="long-model"),
    pytest.param({"tool_calls": call()}, ["body", "tool_calls"], "list_type", id="tool-calls-not-a-list"),
    pytest.param({"tool_calls": [call()] * (MAX_TOOL_CALLS + 1)}, ["body", "tool_calls"], "too_long", id="many-calls"),
    pytest.param(
        {"tool_calls": ["search"]}, ["body", "tool_calls", 0], "model_attributes_type", id="tool-call-not-object"
    ),
    pytest.param(
        {"tool_calls": [call(), call(tool_name="t\x00")]},
        ["body", "tool_calls", 1, "tool_name"],
        "nul_character",
        id="nul-in-tool-name",
    ),
    pytest.param(
        {"tool_calls": [call(tool_args={"a": ["ok", "b\x00"]})]},
        ["body", "tool_calls", 0, "tool_args"],
        "nul_character",
        id="nul-deep-in-json",
    ),
    pytest.param(
        {"tool_calls": [call(tool_result={"k\x00": 1})]},
        ["body", "tool_calls", 0, "tool_result"],
        "nul_character",
        id="nul-in-json-key",
    ),
    pytest.param(
        {"tool_calls": [call(tool_result={"\udc80": 1})]},
        ["body", "tool_calls", 0, "tool_result"],
        "invalid_unicode",
        id="surrogate-in-json-key",
    ),
    pytest.param(
        {"tool_calls": [call(tool_result=nested(MAX_JSON_DEPTH + 1))]},
        ["body", "tool_calls", 0, "tool_result"],
        "json_too_deep",
        id="deep-json",
    ),
    pytest.param(
        {"tool_calls": [call(tool_args={"blob": "x" * MAX_TOOL_ARGS_BYTES})]},
        ["body", "tool_calls", 0, "tool_args"],
        "json_too_large",
        id="large-tool-args",
    ),
    pytest.param({"surprise": 1}, ["body", "surprise"], "extra_forbidden", id="unknown-field"),
    pytest.param({"k" * 5000: 1}, ["body", "k" * 200 + "..."], "extra_forbidden", id="long-unknown-field"),
    pytest.param({"turn_number": 7}, ["body", "turn_number"], "extra_forbidden", id="client-turn-number"),
    pytest.param(
        {"tool_calls": [call(sequence_order=3)]},
        ["body", "tool_calls", 0, "sequence_order"],
        "extra_forbidden",
        id="unknown-tool-call-field",
    ),
]


@pytest.mark.parametrize(("overrides", "loc", "type_"), TURN_MISTAKES)
async def test_turn_mistakes_are_422_naming_the_field(client, db_connection, overrides, loc, type_):
    conversation = await new_conversation(client)
    response = await client.post(
        f"/conversations/{conversation['id']}/turns",
        # ASCII-escaped JSON, the only way to send an unpaired surrogate (as "\\ud800").
        content=json.dumps(turn_body(**overrides)),
        headers={"content-type": "application/json"},
    )
    assert_error(response, 422, loc, type_)
    assert await stored_counts(db_connection, conversation["id"]) == (0, 0)
    view = (await client.get(f"/conversations/{conversation['id']}")).json()
    assert (view["total_turns"], view["total_tokens"], view["total_cost_usd"]) == (0, 0, 0)


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ("0.001234", 0.001234),
        ("1000", 1000),
        ("1000.000", 1000),
        ("007.5", 7.5),
        ("0.0000005", 0),
        ("0.0000015", 0.000002),
    ],
)
async def test_a_cost_string_in_plain_decimal_notation_is_accepted_and_rounded(client, sent, stored):
    conversation = await new_conversation(client)
    response = await client.post(f"/conversations/{conversation['id']}/turns", json=turn_body(cost_usd=sent))
    assert response.status_code == 201, response.text
    assert response.json()["cost_usd"] == stored


async def test_counts_written_with_a_zero_fraction_or_an_exponent_are_integers(client):
    # JSON Schema's integer, which the OpenAPI document promises: 5.0 and 1e2 are integers.
    conversation = await new_conversation(client)
    body = turn_body(input_tokens=5.0, output_tokens=1e2, duration_ms=3.0)
    response = await client.post(f"/conversations/{conversation['id']}/turns", json=body)
    assert response.status_code == 201, response.text
    turn = response.json()
    assert (turn["input_tokens"], turn["output_tokens"], turn["duration_ms"]) == (5, 100, 3)
    assert all(isinstance(turn[key], int) for key in ("input_tokens", "output_tokens", "duration_ms"))


@pytest.mark.parametrize("missing", ["user_query", "assistant_response", "model", "input_tokens", "cost_usd"])
async def test_missing_turn_fields_are_named(client, missing):
    conversation = await new_conversation(client)
    body = turn_body()
    del body[missing]
    response = await client.post(f"/conversations/{conversation['id']}/turns", json=body)
    assert_error(response, 422, ["body", missing], "missing")


async def test_the_json_path_of_a_bad_value_is_in_the_message(client):
    conversation = await new_conversation(client)
    body = turn_body(tool_calls=[call(tool_args={"rows": [{"name": "ok"}, {"name": "b\x00d"}]})])
    response = await client.post(f"/conversations/{conversation['id']}/turns", json=body)
    assert_error(response, 422, ["body", "tool_calls", 0, "tool_args"], "nul_character", '$["rows"][1]["name"]')


async def test_json_at_the_depth_limit_and_empty_values_are_accepted(client):
    conversation = await new_conversation(client)
    body = turn_body(user_query="", assistant_response="", tool_calls=[call(tool_args=nested(MAX_JSON_DEPTH))])
    response = await client.post(f"/conversations/{conversation['id']}/turns", json=body)
    assert response.status_code == 201, response.text
    assert response.json()["tool_calls"][0]["tool_args"] == nested(MAX_JSON_DEPTH)


# Bodies a JSON serializer would not produce, sent as bytes.
RAW_MISTAKES = [
    pytest.param(b'"cost_usd": NaN', ["body", "cost_usd"], "finite_number", id="nan-literal"),
    pytest.param(b'"cost_usd": Infinity', ["body", "cost_usd"], "finite_number", id="infinity-literal"),
    pytest.param(b'"cost_usd": 1e400', ["body", "cost_usd"], None, id="overflowing-float"),
    pytest.param(
        b'"tool_calls": [{"tool_name": "t", "tool_args": {"x": -Infinity}, "tool_result": 1}]',
        ["body", "tool_calls", 0, "tool_args"],
        "finite_number",
        id="infinity-in-json",
    ),
    pytest.param(
        b'"tool_calls": [{"tool_name": "t", "tool_args": [1e999], "tool_result": 1}]',
        ["body", "tool_calls", 0, "tool_args"],
        "finite_number",
        id="overflowing-float-in-json",
    ),
    pytest.param(
        b'"tool_calls": [{"tool_name": "t", "tool_args": {}, "tool_result": "\\u0000"}]',
        ["body", "tool_calls", 0, "tool_result"],
        "nul_character",
        id="escaped-nul",
    ),
]


@pytest.mark.parametrize(("fragment", "loc", "type_"), RAW_MISTAKES)
async def test_non_finite_numbers_and_escaped_nul_are_422(client, db_connection, fragment, loc, type_):
    conversation = await new_conversation(client)
    field = fragment.split(b'"')[1].decode()  # the fragment replaces this field of a valid turn
    body = {key: value for key, value in turn_body().items() if key != field}
    content = json.dumps(body)[:-1].encode() + b", " + fragment + b"}"
    response = await client.post(
        f"/conversations/{conversation['id']}/turns", content=content, headers={"content-type": "application/json"}
    )
    assert_error(response, 422, loc, type_)
    assert await stored_counts(db_connection, conversation["id"]) == (0, 0)


@pytest.mark.parametrize(
    ("content", "status", "loc"),
    [
        pytest.param(b'{"user_query": ', 422, ["body", 15], id="truncated-json"),
        pytest.param(b"[]", 422, ["body"], id="array-body"),
        pytest.param(b'"turn"', 422, ["body"], id="string-body"),
        pytest.param(b"", 422, ["body"], id="empty-body"),
        pytest.param(b'{"user_query": "\xff"}', 400, ["body"], id="invalid-utf8"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, 400, ["body"], id="nesting-bomb"),
        pytest.param(b'{"input_tokens": ' + b"9" * 5000 + b"}", 400, ["body"], id="5000-digit-number"),
    ],
)
async def test_unparsable_bodies_are_4xx_naming_the_body(client, db_connection, content, status, loc):
    conversation = await new_conversation(client)
    response = await client.post(
        f"/conversations/{conversation['id']}/turns", content=content, headers={"content-type": "application/json"}
    )
    assert_error(response, status, loc)
    assert await stored_counts(db_connection, conversation["id"]) == (0, 0)


CONVERSATION_MISTAKES = [
    pytest.param({"system_prompt_hash": "0123456789abcdef0"}, ["body", "system_prompt_hash"], "string_too_long"),
    pytest.param({"system_prompt_hash": ""}, ["body", "system_prompt_hash"], "string_too_short"),
    pytest.param({"session_id": ""}, ["body", "session_id"], "string_too_short"),
    pytest.param({"session_id": 12345}, ["body", "session_id"], "string_type"),
    pytest.param({"session_id": "s" * (MAX_NAME_CHARS + 1)}, ["body", "session_id"], "string_too_long"),
    pytest.param({"agent_version": "1.0\x00"}, ["body", "agent_version"], "nul_character"),
    pytest.param({"model": None}, ["body", "model"], "string_type"),
    pytest.param({"status": "completed"}, ["body", "status"], "extra_forbidden"),
    pytest.param({"total_turns": 5}, ["body", "total_turns"], "extra_forbidden"),
]


@pytest.mark.parametrize(("overrides", "loc", "type_"), CONVERSATION_MISTAKES)
async def test_conversation_mistakes_are_422_naming_the_field(client, db_connection, overrides, loc, type_):
    [before] = await rows(db_connection, "SELECT count(*) AS n FROM kraken_conversations")
    response = await client.post("/conversations", json={**CONVERSATION, **overrides})
    assert_error(response, 422, loc, type_)
    [after] = await rows(db_connection, "SELECT count(*) AS n FROM kraken_conversations")
    assert after.n == before.n


async def test_a_missing_conversation_field_is_named(client):
    body = dict(CONVERSATION)
    del body["agent_version"]
    assert_error(await client.post("/conversations", json=body), 422, ["body", "agent_version"], "missing")
