"""What the metrics cost a request: GET /health through the whole ASGI app, KRAKEN_METRICS off and on.

    uv run python bench/metrics_overhead.py

No database and no server: the app is called directly (no HTTP parsing, no socket), so the
difference between the rows is the instrumentation alone. Prints microseconds per request (median
of 9 rounds of 5,000, interleaved) with metrics off, on with values in memory, and on with values in files
(PROMETHEUS_MULTIPROC_DIR, as with worker processes; measured in a child process, since
prometheus_client chooses its storage when first imported), and the cost of one pool-gauge update
(each request's checkout and checkin schedule one each).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from backend import metrics
from backend.config import Settings
from backend.main import create_app
from backend.migrations.revisions import SchemaStatus, read_revisions

ROUNDS = 9
REQUESTS = 5_000


async def per_request() -> tuple[float, float]:
    """Median microseconds per GET /health through the app, with metrics off and on (rounds
    interleaved, so that a busy moment of the machine weighs on both)."""
    apps = [create_app(Settings(metrics=enabled)) for enabled in (False, True)]
    for app in apps:
        app.state.schema_status = SchemaStatus((), read_revisions())
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/health",
        "raw_path": b"/health",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"bench")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8000),
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        pass

    rounds: tuple[list[float], list[float]] = ([], [])
    for _ in range(ROUNDS + 1):  # the first warms up
        for app, times in zip(apps, rounds, strict=True):
            started = time.perf_counter()
            for _ in range(REQUESTS):
                await app(dict(scope), receive, send)
            times.append((time.perf_counter() - started) / REQUESTS * 1e6)
    off, on = (statistics.median(times[1:]) for times in rounds)
    return off, on


def pool_update() -> float:
    """Microseconds per pool-gauge update (three gauges set)."""
    watch = metrics.PoolWatch()
    watch.refresh()
    started = time.perf_counter()
    for _ in range(REQUESTS):
        watch.refresh()
    return (time.perf_counter() - started) / REQUESTS * 1e6


def measure(label: str) -> None:
    off, on = asyncio.run(per_request())
    print(f"{label:34} off {off:7.1f} µs   on {on:7.1f} µs   (+{on - off:5.1f} µs per request)", flush=True)
    print(f"{'':34} pool gauges update {pool_update():5.1f} µs", flush=True)


def main() -> None:
    if len(sys.argv) > 1:  # the child: values in files
        measure(sys.argv[1])
        return
    print(f"GET /health through the app, median of {ROUNDS} rounds of {REQUESTS}", flush=True)
    measure("values in memory")
    with tempfile.TemporaryDirectory() as directory:
        env = {**os.environ, metrics.MULTIPROC_DIR: directory}
        subprocess.run([sys.executable, __file__, "values in files (worker processes)"], env=env, check=True)


if __name__ == "__main__":
    main()
