"""Property: any valid turns come back exactly through GET /conversations/{id}."""

import json
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.conversations.schemas import MAX_DURATION_MS, MAX_TOKENS
from backend.tests.helpers import new_conversation

# Any Unicode PostgreSQL can store: everything but NUL and (excluded by the codec) unpaired surrogates.
storable = st.characters(codec="utf-8", exclude_characters="\x00")
texts = st.text(storable, max_size=30)
names = st.text(storable, min_size=1, max_size=30)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=10,
)
costs = st.decimals(min_value=0, max_value=1000, places=6, allow_nan=False, allow_infinity=False)
counts = st.integers(min_value=0, max_value=MAX_TOKENS)
turns = st.fixed_dictionaries(
    {
        "user_query": texts,
        "assistant_response": texts,
        "model": names,
        "input_tokens": counts,
        "output_tokens": counts,
        "cache_creation_tokens": counts,
        "cache_read_tokens": counts,
        # A JSON number or a decimal string: either way exactly the value, as it has 6 places.
        "cost_usd": st.one_of(costs.map(float), costs.map(str)),
        "duration_ms": st.integers(min_value=0, max_value=MAX_DURATION_MS),
        "tool_calls": st.lists(
            st.fixed_dictionaries({"tool_name": names, "tool_args": json_values, "tool_result": json_values}),
            max_size=3,
        ),
    }
)


def exact(value: Any) -> Any:
    """A JSON value compared as JSON: numbers by exact decimal value, booleans apart from numbers.

    jsonb keeps a number's value, not its spelling (1e2 comes back as 100), and Python's == would
    equate true with 1; this compares what JSON means.
    """
    if value is None or isinstance(value, bool | str):
        return (type(value).__name__, value)
    if isinstance(value, float):
        return ("number", Decimal(repr(value)))
    if isinstance(value, int | Decimal):
        return ("number", Decimal(value))
    if isinstance(value, list):
        return [exact(item) for item in value]
    return {key: exact(item) for key, item in value.items()}


@settings(
    max_examples=30,
    deadline=None,
    # The client's transaction is shared by the examples; each builds its own conversation.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(sent=st.lists(turns, min_size=1, max_size=3))
async def test_valid_turns_round_trip_exactly(client, sent):
    conversation = await new_conversation(client)
    url = f"/conversations/{conversation['id']}"
    for body in sent:
        response = await client.post(f"{url}/turns", json=body)
        assert response.status_code == 201, response.text

    response = await client.get(url)
    view = json.loads(response.text, parse_float=Decimal, parse_int=Decimal)

    assert [t["turn_number"] for t in view["turns"]] == list(range(1, len(sent) + 1))
    for body, stored in zip(sent, view["turns"], strict=True):
        assert {key: exact(stored[key]) for key in body if key not in ("tool_calls", "cost_usd")} == {
            key: exact(value) for key, value in body.items() if key not in ("tool_calls", "cost_usd")
        }
        assert stored["cost_usd"] == Decimal(str(body["cost_usd"]))
        assert stored["tool_calls_count"] == len(body["tool_calls"])
        assert [
            (c["sequence_order"], c["tool_name"], exact(c["tool_args"]), exact(c["tool_result"]), c["result_truncated"])
            for c in stored["tool_calls"]
        ] == [
            (i, c["tool_name"], exact(c["tool_args"]), exact(c["tool_result"]), False)
            for i, c in enumerate(body["tool_calls"], start=1)
        ]
    assert view["total_tokens"] == sum(b["input_tokens"] + b["output_tokens"] for b in sent)
    assert view["total_cost_usd"] == sum(Decimal(str(b["cost_usd"])) for b in sent)
