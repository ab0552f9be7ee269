"""HTTP routes, one module per resource."""

from fastapi import APIRouter

from backend.api import conversations, feedback, health, metrics, usage, users

# Included into the app one by one, not through a router of routers: FastAPI matches a request
# level by level, and each level costs every request.
ROUTERS: tuple[APIRouter, ...] = (
    health.router,
    conversations.router,
    feedback.router,
    usage.router,
    users.router,
    metrics.router,
)
