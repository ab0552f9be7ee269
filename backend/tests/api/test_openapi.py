"""The OpenAPI document tells the truth: what it allows is accepted, what it refuses is refused, every
status and header an operation answers is in it.
"""

from typing import Any

import pytest


@pytest.fixture
async def document(client) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    spec: dict[str, Any] = response.json()
    return spec


async def test_a_405_lists_every_method_of_the_path(client, document):
    # OPTIONS /conversations said `Allow: POST`; the path serves GET too.
    response = await client.options("/conversations")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, POST"
    assert response.json() == {"detail": [{"loc": [], "msg": "Method Not Allowed", "type": "http_405"}]}
    for path, item in document["paths"].items():
        url = path.replace("{conversation_id}", "00000000-0000-0000-0000-000000000000")
        for method in ("PUT", "PATCH", "OPTIONS", "TRACE"):
            refused = await client.request(method, url)
            assert refused.status_code == 405, (method, path)
            assert refused.headers["allow"] == ", ".join(sorted(m.upper() for m in item)), (method, path)
