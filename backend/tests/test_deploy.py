"""The deploy: the systemd unit it restarts, and deploy/wait_ready.py, the bounded wait for /ready after it."""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from backend.config import PROJECT_ROOT, Settings
from backend.db.url import DatabaseTarget
from backend.tests.helpers import SERVICE, child_env, free_port, get_json, run_alembic, service

UNIT = PROJECT_ROOT / "deploy" / "kraken-backend.service"
WAIT_READY = PROJECT_ROOT / "deploy" / "wait_ready.py"
DEPLOY_WORKFLOW = PROJECT_ROOT / ".github" / "workflows" / "deploy.yml"


# --- the unit -----------------------------------------------------------------------------------


def unit_directives(text: str) -> dict[str, dict[str, list[str]]]:
    """section -> directive -> its values in order (systemd allows a directive more than once)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def shutdown_grace_default() -> float:
    # KRAKEN_SHUTDOWN_GRACE's default (20 s, the figure, until the setting is in this tree).
    field = Settings.model_fields.get("shutdown_grace")
    return float(field.default) if field is not None else 20.0


def test_unit_runs_the_console_script_from_its_checkout_with_the_env_file_and_a_graceful_stop() -> None:
    service_section = unit_directives(UNIT.read_text())["Service"]
    one = {key: values[-1] for key, values in service_section.items()}
    assert one["EnvironmentFile"] == "/etc/kraken-backend.env"
    # The console script pyproject declares, from the venv the deploy's `uv sync` makes in the checkout.
    scripts = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "kraken-backend" in scripts
    assert one["ExecStart"] == f"{one['WorkingDirectory']}/.venv/bin/kraken-backend"
    assert one["User"] not in ("", "root")
    assert (one["Restart"], one["RestartPreventExitStatus"]) == ("on-failure", "2")  # 2: a configuration mistake
    assert 1 <= float(one["RestartSec"]) <= 30
    # SIGTERM to the main process, which drains its workers; killed only well after the grace ends.
    assert (one["KillSignal"], one["KillMode"]) == ("SIGTERM", "mixed")
    assert shutdown_grace_default() + 5 <= float(one["TimeoutStopSec"]) <= shutdown_grace_default() + 30


def verify(unit_text: str, directory: Path) -> tuple[int, list[str]]:
    """`systemd-analyze verify` of the unit as it would be installed here: (status, its complaints about it)."""
    # The checkout and user of this machine, so that verify's check of the executable means something.
    text = unit_text.replace("/opt/kraken-backend/.venv/bin/kraken-backend", SERVICE)
    path = directory / "kraken-backend.service"
    path.write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--recursive-errors=no", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.returncode, [line for line in (result.stdout + result.stderr).splitlines() if path.name in line]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    assert verify(UNIT.read_text(), tmp_path) == (0, [])
    # The same check on a unit with a misspelt directive complains: it can fail.
    _, complaints = verify(UNIT.read_text().replace("\nRestart=", "\nRestrt="), tmp_path)
    assert any("Restrt" in line for line in complaints)


def test_deploy_waits_for_ready_after_the_restart() -> None:
    workflow = DEPLOY_WORKFLOW.read_text()
    restart = workflow.index('systemctl restart "$3"')
    ready = workflow.index("deploy/wait_ready.py --timeout 60", restart)
    # The post-deploy phase runs once the new release serves, and only then.
    assert workflow.index("alembic upgrade head") < restart
    assert ready < workflow.index("alembic -x phase=post-deploy upgrade head", ready)
    assert workflow.count("phase=post-deploy") == 1
    # The owner's MIGRATIONS_DATABASE_URL, from a file of its own, reaches both phases, never the unit.
    assert workflow.index(". /etc/kraken-migrations.env") < workflow.index("alembic upgrade head")
    assert "kraken-migrations.env" not in UNIT.read_text()


# --- wait_ready.py against servers that answer what we tell them ---------------------------------


def wait_ready(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], float]:
    """The script's result, and when it ended (time.monotonic()).

    A bound on how long it took is counted from its first attempt (the servers below note when
    that came), not from its start: Python's start alone takes seconds on a loaded machine."""
    result = subprocess.run(
        [sys.executable, str(WAIT_READY), *args], capture_output=True, text=True, timeout=120, env=env
    )
    return result, time.monotonic()


