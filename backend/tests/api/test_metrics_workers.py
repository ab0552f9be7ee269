"""/metrics with worker processes (PROMETHEUS_MULTIPROC_DIR): whichever worker is scraped answers
for all of them, and a worker marked dead leaves the pool gauges but not the counts."""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from backend.metrics import mark_worker_dead
from backend.tests.conftest import DatabaseFactory
from backend.tests.helpers import CONVERSATION, SERVED, child_env, free_port, metric, service

WORKERS = 2
CREATED = {"route": "/conversations", "method": "POST", "status": "201"}
SCRAPED = {"route": "/metrics", "method": "GET", "status": "200"}
T = TypeVar("T")


def per_worker(directory: Path, name: str, **labels: str) -> dict[int, float]:
    """pid -> that worker's own value of a sample, read from its files."""
    found: dict[int, float] = {}
    for path in directory.glob("*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        for family in MultiProcessCollector.merge([str(path)], accumulate=False):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    found[pid] = found.get(pid, 0.0) + sample.value
    return found


def create(port: int) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/conversations",
        data=json.dumps(CONVERSATION).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # a new connection each time
        return int(response.status)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def settled_pool(directory: Path) -> dict[int, float]:
    """pid -> idle pool connections of each worker, read once the pools are quiet.

    A worker updates its gauges a moment after a connection moves (its request's response may reach
    the client first), so a read right after the last response can catch one in between. Quiet:
    nothing in use in any worker, and two reads a little apart agree.
    """
    deadline = time.monotonic() + 30
    before: dict[int, float] | None = None
    while True:
        idle = per_worker(directory, "kraken_db_pool_connections_idle")
        in_use = per_worker(directory, "kraken_db_pool_connections_in_use")
        if idle == before and not any(in_use.values()):
            return idle
        assert time.monotonic() < deadline, (idle, in_use)
        before = idle
        time.sleep(0.2)


def until_every_worker(directory: Path, labels: dict[str, str], send: Callable[[], T]) -> list[T]:
    """Call ``send`` 8 at a time until every worker counted a request with ``labels``; the answers."""
    answers: list[T] = []
    deadline = time.monotonic() + 60
    with ThreadPoolExecutor(8) as pool:
        while len(per_worker(directory, "kraken_http_requests_total", **labels)) < WORKERS:
            assert time.monotonic() < deadline, per_worker(directory, "kraken_http_requests_total", **labels)
            answers += pool.map(lambda _: send(), range(8))
    return answers


@pytest.mark.slow
def test_every_worker_answers_for_all_of_them(database_factory: DatabaseFactory, tmp_path: Path) -> None:
    directory = tmp_path / "metrics"
    directory.mkdir()
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "backend.main:app", "--workers", str(WORKERS), "--port", str(port)]
    env = child_env(database_factory(), PROMETHEUS_MULTIPROC_DIR=str(directory))
    with service(env, command) as running:
        deadline = time.monotonic() + 120
        while sum("Application startup complete" in line for line in running.lines) < WORKERS:
            assert running.process.poll() is None, "\n".join(running.lines)
            assert time.monotonic() < deadline, "\n".join(running.lines)
            time.sleep(0.1)

        created = until_every_worker(directory, CREATED, lambda: create(port))
        assert set(created) == {201}
        idle = settled_pool(directory)
        assert len(idle) == WORKERS
        assert min(idle.values()) >= 1  # each opened its own pool

        scrapes = until_every_worker(directory, SCRAPED, lambda: scrape(port))
        for text in scrapes:  # from either worker: the sum over both
            assert metric(text, "kraken_http_requests_total", **CREATED) == len(created)
            assert metric(
                text, "kraken_http_request_duration_seconds_count", route="/conversations", method="POST"
            ) == len(created)
            assert metric(text, "kraken_db_pool_connections_idle") == sum(idle.values())
            assert metric(text, "kraken_db_pool_connections_in_use") == 0
            # Both workers prepared the schema; one applied every revision, the other found it at head.
            assert metric(text, "kraken_boot_revisions_applied") == int(SERVED)  # the pre-deploy phase
            assert metric(text, "kraken_schema_revision", revision=SERVED) == 1

        gone, staying = sorted(idle)
        mark_worker_dead(gone, str(directory))
        text = scrape(port)
        assert metric(text, "kraken_db_pool_connections_idle") == idle[staying]
        assert metric(text, "kraken_http_requests_total", **CREATED) == len(created)
