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

The server (``python -m backend.tests.preloaded``) reads one JSON request per line on stdin, forks
a child per request and answers on stdout with the child's pid, then, when it ends, its exit
status; children run side by side (several at once: the tests of concurrent runners). It is
single-threaded, with no event loop, so forking it is safe; when stdin closes (its test process
has gone) it kills what still runs and exits.
"""

from __future__ import annotations

import atexit
import builtins
import itertools
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Each program as a new interpreter starts it (``run(..., fresh=True)``); for "python -c", argv
# is the code, then its arguments (sys.argv[1:]).
PROGRAMS = {
    "alembic": [sys.executable, "-m", "alembic"],
    "kraken-migrations": [str(Path(sys.executable).parent / "kraken-migrations")],
    "python -c": [sys.executable, "-c"],
}


# --- the forking server --------------------------------------------------------------------


def _preload() -> None:
    """Everything the commands import, so that no child imports it again."""
    import alembic.command  # noqa: F401
    import alembic.config  # noqa: F401
    import sqlalchemy.dialects.postgresql.asyncpg  # noqa: F401

    import backend.migrations.cli  # noqa: F401
    import backend.migrations.runner  # noqa: F401
    import backend.models  # noqa: F401


def _command(program: str, argv: list[str]) -> None:
    if program == "alembic":
        from alembic.config import main as alembic_main

        sys.argv = ["alembic", *argv]
        alembic_main(argv=argv, prog="alembic")
    elif program == "kraken-migrations":
        from backend.migrations.cli import main as kraken_main

        sys.argv = ["kraken-migrations", *argv]
        kraken_main(argv)
    else:
        code, *arguments = argv
        sys.argv = ["-c", *arguments]
        exec(compile(code, "<string>", "exec"), {"__name__": "__main__", "__builtins__": builtins})


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
    code: object = 0
    try:
        _command(request["program"], list(request["argv"]))
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


def _answer(answer: Mapping[str, object]) -> None:
    os.write(1, json.dumps(answer).encode() + b"\n")  # a short line: one write, never interleaved


def serve() -> None:
    _preload()
    # SIGCHLD wakes the select below (a handler must be set for the wakeup fd to be written).
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.set_wakeup_fd(wake_w)
    running: set[int] = set()
    pending = b""
    while True:
        ready, _, _ = select.select([0, wake_r], [], [])
        if wake_r in ready:
            os.read(wake_r, 4096)
        if 0 in ready:
            chunk = os.read(0, 65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    status = 1
                    try:
                        signal.set_wakeup_fd(-1)
                        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                        os.close(wake_r)
                        os.close(wake_w)
                        status = _run_child(request)
                    finally:
                        os._exit(status)
                running.add(pid)
                _answer({"id": request["id"], "pid": pid})
        while running:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            running.discard(pid)
            _answer({"pid": pid, "returncode": os.waitstatus_to_exitcode(status)})
    for pid in running:  # the test process has gone: so do its commands
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


# --- the test process's side ---------------------------------------------------------------


class _Server:
    """The forking server, started on first use; its answers read by a thread of its own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # starting the server, writing a request
        self._answers = threading.Condition()
        self._process: subprocess.Popen[bytes] | None = None
        self._ids = itertools.count(1)
        self._pids: dict[int, int] = {}  # request id -> its child's pid
        self._exits: dict[int, int] = {}  # pid -> exit status
        self._gone = False

    def _started(self) -> subprocess.Popen[bytes]:
        if self._process is None or self._gone:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "backend.tests.preloaded"],
                cwd=Path(__file__).resolve().parents[2],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            self._gone = False
            threading.Thread(target=self._read, args=(self._process,), daemon=True).start()
        return self._process

    def _read(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        fd, buffer = process.stdout.fileno(), b""
        while chunk := os.read(fd, 65536):
            *lines, buffer = (buffer + chunk).split(b"\n")
            with self._answers:
                for line in lines:
                    answer = json.loads(line)
                    if "id" in answer:
                        self._pids[answer["id"]] = answer["pid"]
                    else:
                        self._exits[answer["pid"]] = answer["returncode"]
                self._answers.notify_all()
        with self._answers:
            self._gone = True
            self._answers.notify_all()

    def start(self, request: dict[str, object]) -> int:
        """The pid of the child running ``request``."""
        with self._lock:
            process = self._started()
            assert process.stdin is not None
            request_id = request["id"] = next(self._ids)
            process.stdin.write(json.dumps(request).encode() + b"\n")
            process.stdin.flush()
        with self._answers:
            if not self._answers.wait_for(lambda: request_id in self._pids or self._gone, 60):
                raise RuntimeError("the preloaded command server did not answer")
            if self._gone:
                raise RuntimeError("the preloaded command server exited")
            return self._pids.pop(request_id)

    def wait(self, pid: int, timeout: float) -> int | None:
        """``pid``'s exit status, or None if it still runs after ``timeout`` seconds."""
        with self._answers:
            self._answers.wait_for(lambda: pid in self._exits or self._gone, timeout)
            if pid in self._exits:
                return self._exits.pop(pid)
            if self._gone:
                raise RuntimeError("the preloaded command server exited")
            return None

    def close(self) -> None:
        if self._process is not None:
            assert self._process.stdin is not None
            assert self._process.stdout is not None
            self._process.stdin.close()  # the server's loop ends: it exits
            self._process.wait(timeout=10)
            self._process.stdout.close()


_server = _Server()
atexit.register(_server.close)


class Forked:
    """A command running in a process forked from the preloaded one (``start``)."""

    def __init__(self, program: str, argv: Sequence[str], *, cwd: Path, env: Mapping[str, str]) -> None:
        assert program in PROGRAMS, program
        self.args = [program, *argv]
        self._scratch = tempfile.TemporaryDirectory(prefix="kraken-cli-")
        self._stdout, self._stderr = Path(self._scratch.name, "stdout"), Path(self._scratch.name, "stderr")
        self._stdout.touch()
        self._stderr.touch()
        request: dict[str, object] = {
            "program": program,
            "argv": list(argv),
            "cwd": str(cwd),
            "env": dict(env),
            "stdout": str(self._stdout),
            "stderr": str(self._stderr),
        }
        self.pid = _server.start(request)

    def wait(self, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """What it printed and its exit status, as ``subprocess.run(..., capture_output=True,
        text=True)`` gives them; killed, and ``TimeoutExpired``, if it runs past ``timeout``."""
        try:
            returncode = _server.wait(self.pid, timeout)
            if returncode is None:
                os.kill(self.pid, signal.SIGKILL)
                _server.wait(self.pid, 60)
                raise subprocess.TimeoutExpired(self.args, timeout)
            return subprocess.CompletedProcess(
                self.args,
                returncode,
                self._stdout.read_text(errors="replace"),
                self._stderr.read_text(errors="replace"),
            )
        finally:
            self._scratch.cleanup()


def start(program: str, argv: Sequence[str], *, cwd: Path, env: Mapping[str, str]) -> Forked:
    """``program argv`` in a process forked from the preloaded one, running: ``wait()`` for it."""
    return Forked(program, argv, cwd=cwd, env=env)


def run(
    program: str,
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    timeout: float = 120,
    fresh: bool = False,
) -> subprocess.CompletedProcess[str]:
    """``program argv`` to its end, in a process forked from the preloaded one, or with ``fresh``
    as a new program (what a new interpreter's start decides: the tests of the CLI itself)."""
    if fresh:
        command = [*PROGRAMS[program], *argv]
        return subprocess.run(command, cwd=cwd, env=dict(env), capture_output=True, text=True, timeout=timeout)
    return start(program, argv, cwd=cwd, env=env).wait(timeout)


if __name__ == "__main__":
    serve()