@contextmanager
def ready_server(statuses: Callable[[int], int]) -> Iterator[tuple[int, list[str], list[float]]]:
    """An HTTP server on a free port answering request n (from 0) with ``statuses(n)``; (port,
    paths asked, when each was asked)."""
    asked: list[str] = []
    asked_at: list[float] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked_at.append(time.monotonic())
            status = statuses(len(asked))
            asked.append(self.path)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], asked, asked_at
    finally:
        server.shutdown()
        server.server_close()


def test_waits_through_503s_until_ready() -> None:
    with ready_server(lambda n: 503 if n < 3 else 200) as (port, asked, _):
        result, _ = wait_ready("--url", f"http://127.0.0.1:{port}/ready", "--timeout", "30")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"ready: http://127.0.0.1:{port}/ready answered 200 after ")
    assert asked == ["/ready"] * 4


def test_asks_where_the_service_listens_by_default() -> None:
    with ready_server(lambda n: 200) as (port, asked, _):
        env = {**os.environ, "KRAKEN_HOST": "0.0.0.0", "KRAKEN_PORT": str(port)}
        result, _ = wait_ready("--timeout", "10", env=env)
    assert result.returncode == 0, result.stderr
    assert asked == ["/ready"]


def test_fails_in_one_line_when_ready_does_not_come_in_time() -> None:
    with ready_server(lambda n: 503) as (port, asked, asked_at):
        result, ended = wait_ready("--url", f"http://127.0.0.1:{port}/ready", "--timeout", "2")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"not ready: http://127.0.0.1:{port}/ready did not answer 200 within 2 s (last attempt: status 503)\n"
    )
    assert len(asked) >= 3  # it kept asking
    assert ended - asked_at[0] < 2 + 3  # bounded, from its first attempt


def test_fails_when_nothing_listens() -> None:
    port = free_port()
    result, _ = wait_ready("--url", f"http://127.0.0.1:{port}/ready", "--timeout", "1")
    assert result.returncode == 1
    assert result.stderr.startswith(f"not ready: http://127.0.0.1:{port}/ready did not answer 200 within 1 s")
    assert "Connection refused" in result.stderr
    assert result.stderr.count("\n") == 1


def test_a_server_that_never_answers_does_not_stretch_the_bound() -> None:
    accepted: list[tuple[socket.socket, float]] = []

    def accept(listener: socket.socket) -> None:
        while True:
            try:
                accepted.append((listener.accept()[0], time.monotonic()))
            except OSError:
                return  # the listener was closed

    with socket.socket() as listener:  # accepts connections, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        threading.Thread(target=accept, args=(listener,), daemon=True).start()
        result, ended = wait_ready("--url", f"http://127.0.0.1:{port}/ready", "--timeout", "2")
        listener.shutdown(socket.SHUT_RDWR)
    for connection, _ in accepted:
        connection.close()
    assert result.returncode == 1
    assert "timed out" in result.stderr
    assert ended - accepted[0][1] < 2 + 3  # bounded, from its first attempt


# --- against the real service ------------------------------------------------------------------


def test_waits_for_the_real_service_to_become_ready(empty_db: DatabaseTarget) -> None:
    port = free_port()
    env = child_env(empty_db, KRAKEN_PORT=str(port), KRAKEN_MIGRATE_ON_STARTUP="off")
    url = f"http://127.0.0.1:{port}/ready"
    with service(env):
        get_json(port, "/health", time.monotonic() + 60)  # up, on a database that was never migrated
        not_ready, _ = wait_ready("--url", url, "--timeout", "1")
        assert run_alembic("upgrade", "head", target=empty_db).returncode == 0
        ready, _ = wait_ready("--url", url, "--timeout", "30")
    assert (not_ready.returncode, not_ready.stderr) == (
        1,
        f"not ready: {url} did not answer 200 within 1 s (last attempt: status 503)\n",
    )
    assert ready.returncode == 0, ready.stderr
