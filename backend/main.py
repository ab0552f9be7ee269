"""The FastAPI application (``uvicorn backend.main:app``; ``kraken-backend`` serves it: backend/serve.py)."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType

from fastapi import FastAPI
from starlette.middleware.gzip import GZipMiddleware
from uvicorn.config import STARTUP_FAILURE

from backend import database
from backend.api import ROUTERS
from backend.api.errors import install_error_handlers
from backend.api.middleware import GZIP_MINIMUM_BYTES, RequestContext
from backend.api.openapi import install_openapi, operation_id
from backend.config import ConfigError, Settings, check_serving, get_settings, resolve_target
from backend.database import STARTUP_ERRORS
from backend.db.leases import NotStarted
from backend.logs import configure_logging

logger = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings | None = getattr(app.state, "settings", None)
    try:
        if settings is None:
            # `uvicorn backend.main:app`: the logging is ours from here on, uvicorn's own lines too.
            settings = get_settings()
            configure_logging(settings.log_format)
        check_serving(settings)
        # `kraken-backend` prepares the schema before serving (to fail with one line) and hands
        # its status to its worker processes; other servers (`uvicorn backend.main:app`) prepare
        # it here.
        status = (
            getattr(app.state, "schema_status", None)
            or database.handed_schema_status()
            or await database.run_migrations(settings)
        )
        target = await resolve_target(settings)
    except STARTUP_ERRORS as exc:
        if multiprocessing.parent_process() is None:
            raise
        # A worker that cannot start for a reason its replacement would meet as well (a setting;
        # the database, under `uvicorn --workers N`, which does not hand the status over): one
        # line, and the exit status uvicorn's supervisor reads as "failed to start", which stops
        # the service (non-zero: systemd restarts it) rather than respawning workers in a loop;
        # a bug ends the same way, its traceback logged. Raised instead, this error would reach
        # the log as the traceback Starlette formats for a failed startup.
        logger.error("cannot start: %s", exc)
        os._exit(STARTUP_FAILURE)
    # The pool connects on first use, not here: a worker started while the database is down
    # serves 503 database_unavailable (and /ready 503) until it is back.
    lender = database.service_lender(await database.create_service_pool(target, settings), settings)
    app.state.fault_log.where = target.safe
    app.state.settings = settings
    app.state.schema_status = status
    app.state.pool = lender.pool
    app.state.lender = lender
    app.state.draining = False
    restore_sigterm = _drain_on_sigterm(app)
    try:
        yield
    finally:
        restore_sigterm()
        await database.close_service_pool(lender, settings)


def _drain_on_sigterm(app: FastAPI) -> Callable[[], None]:
    """On SIGTERM, /ready answers 503 from then on, before the server's own handler starts its
    graceful shutdown: it stops accepting, lets requests in flight finish (within
    KRAKEN_SHUTDOWN_GRACE under ``kraken-backend``, ``--timeout-graceful-shutdown`` under uvicorn),
    then the lifespan closes the pool."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signals reach the main thread only (a test's server in a thread)
    server_handler = signal.getsignal(signal.SIGTERM)

    def drain(signum: int, frame: FrameType | None) -> None:
        if not app.state.draining:
            app.state.draining = True
            # A fresh context: the handler runs inside whatever code the signal interrupted,
            # perhaps a request's, whose id this line is not about.
            contextvars.Context().run(logger.info, "SIGTERM: draining; /ready answers 503 until this process exits")
        if callable(server_handler):
            server_handler(signum, frame)

    signal.signal(signal.SIGTERM, drain)

    def restore() -> None:
        signal.signal(signal.SIGTERM, server_handler)

    return restore


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app; with ``settings`` (tests, the benchmark) instead of the environment's."""
    application = FastAPI(
        title="KRAKEN backend", version="0.1.0", lifespan=lifespan, generate_unique_id_function=operation_id
    )
    if settings is not None:
        application.state.settings = settings
    application.state.lender = NotStarted()  # the lifespan lends from the pool it creates
    application.state.draining = False  # set by SIGTERM (the lifespan installs the handler)
    install_error_handlers(application)
    # Level 6 (zlib's default): JSON compresses nearly as well as at 9 for much less CPU per response.
    application.add_middleware(GZipMiddleware, minimum_size=GZIP_MINIMUM_BYTES, compresslevel=6)
    application.add_middleware(RequestContext)  # outermost: its id is on every response and log line
    for router in ROUTERS:
        application.include_router(router)
    install_openapi(application)
    return application


app = create_app()

if multiprocessing.parent_process() is not None:
    # A worker process (of `kraken-backend`, or `uvicorn --workers N`): uvicorn imports the app
    # before it writes its first line ("Started server process"), so the logging is ours from
    # that line on. (A bad setting is left for the lifespan to report.)
    with contextlib.suppress(ConfigError):
        configure_logging(get_settings().log_format)
