"""KRAKEN_CORS_ORIGINS: browser pages on the listed origins may GET the shared view across
origins; other origins, methods and headers are not allowed."""

import pytest

from backend.tests.helpers import API_KEY, new_conversation

SHARE_PAGE = "https://share.example.com"
ELSEWHERE = "https://evil.example.net"


@pytest.fixture
def api_settings(migrated_db, settings_for):
    """The conftest's settings, with CORS origins (the ``app`` fixture builds on these)."""
    return settings_for(migrated_db, api_key=API_KEY, cors_origins=f"{SHARE_PAGE}, https://app.example.com")


def preflight_headers(origin: str, method: str = "GET", headers: str | None = None) -> dict[str, str]:
    sent = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers is not None:
        sent["Access-Control-Request-Headers"] = headers
    return sent


async def test_a_listed_origin_may_read_the_shared_view(client, anonymous):
    conversation = await new_conversation(client)
    url = f"/conversations/{conversation['id']}"

    response = await anonymous.get(url, headers={"Origin": SHARE_PAGE})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == SHARE_PAGE
    assert "x-request-id" in response.headers["access-control-expose-headers"].lower()
    assert "access-control-allow-credentials" not in response.headers

    preflight = await anonymous.options(url, headers=preflight_headers(SHARE_PAGE, headers="x-request-id"))
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == SHARE_PAGE
    assert preflight.headers["access-control-allow-methods"] == "GET"


async def test_writes_and_the_api_key_are_not_allowed_across_origins(anonymous):
    url = "/conversations"
    for refused in (preflight_headers(SHARE_PAGE, "POST"), preflight_headers(SHARE_PAGE, headers="authorization")):
        response = await anonymous.options(url, headers=refused)
        assert response.status_code == 400, refused


async def test_another_origin_gets_no_cors_headers(client, anonymous):
    conversation = await new_conversation(client)
    url = f"/conversations/{conversation['id']}"

    response = await anonymous.get(url, headers={"Origin": ELSEWHERE})
    assert response.status_code == 200  # the browser, not the server, withholds it from the page
    assert "access-control-allow-origin" not in response.headers

    preflight = await anonymous.options(url, headers=preflight_headers(ELSEWHERE))
    assert preflight.status_code == 400
    assert "access-control-allow-origin" not in preflight.headers


async def test_metrics_are_not_readable_across_origins(anonymous):
    response = await anonymous.get("/metrics", headers={"Origin": SHARE_PAGE})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
