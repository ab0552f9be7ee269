"""GET /metrics: the service's Prometheus series (``backend.metrics``), for a scraper."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from backend import metrics
from backend.config import Settings

router = APIRouter(tags=["metrics"])


# Not in the OpenAPI document: it is for the operator's scraper, not the API's clients (docs/operations.md
# documents every series), and it exists only while KRAKEN_METRICS is on.
@router.get(metrics.METRICS_PATH, include_in_schema=False)
async def get_metrics(request: Request) -> Response:
    """Prometheus text format (OpenMetrics when the scraper asks for it); every worker's series."""
    settings: Settings = request.app.state.settings
    if not settings.metrics:
        raise StarletteHTTPException(404)  # answered as for any path the service does not serve
    metrics.refresh_pools()
    # Off the event loop: in multi-process mode this reads every worker's files.
    body, content_type = await run_in_threadpool(metrics.exposition, request.headers.get("accept", ""))
    return Response(body, media_type=content_type)
