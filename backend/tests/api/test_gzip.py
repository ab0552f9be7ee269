"""Responses from 1 KiB are gzip-compressed for clients that accept it; smaller ones and clients
that do not accept it get plain bodies. And with KRAKEN_CORS_ORIGINS unset, no CORS headers."""

import gzip
import json

from backend.api.middleware import GZIP_MINIMUM_BYTES, RequestContext
from backend.main import create_app
from backend.tests.helpers import new_conversation, turn_body

GZIP = {"Accept-Encoding": "gzip"}
IDENTITY = {"Accept-Encoding": "identity"}


async def long_conversation(client) -> str:
    conversation = await new_conversation(client)
    for _ in range(3):
        response = await client.post(f"/conversations/{conversation['id']}/turns", json=turn_body())
        assert response.status_code == 201
    return f"/conversations/{conversation['id']}"


async def test_a_large_response_is_gzipped_when_the_client_accepts_it(client):
    url = await long_conversation(client)

    plain = await client.get(url, headers=IDENTITY)
    compressed = await client.get(url, headers=GZIP)

    assert len(plain.content) > GZIP_MINIMUM_BYTES
    assert "content-encoding" not in plain.headers
    assert compressed.headers["content-encoding"] == "gzip"
    assert "Accept-Encoding" in compressed.headers["vary"]
    assert "x-request-id" in compressed.headers  # RequestContext is still outside it
    # What went over the wire is gzip, smaller, and the same document.
    assert compressed.num_bytes_downloaded < len(plain.content)
    assert compressed.json() == plain.json()


async def test_a_small_response_is_not_compressed(client):
    conversation = await new_conversation(client)
    response = await client.get(f"/conversations/{conversation['id']}", headers=GZIP)
    assert response.status_code == 200
    assert len(response.content) < GZIP_MINIMUM_BYTES
    assert "content-encoding" not in response.headers


async def test_the_gzipped_body_is_plain_gzip(client):
    url = await long_conversation(client)
    async with client.stream("GET", url, headers=GZIP) as response:
        raw = b"".join([chunk async for chunk in response.aiter_raw()])
    assert json.loads(gzip.decompress(raw))["turns"][2]["turn_number"] == 3


def test_request_context_stays_the_outermost_layer():
    outermost: object = create_app().user_middleware[0].cls
    assert outermost is RequestContext


async def test_without_cors_origins_no_cors_headers(anonymous, client):
    url = await long_conversation(client)
    response = await anonymous.get(url, headers={"Origin": "https://share.example.com"})
    assert response.status_code == 200
    assert not [name for name in response.headers if name.startswith("access-control-")]
    preflight = await anonymous.options(
        url, headers={"Origin": "https://share.example.com", "Access-Control-Request-Method": "GET"}
    )
    assert preflight.status_code == 405  # no CORS layer answers it: the route's methods do
    assert "access-control-allow-origin" not in preflight.headers
