"""`kraken-backend` with worker processes: the schema prepared once, requests served by every
worker, a dead worker replaced, and SIGTERM draining requests in flight (real processes)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import httpx
import pytest

from backend.db.engine import connect
from backend.db.url import DatabaseTarget, parse_database_url
from backend.migrations.revisions import read_revisions
from backend.tests.helpers import (
    API_KEY,
    AUTH,
    CONVERSATION,
    SERVICE,
    Service,
    child_env,
    fetch,
    free_port,
    service,
    turn_body,
)
from backend.tests.rigs.cluster import running_cluster

pytestmark = pytest.mark.slow

STARTED = "Application startup complete."
# A text log line: time, pid, level, logger, [request id], message.
ACCESS = re.compile(r"^\S+ \S+ (?P<pid>\d+) INFO uvicorn\.access \[(?P<rid>[^\]]+)\] ")


def workers_env(db: DatabaseTarget, port: int, **extra: str) -> dict[str, str]:
    return child_env(db, KRAKEN_PORT=str(port), KRAKEN_API_KEY=API_KEY, KRAKEN_WORKERS="2", **extra)


def wait_for_workers(running: Service, count: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while sum(STARTED in line for line in running.lines) < count:
        assert running.process.poll() is None, "\n".join(running.lines)
        assert time.monotonic() < deadline, "\n".join(running.lines)
        time.sleep(0.05)


def children(pid: int) -> set[int]:
    """The worker processes of the supervisor ``pid`` (multiprocessing's resource tracker left out)."""
    found = set()
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        command = Path(f"/proc/{child}/cmdline").read_bytes()
        if b"spawn_main" in command:
            found.add(int(child))
    return found


def post(port: int, path: str, body: Mapping[str, object], timeout: float = 60) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={**AUTH, "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


async def serving_pids(port: int, running: Service, batch: str) -> set[int]:
    """The pids that served a burst of concurrent requests, each on a new connection, from the access log."""
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", limits=httpx.Limits(max_keepalive_connections=0)
    ) as client:
        ids = [f"{batch}-{n}" for n in range(32)]
        responses = await asyncio.gather(*(client.get("/health", headers={"X-Request-ID": rid}) for rid in ids))
    assert {r.status_code for r in responses} == {200}
    await asyncio.sleep(0.2)  # the access log line follows the response
    matches = [ACCESS.match(line) for line in list(running.lines)]
    return {int(m["pid"]) for m in matches if m is not None and m["rid"].startswith(f"{batch}-")}


async def test_the_schema_is_prepared_once_every_worker_serves_a_dead_one_is_replaced_and_sigterm_drains(
    empty_db: DatabaseTarget,
) -> None:
    port = free_port()
    with service(workers_env(empty_db, port)) as running:
        running.wait_for("Uvicorn running")
        # Listening from the moment it says so: a client that comes before the workers have
        # started waits in the backlog, and is answered (not refused).
        assert post(port, "/conversations", CONVERSATION)[0] == 201
        wait_for_workers(running, 2)
        parent = running.process.pid
        workers = children(parent)
        assert len(workers) == 2

        seen: set[int] = set()
        for attempt in range(20):  # which worker accepts a connection is the kernel's choice
            seen |= await serving_pids(port, running, f"burst{attempt}")
            if seen == workers:
                break
        assert seen == workers

        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 90
        while not (len(children(parent)) == 2 and victim not in children(parent)):
            assert time.monotonic() < deadline, "\n".join(running.lines)
            time.sleep(0.1)
        wait_for_workers(running, 3)

        # SIGTERM with a request in flight (an append waiting for a row lock the test holds for
        # a second): new connections are refused at once, the request finishes, the service ends.
        results, refused_after, _, output, code, conversation = await _drain_with_an_append_in_flight(
            empty_db, running, port, hold=1.0
        )
    assert refused_after < 2
    [outcome] = results
    assert not isinstance(outcome, Exception), output
    status, turn = outcome
    assert status == 201, output
    assert turn["turn_number"] == 1
    assert code in (0, -signal.SIGTERM), output
    [[total]] = await fetch(empty_db, "SELECT total_turns FROM kraken_conversations WHERE id = $1", conversation)
    assert total == 1
    assert "Traceback" not in output

    # Migrations ran once, in the supervisor, before any worker started.
    applied = [line for line in output.splitlines() if "applied revision 001" in line]
    assert len(applied) == 1
    assert f" {parent} " in applied[0]
    [[upgrades]] = await fetch(empty_db, "SELECT count(*) FROM alembic_ledger WHERE direction = 'upgrade'")
    assert upgrades == len(read_revisions().graph)


# What a client got: a status and body, or the error of a connection cut off.
Outcome = tuple[int, dict[str, object]] | Exception


def _append_in_thread(port: int, conversation: str, results: list[Outcome]) -> threading.Thread:
    def run() -> None:
        try:
            results.append(post(port, f"/conversations/{conversation}/turns", turn_body()))
        except Exception as exc:  # the connection cut off: what the test looks at
            results.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


async def _until_an_append_waits_for_the_lock(db: DatabaseTarget) -> None:
    query = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    deadline = time.monotonic() + 30
    while not (await fetch(db, query))[0][0]:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def _drain_with_an_append_in_flight(
    db: DatabaseTarget, running: Service, port: int, hold: float
) -> tuple[list[Outcome], float, float, str, int, str]:
    """SIGTERM to a running `kraken-backend` while an append waits ``hold`` seconds for a row lock;
    (results, seconds until new connections were refused, seconds until exit, output, exit code,
    conversation id)."""
    status, conversation = post(port, "/conversations", CONVERSATION)
    assert status == 201
    conversation_id = str(conversation["id"])
    blocker = await connect(db)
    results: list[Outcome] = []
    try:
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute("SELECT 1 FROM kraken_conversations WHERE id = $1 FOR UPDATE", conversation["id"])
        thread = _append_in_thread(port, conversation_id, results)
        await _until_an_append_waits_for_the_lock(db)
        signalled = time.monotonic()
        running.process.send_signal(signal.SIGTERM)
        while not refused(port):
            assert time.monotonic() - signalled < 10, "still accepting connections after SIGTERM"
            await asyncio.sleep(0.05)
        refused_after = time.monotonic() - signalled
        exited_after = float("inf")
        while time.monotonic() - signalled < hold:  # the lock held: does the service wait, or go?
            if exited_after == float("inf") and running.process.poll() is not None:
                exited_after = time.monotonic() - signalled
            await asyncio.sleep(0.05)
        await transaction.rollback()
    finally:
        await blocker.close()
    await asyncio.to_thread(thread.join, 60)
    code = await asyncio.to_thread(running.process.wait, 60)
    exited_after = min(exited_after, time.monotonic() - signalled)
    output = running.stop()
    return results, refused_after, exited_after, output, code, conversation_id


async def test_a_request_past_the_shutdown_grace_is_cut_off_and_stores_nothing(live_db: DatabaseTarget) -> None:
    port = free_port()
    with service(workers_env(live_db, port, KRAKEN_SHUTDOWN_GRACE="1")) as running:
        wait_for_workers(running, 2)
        results, _, exited_after, output, code, conversation = await _drain_with_an_append_in_flight(
            live_db, running, port, hold=6.0
        )
    # Gone within the grace (plus the time to stop), while the lock was still held.
    assert exited_after < 5.0, output
    [outcome] = results
    assert not isinstance(outcome, Exception), output
    status, body = outcome
    assert status == 503, output
    assert body["detail"][0]["type"] == "shutting_down"  # type: ignore[index]
    assert "Traceback" not in output
    [[total, turns]] = await fetch(
        live_db,
        "SELECT total_turns, (SELECT count(*) FROM kraken_turns WHERE conversation_id = c.id)"
        " FROM kraken_conversations c WHERE id = $1",
        conversation,
    )
    assert (total, turns) == (0, 0)


async def test_ready_answers_503_from_sigterm_on_while_other_requests_are_served(
    live_client: httpx.AsyncClient,
) -> None:
    assert (await live_client.get("/ready")).status_code == 200
    # The lifespan chains its handler before the server's (none here: pytest keeps the default,
    # which the handler does not call), so this is the real signal, delivered to this process.
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.sleep(0)
    draining = await live_client.get("/ready")
    assert draining.status_code == 503
    assert draining.json()["reason"] == "shutting down"
    assert (await live_client.get("/health")).status_code == 200
    assert (await live_client.post("/conversations", json=CONVERSATION)).status_code == 201


def test_a_worker_that_cannot_reach_the_database_stops_the_service_with_one_line() -> None:
    """The database goes away between the supervisor's migrations and the workers' start: each
    worker says why in one line, and the service stops with a failure status (systemd restarts
    it), not with 0 (which it would not), nor with a traceback."""
    with running_cluster("workers") as cluster:
        port = free_port()
        # connect_timeout: an attempt that meets the server half-way through its shutdown would
        # otherwise wait asyncpg's default minute for an answer.
        target = parse_database_url(cluster.url(connect_timeout="2"))
        env = child_env(target, KRAKEN_PORT=str(port), KRAKEN_WORKERS="2", KRAKEN_DB_CONNECT_TIMEOUT="1")
        with service(env) as running:
            running.wait_for("schema at revision")  # the supervisor's migrations are done
            cluster.stop("immediate")
            code = running.process.wait(timeout=90)
            output = running.stop()
    assert code == 1, output
    assert "cannot start: " in output
    assert "Traceback" not in output


def test_an_operators_metrics_directory_is_emptied_at_start(tmp_path: Path) -> None:
    """prometheus-client's rule for PROMETHEUS_MULTIPROC_DIR: emptied between runs, or the last
    run's processes are still counted (and their pool gauges summed as if alive)."""
    stale = tmp_path / "counter_4242.db"
    stale.write_bytes(b"from the last run")
    kept = tmp_path / "README"
    kept.write_text("not ours")
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/kraken"
    env = child_env(None, DATABASE_URL=nowhere, KRAKEN_DB_CONNECT_TIMEOUT="0", PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    result = subprocess.run([SERVICE], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr  # the database is not there: it stops, having emptied it first
    assert not stale.exists()
    assert kept.exists()
