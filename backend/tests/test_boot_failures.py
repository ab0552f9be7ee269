"""`kraken-backend` and `alembic` as real processes when the database is missing or misconfigured."""

import contextlib
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from backend.db.url import DatabaseTarget
from backend.tests.helpers import SERVED, SERVICE, child_env, free_port, get_json, out, run_alembic, service

pytestmark = pytest.mark.slow

PASSWORD = "pw-Do-Not-Print-7"


class Proxy:
    """A TCP port that forwards to the test database once ``start()`` is called (until then: refused)."""

    def __init__(self, upstream: DatabaseTarget) -> None:
        host, port = upstream.hosts[0].name, upstream.hosts[0].port or 5432
        self.family = socket.AF_UNIX if host.startswith("/") else socket.AF_INET
        self.address: str | tuple[str, int] = f"{host}/.s.PGSQL.{port}" if host.startswith("/") else (host, port)
        self.port = free_port()
        self.listener: socket.socket | None = None
        self.sockets: list[socket.socket] = []

    def start(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        assert self.listener is not None
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                server = socket.socket(self.family)
                self.sockets += [client, server]
                server.connect(self.address)
                for a, b in ((client, server), (server, client)):
                    threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for sock in [*self.sockets, *([self.listener] if self.listener else [])]:
            sock.close()

    def url(self, db: DatabaseTarget) -> str:
        return f"postgresql://postgres:{PASSWORD}@127.0.0.1:{self.port}/{db.database}"


def test_serves_on_an_empty_database(empty_db: DatabaseTarget) -> None:
    port = free_port()
    env = child_env(empty_db, KRAKEN_PORT=str(port))
    with service(env) as running:
        health = get_json(port, "/health", time.monotonic() + 60)
        ready = get_json(port, "/ready", time.monotonic() + 10)
        output = running.stop()
    assert health == {"status": "ok", "revision": SERVED}
    assert ready["status"] == "ready"
    assert "applied revision 001" in output
    assert "Running upgrade" not in output  # alembic's own narration stays out of the service log
    assert f"Uvicorn running on http://127.0.0.1:{port}" in output


def test_boots_once_the_database_comes_up_within_the_window(empty_db: DatabaseTarget) -> None:
    proxy = Proxy(empty_db)
    port = free_port()
    env = child_env(None, DATABASE_URL=proxy.url(empty_db), KRAKEN_PORT=str(port), KRAKEN_DB_CONNECT_TIMEOUT="30")
    try:
        with service(env) as running:
            # The database is "down" (nothing listens on the proxy's port) for two attempts.
            running.wait_for("database not reachable (attempt 2)")
            proxy.start()
            health = get_json(port, "/health", time.monotonic() + 60)
            output = running.stop()
    finally:
        proxy.close()
    assert health == {"status": "ok", "revision": SERVED}
    attempts = [line for line in output.splitlines() if "database not reachable (attempt" in line]
    assert len(attempts) >= 2
    assert all(f"connection refused by postgres@127.0.0.1:{proxy.port}/" in line for line in attempts)
    assert PASSWORD not in output


def test_gives_up_with_one_line_when_the_database_stays_down(empty_db: DatabaseTarget) -> None:
    proxy = Proxy(empty_db)  # never started
    env = child_env(None, DATABASE_URL=proxy.url(empty_db), KRAKEN_DB_CONNECT_TIMEOUT="2")
    # Bounded: run's timeout is the safety net; how long it waited is the service's own "(waited 2 s)"
    # below (a clock around the process would count Python's start, seconds on a loaded machine).
    result = subprocess.run([SERVICE], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    output = out(result)
    errors = [line for line in output.splitlines() if " ERROR " in line]
    assert len(errors) == 1
    assert "cannot start: connection refused by postgres@127.0.0.1" in errors[0]
    assert "(waited 2 s)" in errors[0]
    assert "Traceback" not in output
    assert PASSWORD not in output


def test_a_host_that_does_not_resolve_is_retried_until_the_timeout_and_named() -> None:
    # Under docker compose or Kubernetes the database's name resolves only once its container or
    # service exists: like a refused connection, worth waiting for. ".invalid" never resolves.
    url = f"postgresql://postgres:{PASSWORD}@no-such-host.invalid:5432/kraken"
    env = child_env(None, DATABASE_URL=url, KRAKEN_DB_CONNECT_TIMEOUT="2")
    started = time.monotonic()
    result = subprocess.run([SERVICE], env=env, capture_output=True, text=True, timeout=60)
    waited = time.monotonic() - started
    output = out(result)
    where = "postgres@no-such-host.invalid:5432/kraken"
    attempts = [line for line in output.splitlines() if "database not reachable (attempt" in line]
    assert len(attempts) >= 2, output
    assert all(f"cannot resolve the database host no-such-host.invalid ({where})" in line for line in attempts)
    errors = [line for line in output.splitlines() if " ERROR " in line]
    assert len(errors) == 1, output
    assert f"cannot start: cannot resolve the database host no-such-host.invalid ({where}) (waited 2 s)" in errors[0]
    assert waited >= 2  # it gave up no earlier than KRAKEN_DB_CONNECT_TIMEOUT
    assert result.returncode == 1
    assert "Traceback" not in output
    assert PASSWORD not in output


def bad_urls(db: DatabaseTarget) -> list[tuple[str, str]]:
    host = db.hosts[0]
    where = f"@/{{}}?host={host.name}" if host.is_socket else f"@{host.name}:{host.port or 5432}/{{}}"
    return [
        (f"mysql://root:{PASSWORD}@localhost/kraken", "unsupported scheme 'mysql://'"),
        (f"postgresql://postgres:{PASSWORD}@localhost:port/kraken", "port that is not a number"),
        (f"postgresql://postgres:{PASSWORD}@localhost:0/kraken", "port 0, outside 1-65535"),
        (f"postgresql://postgres:{PASSWORD}" + where.format("no_such_database_kraken"), "does not exist"),
        (f"postgresql://no_such_role:{PASSWORD}" + where.format(db.database), 'role "no_such_role" does not exist'),
        (f"postgresql://postgres:{PASSWORD}@127.0.0.1:{free_port()}/kraken", "connection refused"),
        (f"postgresql://postgres:{PASSWORD}@db.invalid/kraken", "cannot resolve the database host"),
    ]


@pytest.mark.parametrize("case", range(7))
def test_configuration_errors_give_one_line_and_no_password(case: int, empty_db: DatabaseTarget) -> None:
    url, fragment = bad_urls(empty_db)[case]
    env = child_env(None, DATABASE_URL=url, KRAKEN_DB_CONNECT_TIMEOUT="0")

    served = subprocess.run([SERVICE], env=env, capture_output=True, text=True, timeout=60)
    migrated = run_alembic("upgrade", "head", target=None, DATABASE_URL=url)

    for result in (served, migrated):
        output = out(result).strip()
        assert result.returncode != 0
        assert len(output.splitlines()) == 1, output
        assert fragment in output
        assert "Traceback" not in output
        assert PASSWORD not in output


def test_without_database_url_it_serves_from_the_embedded_server_and_says_where(tmp_path: Path) -> None:
    pgdata = tmp_path / "pgdata"
    port = free_port()
    with service(child_env(None, KRAKEN_PORT=str(port), KRAKEN_EMBEDDED_PGDATA=str(pgdata))) as running:
        health = get_json(port, "/health", time.monotonic() + 120)
        output = running.stop()
    assert health["status"] == "ok"
    assert f"DATABASE_URL is not set: using embedded PostgreSQL with data in {pgdata}" in output
    assert (pgdata / "PG_VERSION").exists()
    # The service let go of the server it started: no postgres is left running on that directory.
    assert not (pgdata / "postmaster.pid").exists()
