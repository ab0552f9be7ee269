"""One logging configuration, whoever starts the service: ``kraken-backend`` or ``uvicorn backend.main:app``.

Every line goes through one handler on the root logger, uvicorn's own (its access log
included) too, as text or as JSON (``KRAKEN_LOG_FORMAT``), and carries the id of the request it
was written for (``X-Request-ID``), or ``-`` outside one.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Literal

LogFormat = Literal["text", "json"]

# The id of the request being handled (set by backend.api.middleware.RequestContext).
request_id: ContextVar[str] = ContextVar("request_id", default="-")

# With the process id: under `kraken-backend` several worker processes write to one stream.
TEXT_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s [%(request_id)s] %(message)s"
# uvicorn configures these itself (with handlers of their own) before it imports the app.
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


class RequestIdFilter(logging.Filter):
    """Stamps each record with the current request's id."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, pid, level, logger, request_id, message, and the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "pid": record.process,
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class _OurHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler this module installs, told apart from anyone else's."""


def configure_logging(log_format: LogFormat = "text") -> None:
    """Route every log line through one handler on stderr, in ``log_format``. Idempotent."""
    root = logging.getLogger()
    handler = _OurHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RequestIdFilter())
    for existing in [h for h in root.handlers if isinstance(h, _OurHandler)]:
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # backend.migrations.runner logs each applied revision once; alembic's own INFO lines would repeat it.
    logging.getLogger("alembic").setLevel(logging.WARNING)
