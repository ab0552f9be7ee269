"""The migration commands (``alembic``, ``kraken-migrations``) run as processes of their own,
forked from one that has imported them once.

A test that runs ``python -m alembic`` pays for a new interpreter importing SQLAlchemy, Alembic,
asyncpg and the backend (about 1.5 s of CPU) before the command does anything; a suite runs a few
hundred of them. Forked from a process that has those imported, a command starts in milliseconds
and is still a process of its own, as the CLI is: its environment, working directory, output,
exit status, caches (``get_settings``, ``read_revisions``) and models are its own, and a test can
kill it on a timeout. What a fork does not give is a fresh interpreter's start (``sys.path`` from
the working directory, interpreter flags from the environment): the tests of that run the real
program (``helpers.run_alembic(..., fresh=True)``, test_cli.py).

The server side (``python -m backend.tests.preloaded``) reads one JSON request per line on stdin,
forks a child per request and answers on stdout with the child's pid, then its exit status. It is
single-threaded, with no event loop, so forking it is safe; it exits when stdin closes (its test
process has gone).
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PROGRAMS = ("alembic", "kraken-migrations")


# --- the forking server --------------------------------------------------------------------


def _preload() -> None:
    """Everything the commands import, so that no child imports it again."""
    import alembic.command  # noqa: F401
    import alembic.config  # noqa: F401
    import sqlalchemy.dialects.postgresql.asyncpg  # noqa: F401

    import backend.migrations.cli  # noqa: F401
    import backend.migrations.runner  # noqa: F401
    import backend.models  # noqa: F401


def _run_child(request: Mapping[str, Any]) -> int:
    """In the forked child: become the command's process, run it; its exit status."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        sink = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(sink, fd)
        os.close(sink)
    program, argv = request["program"], list(request["argv"])
    sys.argv = [program, *argv]
    code: object = 0
    try:
        if program == "alembic":
            from alembic.config import main as alembic_main

            alembic_main(argv=argv, prog="alembic")
        else:
            from backend.migrations.cli import main as kraken_main

            kraken_main(argv)
    except SystemExit as exc:
        code = exc.code
    except BaseException:
        traceback.print_exc()
        code = 1
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message"): printed, status 1, as Python does
        sys.stderr.write(f"{code}\n")
        code = 1
    try:
        atexit._run_exitfuncs()  # what the interpreter runs at exit (logging's flush among them)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return code & 0xFF


def serve() -> None:
    _preload()
    answers = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        answers.flush()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                status = _run_child(request)
            finally:
                os._exit(status)
        answers.write(json.dumps({"pid": pid}) + "\n")
        answers.flush()
        _, status = os.waitpid(pid, 0)
        answers.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        answers.flush()


# --- the test process's side ---------------------------------------------------------------


class _Server:
    """A forking server, started on first use; one command at a time."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._pending = b""  # what the server wrote past the last answer read

    def _started(self) -> subprocess.Popen[bytes]:
        if self._process is None or self._process.poll() is not None:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "backend.tests.preloaded"],
                cwd=Path(__file__).resolve().parents[2],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            self._pending = b""
        return self._process

    def _answer(self, timeout: float) -> dict[str, Any]:
        """The server's next answer, within ``timeout`` seconds (read unbuffered: a buffered
        reader could hold the next answer where the wait for it cannot see it)."""
        assert self._process is not None
        assert self._process.stdout is not None
        fd = self._process.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._pending:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise subprocess.TimeoutExpired("preloaded command", timeout)
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError("the preloaded command server exited")
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        answer: dict[str, Any] = json.loads(line)
        return answer

    def run(
        self, program: str, argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], timeout: float
    ) -> subprocess.CompletedProcess[str]:
        assert program in PROGRAMS, program
        with tempfile.TemporaryDirectory(prefix="kraken-cli-") as scratch:
            stdout, stderr = Path(scratch, "stdout"), Path(scratch, "stderr")
            stdout.touch()
            stderr.touch()
            process = self._started()
            assert process.stdin is not None
            request = {
                "program": program,
                "argv": list(argv),
                "cwd": str(cwd),
                "env": dict(env),
                "stdout": str(stdout),
                "stderr": str(stderr),
            }
            process.stdin.write(json.dumps(request).encode() + b"\n")
            process.stdin.flush()
            pid = int(self._answer(60)["pid"])
            try:
                returncode = int(self._answer(timeout)["returncode"])
            except subprocess.TimeoutExpired:
                os.kill(pid, signal.SIGKILL)
                self._answer(60)
                raise subprocess.TimeoutExpired([program, *argv], timeout) from None
            return subprocess.CompletedProcess(
                [program, *argv], returncode, stdout.read_text(errors="replace"), stderr.read_text(errors="replace")
            )

    def close(self) -> None:
        if self._process is not None:
            assert self._process.stdin is not None
            assert self._process.stdout is not None
            self._process.stdin.close()  # the server's loop ends: it exits
            self._process.wait(timeout=10)
            self._process.stdout.close()


# The servers not running a command: a test that runs commands side by side (threads) gets one
# server each.
_idle: list[_Server] = []
_all: list[_Server] = []
_idle_lock = threading.Lock()


def _close_all() -> None:
    for server in _all:
        server.close()


atexit.register(_close_all)


def run(
    program: str, argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``program argv`` in a process forked from a preloaded one, as ``subprocess.run`` with
    ``capture_output=True, text=True`` would give it."""
    with _idle_lock:
        if _idle:
            server = _idle.pop()
        else:
            server = _Server()
            _all.append(server)
    try:
        return server.run(program, argv, cwd=cwd, env=env, timeout=timeout)
    finally:
        with _idle_lock:
            _idle.append(server)


if __name__ == "__main__":
    serve()
