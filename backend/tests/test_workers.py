"""`kraken-backend` with worker processes: the schema prepared once, requests served by every
worker, a dead worker replaced (during a database outage too), and SIGTERM draining requests in
flight (real processes)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from pathlib import Path

import httpx
import pytest
import uvicorn

from backend.db.engine import connect
from backend.db.url import DatabaseTarget, parse_database_url
from backend.serve import listening_socket
from backend.tests.helpers import (
    API_KEY,
    AUTH,
    CONVERSATION,
    SERVED,
    SERVED_REVISIONS,
    SERVICE,
    Service,
    child_env,
    fetch,
    free_port,
    service,
    turn_body,
    until_waiting_for_a_lock,
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


# What each kind of request answers from every worker: with the database down, and once it is back.
DOWN = {"health": 200, "ready": 503, "write": 503}
UP = {"health": 200, "ready": 200, "write": 201}


async def answers_by_worker(port: int, running: Service, batch: str) -> dict[tuple[int, str], set[int]]:
    """(pid, kind) -> the statuses it answered, for a burst of GET /health, GET /ready and
    POST /conversations (each on a new connection); the pid from the access log, the kind in the
    request id. Every answer's body is checked against its status."""
    sends = {
        "health": lambda client, rid: client.get("/health", headers={"X-Request-ID": rid}),
        "ready": lambda client, rid: client.get("/ready", headers={"X-Request-ID": rid}),
        "write": lambda client, rid: client.post(
            "/conversations", json=CONVERSATION, headers={**AUTH, "X-Request-ID": rid}
        ),
    }
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", limits=httpx.Limits(max_keepalive_connections=0), timeout=60
    ) as client:
        ids = [f"{batch}-{kind}-{n}" for n in range(8) for kind in sends]
        responses = await asyncio.gather(*(sends[rid.split("-")[1]](client, rid) for rid in ids))
    statuses = {}
    for rid, response in zip(ids, responses, strict=True):
        statuses[rid] = response.status_code
        body = response.json()
        if rid.split("-")[1] == "health":
            assert body["revision"] == SERVED  # the status the supervisor handed over
        elif response.status_code == 503:
            detail = body.get("reason") or body["detail"][0]["type"]
            assert detail in ("database unreachable", "database_unavailable"), body
    await asyncio.sleep(0.2)  # the access log line follows the response
    found: dict[tuple[int, str], set[int]] = {}
    for m in (ACCESS.match(line) for line in list(running.lines)):
        if m is not None and m["rid"] in statuses:
            found.setdefault((int(m["pid"]), m["rid"].split("-")[1]), set()).add(statuses[m["rid"]])
    return found


async def every_worker_answers(port: int, running: Service, workers: set[int], expected: dict[str, int]) -> None:
    """Until each worker has answered each kind of request, with its expected status only."""
    seen: dict[tuple[int, str], set[int]] = {}
    for _ in range(20):  # which worker accepts a connection is the kernel's choice
        for key, statuses in (await answers_by_worker(port, running, uuid.uuid4().hex)).items():
            seen.setdefault(key, set()).update(statuses)
        if set(seen) >= {(pid, kind) for pid in workers for kind in expected}:
            break
    assert seen == {(pid, kind): {status} for pid in workers for kind, status in expected.items()}, "\n".join(
        running.lines[-40:]
    )


async def test_the_schema_is_prepared_once_workers_outlive_an_outage_and_sigterm_drains() -> None:
    """Migrations run once, in the supervisor, which hands its workers the schema's status: a
    worker starts without the database, so one replaced during an outage answers 503 (and /ready
    503) like the others, the service keeps running, and every worker serves again once the
    database is back. Then SIGTERM drains a request in flight."""
    with running_cluster("workers") as cluster:
        port = free_port()
        # connect_timeout: an attempt that meets the server half-way through its shutdown would
        # otherwise wait asyncpg's default minute for an answer.
        target = parse_database_url(cluster.url(connect_timeout="2"))
        with service(workers_env(target, port)) as running:
            running.wait_for("Uvicorn running")
            # Listening from the moment it says so: a client that comes before the workers have
            # started waits in the backlog, and is answered (not refused).
            assert post(port, "/conversations", CONVERSATION)[0] == 201
            wait_for_workers(running, 2)
            parent = running.process.pid
            first = children(parent)
            assert len(first) == 2

            cluster.stop("immediate")
            victim = min(first)
            os.kill(victim, signal.SIGKILL)
            wait_for_workers(running, 3)  # its replacement has started, the database still down
            workers = children(parent)
            assert victim not in workers
            assert len(workers) == 2
            await every_worker_answers(port, running, workers, DOWN)
            cluster.start()
            await every_worker_answers(port, running, workers, UP)

            # SIGTERM with a request in flight (an append waiting for a row lock the test holds for
            # a second): new connections are refused at once, the request finishes, the service ends.
            results, refused_after, _, output, code, conversation = await _drain_with_an_append_in_flight(
                target, running, port, hold=1.0
            )
        [[total]] = await fetch(target, "SELECT total_turns FROM kraken_conversations WHERE id = $1", conversation)
        [[upgrades]] = await fetch(target, "SELECT count(*) FROM alembic_ledger WHERE direction = 'upgrade'")
    assert refused_after < 2
    [outcome] = results
    assert not isinstance(outcome, Exception), output
    status, turn = outcome
    assert status == 201, output
    assert turn["turn_number"] == 1
    assert code in (0, -signal.SIGTERM), output
    assert total == 1
    assert "Traceback" not in output
    assert "cannot start" not in output

    # Migrations ran once, in the supervisor, before any worker started.
    applied = [line for line in output.splitlines() if "applied revision 001" in line]
    assert len(applied) == 1
    assert f" {parent} " in applied[0]
    assert upgrades == len(SERVED_REVISIONS)  # the boot's phase: pre-deploy


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
        await until_waiting_for_a_lock(db)
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


def test_a_worker_that_cannot_start_stops_the_service_with_one_line(live_db: DatabaseTarget, tmp_path: Path) -> None:
    """A worker that cannot start would fail the same way in every replacement: it says why in one
    line, and the service stops with status 1 (systemd restarts it) rather than respawning it in a
    loop. Here the workers alone see a bad setting: a sitecustomize module, which every Python
    process on PYTHONPATH runs, sets one in multiprocessing's spawned children."""
    (tmp_path / "sitecustomize.py").write_text(
        "import os, sys\nif '--multiprocessing-fork' in sys.argv:\n    os.environ['KRAKEN_API_KEY'] = 'has spaces'\n"
    )
    env = workers_env(live_db, free_port(), PYTHONPATH=str(tmp_path))
    result = subprocess.run([SERVICE], env=env, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "cannot start: KRAKEN_API_KEY: " in output
    assert "has spaces" not in output
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


def test_the_running_line_comes_once_the_socket_listens() -> None:
    """A client that connects the moment it reads "Uvicorn running" is not refused."""
    port = free_port()
    config = uvicorn.Config("backend.main:app", host="127.0.0.1", port=port)
    connected: list[bool] = []

    class ConnectOnTheLine(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "Uvicorn running" in record.getMessage():
                with socket.create_connection(("127.0.0.1", port), timeout=2):
                    connected.append(True)

    logger, probe = logging.getLogger("uvicorn.error"), ConnectOnTheLine()
    logger.addHandler(probe)
    try:
        listening_socket(config).close()
    finally:
        logger.removeHandler(probe)
    assert connected == [True]
