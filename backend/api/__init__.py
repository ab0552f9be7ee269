"""HTTP routes, one module per resource, combined here."""

from fastapi import APIRouter

from backend.api import conversations, health, metrics, usage

api_router = APIRouter()
api_router.include_router(health.router)
api_router.include_router(conversations.router)
api_router.include_router(usage.router)
api_router.include_router(metrics.router)
