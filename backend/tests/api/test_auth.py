"""Who may write: the API key on writes, deletes, listing and usage; reads by id stay open."""

import pytest

from backend.tests.helpers import API_KEY, CONVERSATION, new_conversation, stored_counts, turn_body

PROTECTED = [
    pytest.param("POST", "/conversations", CONVERSATION, 201, id="create"),
    pytest.param("POST", "/conversations/{id}/turns", turn_body(), 201, id="append"),
    pytest.param("POST", "/conversations/{id}/end", {"status": "completed"}, 200, id="end"),
    pytest.param("DELETE", "/conversations/{id}", None, 204, id="delete"),
    pytest.param("GET", "/conversations?session_id=session-1", None, 200, id="list"),
    pytest.param("GET", "/usage?from=2025-01-01&to=2100-01-01", None, 200, id="usage"),
]
BAD_CREDENTIALS = [
    pytest.param({}, id="none"),
    pytest.param({"Authorization": "Bearer not-the-key"}, id="wrong-key"),
    pytest.param({"Authorization": f"Bearer {API_KEY}x"}, id="key-plus-one"),
    pytest.param({"Authorization": f"Bearer {API_KEY[:-1]}"}, id="key-minus-one"),
    pytest.param({"Authorization": f"Basic {API_KEY}"}, id="basic-scheme"),
    pytest.param({"Authorization": API_KEY}, id="no-scheme"),
    pytest.param({"Authorization": "Bearer"}, id="scheme-only"),
    # A user's key is checked by the statement serving the request: one never issued finds no user.
    pytest.param({"Authorization": "Bearer kraken_never-issued"}, id="unknown-user-key"),
]


@pytest.mark.parametrize("headers", BAD_CREDENTIALS)
@pytest.mark.parametrize(("method", "path", "body", "ok"), PROTECTED)
async def test_protected_routes_refuse_a_missing_or_wrong_key(
    client, anonymous, db_connection, method, path, body, ok, headers
):
    conversation = await new_conversation(client)
    url = path.format(id=conversation["id"])

    refused = await anonymous.request(method, url, json=body, headers=headers)

    assert refused.status_code == 401, refused.text
    assert refused.headers["www-authenticate"] == "Bearer"
    assert refused.json()["detail"][0]["loc"] == ["header", "Authorization"]
    view = await anonymous.get(f"/conversations/{conversation['id']}")
    assert view.json()["status"] == "active"  # not ended, not deleted
    assert await stored_counts(db_connection, conversation["id"]) == (0, 0)
    # The same request with the key goes through.
    assert (
        await anonymous.request(method, url, json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    ).status_code == ok


async def test_the_scheme_name_is_case_insensitive(anonymous):
    response = await anonymous.post("/conversations", json=CONVERSATION, headers={"Authorization": f"bearer {API_KEY}"})
    assert response.status_code == 201


async def test_reads_by_id_and_health_need_no_key(client, anonymous):
    conversation = await new_conversation(client)
    assert (await anonymous.get(f"/conversations/{conversation['id']}")).status_code == 200
    assert (await anonymous.get("/openapi.json")).status_code == 200


async def test_without_a_configured_key_writes_are_open(app, anonymous):
    app.state.settings = app.state.settings.model_copy(update={"api_key": None})
    created = await anonymous.post("/conversations", json=CONVERSATION)
    assert created.status_code == 201
    turn = await anonymous.post(f"/conversations/{created.json()['id']}/turns", json=turn_body())
    assert turn.status_code == 201
