"""The ``kraken-backend`` command: prepare the schema once, then serve from KRAKEN_WORKERS processes.

One process (``KRAKEN_WORKERS=1``) serves the app in itself. More: this process binds the
socket, prepares the schema, and supervises that many worker processes (uvicorn's supervisor:
a worker that dies is replaced), each importing ``backend.main:app`` and accepting on the
shared socket. Workers take the schema's status from this process (``hand_schema_to_workers``):
the migrations ran here, once, instead of N processes queueing on the migration lock, and a
worker starts without the database, so one replaced during an outage serves (503s) with the rest.

This module imports the app only once the environment is set for the workers: prometheus-client
decides at import whether its values live in memory or in ``PROMETHEUS_MULTIPROC_DIR``, where
the workers' series (and the migration facts recorded here) are summed for ``/metrics``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import uvicorn
import uvloop
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from backend.config import ConfigError, Settings, check_serving, get_settings
from backend.logs import configure_logging
from backend.metrics import MULTIPROC_DIR, mark_worker_dead

logger = logging.getLogger(__name__)

APP = "backend.main:app"


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
    sys.exit(serve(settings))


def serve(settings: Settings) -> int:
    """Prepare the schema, then serve until SIGTERM or SIGINT; the exit status."""
    own_metrics_dir = None
    if given := os.environ.get(MULTIPROC_DIR):
        # The client library's rule: the directory is emptied between runs, or the last run's
        # processes would still be counted (and their gauges summed as if alive).
        for stale in Path(given).glob("*.db"):
            stale.unlink()
    elif settings.workers > 1:
        own_metrics_dir = os.environ[MULTIPROC_DIR] = tempfile.mkdtemp(prefix="kraken-metrics-")
    try:
        return _serve(settings)
    finally:
        if own_metrics_dir is not None:
            shutil.rmtree(own_metrics_dir, ignore_errors=True)


def _serve(settings: Settings) -> int:
    # Imported here, after the environment is set (see the module's docstring).
    from backend.database import STARTUP_ERRORS, hand_schema_to_workers, run_migrations
    from backend.db.embedded import release_servers
    from backend.main import app

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            try:
                status = runner.run(run_migrations(settings))
            except STARTUP_ERRORS as exc:
                logger.error("cannot start: %s", exc)
                return 1
        if settings.workers == 1:
            app.state.settings = settings
            app.state.schema_status = status
            server = uvicorn.Server(uvicorn_config(app, settings))
            server.run()
            return 0 if server.started else 3
        # The workers read the settings from the environment, as this process did, and take the
        # schema's status from it too: they start without the database.
        hand_schema_to_workers(status)
        config = uvicorn_config(APP, settings, workers=settings.workers)
        supervisor = Supervisor(config, [listening_socket(config)])
        supervisor.run()
        if any(process.exitcode == STARTUP_FAILURE for process in supervisor.processes):
            return 1  # a worker could not start (it said why in one line): the supervisor stopped
        return 0
    finally:
        if settings.database_url is None:
            release_servers()


def uvicorn_config(app: Any, settings: Settings, **options: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_config=None,  # backend.logs configures logging, in every process
        timeout_graceful_shutdown=settings.shutdown_grace,
        # How long a worker may take to answer the supervisor's health check, and a new one
        # (SIGHUP's restart) to start: uvicorn's default of 5 s is short for a busy or loaded host.
        timeout_worker_healthcheck=60,
        **options,
    )


def listening_socket(config: uvicorn.Config) -> socket.socket:
    """The socket every worker accepts on, listening before any of them has started.

    uvicorn's supervisor only binds it (each worker starts listening when it is up): until then
    a client is refused, although the log says the server is running. Listening here, clients
    queue in the backlog instead, and are served as soon as a worker is. bind_socket() logs
    "Uvicorn running" before it returns: that line is held back until the socket listens (a
    client that read it and connected in between was refused, seen on a loaded machine).
    """
    held = _HeldBack()
    logger = logging.getLogger("uvicorn.error")
    logger.addFilter(held)
    try:
        sock = config.bind_socket()
        sock.listen(config.backlog)
    finally:  # a bind that fails logs why, then exits: that line goes out too
        logger.removeFilter(held)
        for record in held.records:
            logger.handle(record)
    return sock


class _HeldBack(logging.Filter):
    """Keeps the records it sees, for the caller to log later."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


class Supervisor(Multiprocess):
    """uvicorn's supervisor, which also stops listening the moment it is told to stop.

    Its copy of the socket would otherwise keep accepting connections into the backlog while the
    workers drain, and those clients would wait for nothing; closed, they are refused at once
    and try another instance.
    """

    def terminate_all(self) -> None:
        for sock in self.sockets:
            sock.close()
        super().terminate_all()

    # A worker that is gone (died and was replaced, or retired by SIGHUP's restart or SIGTTOU)
    # leaves the gauges summed over live workers (the pool's).

    def keep_subprocess_alive(self) -> None:
        before = self._pids()
        super().keep_subprocess_alive()
        self._forget(before - self._pids())

    def handle_signals(self) -> None:
        before = self._pids()
        super().handle_signals()
        self._forget(before - self._pids())

    def _pids(self) -> set[int]:
        return {process.pid for process in self.processes if process.pid is not None}

    @staticmethod
    def _forget(pids: set[int]) -> None:
        for pid in pids:
            mark_worker_dead(pid)
