"""One logging configuration for `kraken-backend` and `uvicorn backend.main:app`: every line in
the chosen format, uvicorn's access log included, each carrying its request's id."""

import json
import sys
import time
import urllib.request

import pytest

from backend.db.url import DatabaseTarget
from backend.tests.helpers import child_env, free_port, get_json, service

pytestmark = pytest.mark.slow


def request(port: int, path: str, request_id: str) -> None:
    get_json(port, path, time.monotonic() + 60)  # up
    with urllib.request.urlopen(
        urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"X-Request-ID": request_id})
    ):
        pass


def json_lines(output: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in output.splitlines()]


def test_kraken_backend_logs_every_line_as_json_with_request_ids(empty_db: DatabaseTarget) -> None:
    port = free_port()
    with service(child_env(empty_db, KRAKEN_PORT=str(port), KRAKEN_LOG_FORMAT="json")) as running:
        request(port, "/health", "probe-1")
        output = running.stop()
    lines = json_lines(output)  # every line parses: no second format
    assert {"time", "pid", "level", "logger", "request_id", "message"} <= set(lines[0])
    assert any(
        line["logger"] == "backend.migrations.runner" and "applied revision 001" in line["message"] for line in lines
    )
    [access] = [line for line in lines if line["logger"] == "uvicorn.access" and "probe-1" == line["request_id"]]
    assert '"GET /health HTTP/1.1" 200' in access["message"]
    assert [line for line in lines if line["logger"] != "uvicorn.access" and line["request_id"] != "-"] == []


def test_uvicorn_serving_the_app_logs_as_kraken_backend_does(empty_db: DatabaseTarget) -> None:
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "backend.main:app", "--port", str(port)]
    with service(child_env(empty_db), command) as running:
        request(port, "/health", "probe-2")
        output = running.stop()
    lines = output.splitlines()
    # What the app logs at start, lost before (no handler on the root logger), and the access log.
    applied = next(i for i, line in enumerate(lines) if "applied revision 001" in line)
    assert " INFO backend.migrations.runner [-] applied revision 001 " in lines[applied]
    assert any(" INFO uvicorn.access [probe-2] " in line and '"GET /health HTTP/1.1" 200' in line for line in lines)
    # From the app's start on, one format: uvicorn's own lines come through it too.
    assert all(" [" in line and "] " in line for line in lines[applied:]), "\n".join(lines[applied:])
