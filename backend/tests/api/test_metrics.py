"""GET /metrics: each series moves when what it counts happens, and only then; KRAKEN_METRICS=off
leaves no route and counts nothing.

The app in these tests keeps its values in memory (no PROMETHEUS_MULTIPROC_DIR), shared by every
app of the test process: each test compares before and after. test_metrics_workers.py runs real
worker processes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from backend import metrics
from backend.config import Settings
from backend.database import run_migrations as startup_hook
from backend.db.leases import Lease
from backend.db.url import DatabaseTarget
from backend.main import create_app
from backend.tests.conftest import settings_of
from backend.tests.helpers import API_KEY, AUTH, SERVED, live, metric, new_conversation, turn_body

TURNS = "/conversations/{conversation_id}/turns"


def scraped() -> str:
    """What /metrics would answer now (this process's values)."""
    body, _ = metrics.exposition("")
    return body.decode()


def requests(route: str, method: str, status: int) -> float:
    return metric(scraped(), "kraken_http_requests_total", route=route, method=method, status=str(status))


async def test_metrics_answers_prometheus_text(client: httpx.AsyncClient) -> None:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    for family in ("kraken_http_requests_total", "kraken_db_pool_connections_in_use", "kraken_turns_written_total"):
        assert f"# TYPE {family.removesuffix('_total')}" in response.text
    assert "_created" not in response.text  # as with worker processes, which cannot export them
    # A scraper that asks for OpenMetrics gets it.
    open_metrics = await client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert open_metrics.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert open_metrics.text.endswith("# EOF\n")


async def test_a_request_is_counted_by_route_template_method_and_status(client: httpx.AsyncClient) -> None:
    conversation = (await new_conversation(client))["id"]
    before = scraped()
    assert (await client.post(f"/conversations/{conversation}/turns", json=turn_body())).status_code == 201
    assert (await client.get(f"/no/such/{conversation}")).status_code == 404
    assert (await client.request("BREW", "/health")).status_code == 405
    # Refused before routing (declared length over the limit): still counted under its route.
    too_big = await client.post("/conversations", content=b"{}", headers={"Content-Length": str(10**9)})
    assert too_big.status_code == 413
    after = scraped()

    def moved(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    counted = "kraken_http_requests_total"
    assert moved(counted, route=TURNS, method="POST", status="201") == 1
    assert moved(counted, route="unmatched", method="GET", status="404") == 1  # never the raw path
    assert f"/no/such/{conversation}" not in after
    assert moved(counted, route="/health", method="other", status="405") == 1  # made-up methods: one value
    assert moved(counted, route="/conversations", method="POST", status="413") == 1
    timed = "kraken_http_request_duration_seconds"
    assert moved(f"{timed}_count", route=TURNS, method="POST") == 1
    assert 0 < moved(f"{timed}_sum", route=TURNS, method="POST") < 10
    assert moved(f"{timed}_bucket", route=TURNS, method="POST", le="10.0") == 1


async def test_appends_count_turns_tool_calls_and_truncated_results_not_replays(
    client: httpx.AsyncClient, api_settings: Settings
) -> None:
    conversation = (await new_conversation(client))["id"]
    big = "x" * (api_settings.tool_result_max_bytes + 1)
    calls = [
        {"tool_name": "fetch", "tool_args": {}, "tool_result": big},
        {"tool_name": "clock", "tool_args": {}, "tool_result": "12:00"},
        {"tool_name": "fetch", "tool_args": {}, "tool_result": {"page": big}},
    ]
    before = scraped()
    for _ in range(2):  # the second is a replay: nothing stored, nothing counted
        response = await client.post(
            f"/conversations/{conversation}/turns", json=turn_body(tool_calls=calls), headers={"Idempotency-Key": "k1"}
        )
        assert response.status_code == 201
    assert response.headers["Idempotent-Replayed"] == "true"
    assert (await client.post(f"/conversations/{conversation}/turns", json=turn_body(tool_calls=[]))).status_code == 201
    after = scraped()
    for name, expected in [
        ("kraken_turns_written_total", 2),
        ("kraken_tool_calls_written_total", 3),
        ("kraken_tool_results_truncated_total", 2),
    ]:
        assert metric(after, name) - metric(before, name) == expected, name


async def test_a_database_fault_is_counted_by_kind(live_db: DatabaseTarget) -> None:
    app = create_app(settings_of(live_db, api_key=API_KEY, db_pool_size=1, db_max_overflow=0, db_pool_timeout=0.2))
    async with live(app) as client:
        conversation = (await new_conversation(client))["id"]
        before = scraped()
        async with app.state.pool.acquire():  # the pool's only connection, held
            response = await client.post(f"/conversations/{conversation}/turns", json=turn_body())
        assert response.json()["detail"][0]["type"] == "database_busy"
        after = scraped()
    assert (
        metric(after, "kraken_database_errors_total", kind="busy")
        - metric(before, "kraken_database_errors_total", kind="busy")
        == 1
    )
    for kind in ("unavailable", "timeout", "conflict", "pooler"):  # every kind is there from the start
        assert f'kraken_database_errors_total{{kind="{kind}"}}' in after


async def test_the_pool_gauges_follow_checkouts_and_overflow(live_db: DatabaseTarget) -> None:
    app = create_app(settings_of(live_db, api_key=API_KEY, db_pool_size=1, db_max_overflow=1))

    async def pool(client: httpx.AsyncClient) -> tuple[float, float, float]:
        text = (await client.get("/metrics")).text
        return tuple(  # type: ignore[return-value]
            metric(text, f"kraken_db_pool_connections_{state}") for state in ("in_use", "idle", "overflow")
        )

    async with live(app) as client:
        await new_conversation(client)
        assert await pool(client) == (0, 1, 0)
        leases = [Lease(app.state.lender), Lease(app.state.lender)]
        for lease in leases:
            await lease.connection()
        assert await pool(client) == (2, 0, 1)
        for lease in leases:
            await lease.end(succeeded=True)
        # The overflow connection is closed on its return; the pool keeps its one.
        assert await pool(client) == (0, 1, 0)
    assert metric(scraped(), "kraken_db_pool_connections_idle") == 0  # disposed with the app


async def test_boot_migrations_record_the_schema_and_what_they_did(empty_db: DatabaseTarget) -> None:
    await startup_hook(settings_of(empty_db))
    text = scraped()
    assert metric(text, "kraken_schema_revision", revision=SERVED) == 1
    assert metric(text, "kraken_boot_revisions_applied") == int(SERVED)  # the pre-deploy phase
    assert 0 < metric(text, "kraken_boot_migration_seconds") < 120
    assert 0 <= metric(text, "kraken_boot_migration_lock_wait_seconds") < 1
    # A boot at head applies nothing.
    await startup_hook(settings_of(empty_db))
    assert metric(scraped(), "kraken_boot_revisions_applied") == 0


@pytest.fixture
def app_without_metrics(app: FastAPI) -> FastAPI:
    """The ``app`` fixture's app, with KRAKEN_METRICS=off (settings are read per request)."""
    app.state.settings = app.state.settings.model_copy(update={"metrics": False})
    return app


@pytest.fixture
async def client_without_metrics(app_without_metrics: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app_without_metrics)
    async with httpx.AsyncClient(transport=transport, base_url="http://kraken", headers=AUTH) as client:
        yield client


async def test_metrics_off_has_no_route_and_counts_nothing(client_without_metrics: httpx.AsyncClient) -> None:
    before = scraped()
    response = await client_without_metrics.get("/metrics")
    assert response.status_code == 404
    assert response.json() == (await client_without_metrics.get("/no-such-path")).json()
    conversation = (await new_conversation(client_without_metrics))["id"]
    appended = await client_without_metrics.post(f"/conversations/{conversation}/turns", json=turn_body())
    assert appended.status_code == 201
    after = scraped()
    for name, labels in [
        ("kraken_turns_written_total", {}),
        ("kraken_tool_calls_written_total", {}),
        ("kraken_http_requests_total", {"route": TURNS, "method": "POST", "status": "201"}),
        ("kraken_http_requests_total", {"route": "/metrics", "method": "GET", "status": "404"}),
        ("kraken_http_requests_total", {"route": "unmatched", "method": "GET", "status": "404"}),
    ]:
        assert metric(after, name, **labels) == metric(before, name, **labels), (name, labels)
