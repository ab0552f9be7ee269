"""The fast path (backend/api/fast_path.py): requests that pass every check are answered without
FastAPI's dependency solving, exactly as FastAPI's handler answers them; any other goes to that handler."""

import json

import fastapi
import httpx
import pytest

from backend.tests.helpers import CONVERSATION, new_conversation, turn_body


@pytest.fixture
def solved(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths of the requests FastAPI's own handler solved the dependencies of."""
    calls: list[str] = []
    from fastapi.dependencies.utils import solve_dependencies as solve

    async def counting(**kwargs):
        calls.append(kwargs["request"].url.path)
        return await solve(**kwargs)

    # The name FastAPI's request handler calls it by.
    monkeypatch.setattr("fastapi.routing.solve_dependencies", counting)
    return calls


def _comparable(response: httpx.Response) -> tuple[int, list[str], dict[str, object]]:
    """Status, header names in order, and the body with what differs between two turns left out."""
    body = json.loads(response.content)
    for volatile in ("id", "created_at", "turn_number"):
        body.pop(volatile, None)
    for call in body.get("tool_calls", []):
        call.pop("id")
    return response.status_code, [name for name, _ in response.headers.multi_items()], body


async def test_a_valid_append_skips_fastapis_solving_and_answers_as_its_handler_does(
    app: fastapi.FastAPI, client: httpx.AsyncClient, solved: list[str]
) -> None:
    conversation = await new_conversation(client)
    url = f"/conversations/{conversation['id']}/turns"
    solved.clear()
    fast = await client.post(url, json=turn_body(), headers={"Idempotency-Key": "fast-1"})
    replayed = await client.post(url, json=turn_body(), headers={"Idempotency-Key": "fast-1"})
    assert solved == []

    # Any dependency override sends every request to FastAPI's handler (overrides are its to apply).
    app.dependency_overrides[object] = object
    standard = await client.post(url, json=turn_body(), headers={"Idempotency-Key": "standard-1"})
    standard_replayed = await client.post(url, json=turn_body(), headers={"Idempotency-Key": "standard-1"})
    assert solved == [url, url]

    assert _comparable(fast) == _comparable(standard)
    assert fast.headers["content-type"] == standard.headers["content-type"] == "application/json"
    assert replayed.json() == fast.json()
    assert replayed.headers["Idempotent-Replayed"] == standard_replayed.headers["Idempotent-Replayed"] == "true"
    assert _comparable(replayed) == _comparable(standard_replayed)


async def test_a_create_and_an_end_take_the_fast_path_too(client: httpx.AsyncClient, solved: list[str]) -> None:
    conversation = await new_conversation(client)
    ended = await client.post(f"/conversations/{conversation['id']}/end", json={"status": "completed"})
    assert ended.status_code == 200
    assert ended.json()["status"] == "completed"
    assert solved == []


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        pytest.param({"Idempotency-Key": "has space"}, None, id="bad-idempotency-key"),
        pytest.param({"Authorization": "Bearer wrong"}, None, id="wrong-key"),
        pytest.param({"Content-Type": "text/plain"}, None, id="not-json"),
        pytest.param({}, json.dumps(turn_body(input_tokens=-1)).encode(), id="invalid-field"),
    ],
)
async def test_a_request_failing_a_check_goes_to_fastapis_handler(
    client: httpx.AsyncClient, solved: list[str], headers: dict[str, str], body: bytes | None
) -> None:
    conversation = await new_conversation(client)
    url = f"/conversations/{conversation['id']}/turns"
    content = body if body is not None else json.dumps(turn_body()).encode()
    answer = await client.post(url, content=content, headers={"Content-Type": "application/json", **headers})
    assert answer.status_code in (401, 422)
    assert solved[-1] == url


async def test_malformed_json_is_answered_by_fastapis_handler(client: httpx.AsyncClient) -> None:
    conversation = await new_conversation(client)
    answer = await client.post(
        f"/conversations/{conversation['id']}/turns",
        content=b'{"user_query": ',
        headers={"Content-Type": "application/json"},
    )
    # FastAPI's own wording (it answers before solving any dependency).
    assert answer.json() == {"detail": [{"loc": ["body", 15], "msg": "JSON decode error", "type": "json_invalid"}]}


async def test_an_id_that_is_not_a_uuid_goes_to_fastapis_handler(client: httpx.AsyncClient, solved: list[str]) -> None:
    answer = await client.post("/conversations/not-a-uuid/turns", json=turn_body())
    assert answer.status_code == 404
    assert answer.json()["detail"][0]["loc"] == ["path", "conversation_id"]
    assert solved == ["/conversations/not-a-uuid/turns"]


async def test_a_user_keys_writes_take_the_fast_path_and_answer_as_fastapis_handler(
    app: fastapi.FastAPI, client: httpx.AsyncClient, solved: list[str]
) -> None:
    user = (await client.post("/users", json={"name": "ada"})).json()
    headers = {"Authorization": f"Bearer {user['api_key']}"}
    conversation = await new_conversation(client)  # the operator's: not the user's
    solved.clear()
    created = await client.post("/conversations", json=CONVERSATION, headers=headers)
    url = f"/conversations/{created.json()['id']}/turns"
    fast = await client.post(url, json=turn_body(), headers=headers)
    foreign_fast = await client.post(f"/conversations/{conversation['id']}/turns", json=turn_body(), headers=headers)
    assert solved == []

    app.dependency_overrides[object] = object
    standard = await client.post(url, json=turn_body(), headers=headers)
    foreign = await client.post(f"/conversations/{conversation['id']}/turns", json=turn_body(), headers=headers)
    assert fast.status_code == standard.status_code == 201
    assert _comparable(fast) == _comparable(standard)
    assert (foreign_fast.status_code, foreign_fast.json()) == (foreign.status_code, foreign.json())
    assert foreign.status_code == 404

    # Rotated: the fast path's answer (the statement found no user) is the handler's.
    await client.post(f"/users/{user['id']}/keys")
    revoked = await client.post(url, json=turn_body(), headers=headers)
    app.dependency_overrides.clear()
    revoked_fast = await client.post(url, json=turn_body(), headers=headers)
    assert revoked.status_code == revoked_fast.status_code == 401
    assert revoked.json() == revoked_fast.json()
    assert revoked.headers["www-authenticate"] == revoked_fast.headers["www-authenticate"] == "Bearer"
