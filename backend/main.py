"""The FastAPI application and the ``kraken-backend`` command that serves it."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.middleware.gzip import GZipMiddleware

from backend.api import api_router
from backend.api.errors import install_error_handlers
from backend.api.middleware import GZIP_MINIMUM_BYTES, BodySizeLimit, Cors, RequestContext
from backend.api.openapi import install_openapi, operation_id
from backend.config import ConfigError, Settings, check_serving, get_settings, resolve_target
from backend.db.embedded import release_servers
from backend.db.engine import create_engine, create_session_factory
from backend.db.url import DatabaseTarget
from backend.logs import configure_logging
from backend.migrations.revisions import SchemaStatus
from backend.migrations.runner import (
    DatabaseUnavailable,
    MigrationError,
    SchemaNotAtHead,
    check_schema,
    migrations_target,
    read_schema_status,
    run_migrations,
)

logger = logging.getLogger(__name__)

# What stops a boot without a traceback: each is reported as one line.
STARTUP_ERRORS = (ConfigError, DatabaseUnavailable, MigrationError, SchemaNotAtHead)


async def prepare_schema(settings: Settings) -> SchemaStatus:
    """Apply KRAKEN_MIGRATE_ON_STARTUP: upgrade to head, check that it is there, or only look."""
    if settings.migrate_on_startup == "upgrade":
        return await run_migrations(settings)
    if settings.migrate_on_startup == "check":
        return await check_schema(settings)
    return await read_schema_status(await migrations_target(settings), wait=settings.db_connect_timeout)


def create_service_engine(target: DatabaseTarget, settings: Settings) -> AsyncEngine:
    """The engine requests use, sized and configured by the settings."""
    return create_engine(
        target,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout,
        statement_cache=settings.db_statement_cache,
        statement_timeout=settings.db_statement_timeout or None,
    )


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings | None = getattr(app.state, "settings", None)
    if settings is None:
        # `uvicorn backend.main:app`: the logging is ours from here on, uvicorn's own lines too.
        settings = get_settings()
        configure_logging(settings.log_format)
    check_serving(settings)
    # `kraken-backend` prepares the schema before serving (to fail with one line); other servers
    # (`uvicorn backend.main:app`) get it done here.
    status = getattr(app.state, "schema_status", None) or await prepare_schema(settings)
    target = await resolve_target(settings)
    engine = create_service_engine(target, settings)
    app.state.fault_log.where = target.safe
    app.state.settings = settings
    app.state.schema_status = status
    app.state.engine = engine
    app.state.session_factory = create_session_factory(engine)
    try:
        yield
    finally:
        await engine.dispose()
        if settings.database_url is None:
            await asyncio.to_thread(release_servers)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app; with ``settings`` (tests, the benchmark) instead of the environment's."""
    application = FastAPI(
        title="KRAKEN backend", version="0.1.0", lifespan=lifespan, generate_unique_id_function=operation_id
    )
    if settings is not None:
        application.state.settings = settings
    install_error_handlers(application)
    application.add_middleware(BodySizeLimit)
    # Level 6 (zlib's default): JSON compresses nearly as well as at 9 for much less CPU per response.
    application.add_middleware(GZipMiddleware, minimum_size=GZIP_MINIMUM_BYTES, compresslevel=6)
    application.add_middleware(Cors)
    application.add_middleware(RequestContext)  # outermost: its id is on every response and log line
    application.include_router(api_router)
    install_openapi(application)
    return application


app = create_app()


async def _serve(settings: Settings) -> int:
    app.state.settings = settings
    try:
        app.state.schema_status = await prepare_schema(settings)
    except STARTUP_ERRORS as exc:
        logger.error("cannot start: %s", exc)
        return 1
    config = uvicorn.Config(app, host=settings.host, port=settings.port, lifespan="on", log_config=None)
    server = uvicorn.Server(config)
    await server.serve()
    return 0 if server.started else 3


def main() -> None:
    """Entry point of `uv run kraken-backend`."""
    configure_logging()  # text until the settings say otherwise; a bad setting is told in it
    try:
        settings = get_settings()
        check_serving(settings)
    except ConfigError as exc:
        logger.error("cannot start: %s", exc)
        sys.exit(2)
    configure_logging(settings.log_format)
    sys.exit(asyncio.run(_serve(settings)))
