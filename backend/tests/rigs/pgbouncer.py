"""PgBouncer (the system's binary) in transaction pooling mode in front of a rig cluster."""

from __future__ import annotations

import functools
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from backend.tests.rigs.cluster import (
    SERVER_USER,
    Cluster,
    RigError,
    as_user,
    format_url,
    free_port,
    log_tail,
    rig_dir,
    server_env,
    wait_until,
)

# asyncpg's startup packet holds only user, database, client_encoding and its server_settings
# (application_name and the like), all of which PgBouncer tracks itself. This is for clients such
# as psycopg and JDBC; ignoring `options` or `statement_timeout` would drop them silently, so no.
IGNORE_STARTUP_PARAMETERS = ("extra_float_digits",)


def pgbouncer_bin() -> Path | None:
    """The pgbouncer binary (Debian puts it in /usr/sbin, off a normal user's PATH), or None."""
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/local/sbin")
    return Path(found) if found else None


@functools.cache
def pgbouncer_version(binary: Path | None = None) -> tuple[int, ...]:
    """Version of ``binary`` (default: ``pgbouncer_bin()``), e.g. ``(1, 18, 0)``."""
    binary = binary or pgbouncer_bin()
    if binary is None:
        raise RigError("pgbouncer is not installed")
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"PgBouncer (\d+(?:\.\d+)+)", out)
    if match is None:
        raise RigError(f"cannot read a version from {binary} --version: {out!r}")
    return tuple(int(part) for part in match.group(1).split("."))


@dataclass
class PgBouncer:
    """A running pgbouncer process and its files."""

    process: subprocess.Popen[bytes]
    port: int
    directory: Path
    config_path: Path
    log_path: Path
    version: tuple[int, ...]
    server: Cluster

    def url(self, user: str = "postgres", database: str = "postgres", **query: str | Path) -> str:
        """libpq URL of a database through this pgbouncer."""
        return format_url([("127.0.0.1", self.port)], user=user, database=database, query=query)

    def log(self) -> str:
        """The end of pgbouncer's log."""
        return log_tail(self.log_path)

    def stop(self, timeout: float = 10) -> None:
        """Stop pgbouncer (SIGTERM, then SIGKILL) and reap it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)


def pgbouncer_ini(
    server: Cluster,
    directory: Path,
    port: int,
    *,
    pool_mode: str,
    default_pool_size: int,
    max_client_conn: int,
    ignore_startup_parameters: Sequence[str],
    version: tuple[int, ...],
) -> str:
    """The configuration file's text."""
    settings = {
        "listen_addr": "127.0.0.1",
        "listen_port": str(port),
        "unix_socket_dir": str(directory),
        "pidfile": str(directory / "pgbouncer.pid"),
        "auth_type": "trust",
        "auth_file": str(directory / "userlist.txt"),
        "admin_users": "postgres",
        "pool_mode": pool_mode,
        "default_pool_size": str(default_pool_size),
        "max_client_conn": str(max_client_conn),
        "ignore_startup_parameters": ",".join(ignore_startup_parameters),
        # Only used in session mode, or in transaction mode with server_reset_query_always = 1.
        "server_reset_query": "DISCARD ALL",
    }
    if version >= (1, 21):
        # 1.21 added protocol-level prepared statement support; keep it off, as in older versions.
        settings["max_prepared_statements"] = "0"
    lines = ["[databases]", f"* = host=127.0.0.1 port={server.port}", "", "[pgbouncer]"]
    lines += [f"{k} = {v}" for k, v in settings.items()]
    return "\n".join(lines) + "\n"


@contextmanager
def pgbouncer(
    server: Cluster,
    *,
    users: Sequence[str] = ("postgres",),
    pool_mode: str = "transaction",
    default_pool_size: int = 20,
    max_client_conn: int = 200,
    ignore_startup_parameters: Sequence[str] = IGNORE_STARTUP_PARAMETERS,
    directory: Path | None = None,
    run_as: str | None = SERVER_USER,
    timeout: float = 15,
) -> Iterator[PgBouncer]:
    """A started pgbouncer on a free 127.0.0.1 port forwarding every database to ``server``
    (which must trust ``users`` on 127.0.0.1); stopped (temporary directory removed) on exit."""
    binary = pgbouncer_bin()
    if binary is None:
        raise RigError("pgbouncer is not installed (Debian/Ubuntu: apt-get install -y pgbouncer)")
    version = pgbouncer_version(binary)
    with rig_dir("kraken-pgbouncer-") if directory is None else nullcontext(directory) as base:
        port = free_port()
        config_path = base / "pgbouncer.ini"
        config_path.write_text(
            pgbouncer_ini(
                server,
                base,
                port,
                pool_mode=pool_mode,
                default_pool_size=default_pool_size,
                max_client_conn=max_client_conn,
                ignore_startup_parameters=ignore_startup_parameters,
                version=version,
            )
        )
        (base / "userlist.txt").write_text("".join(f'"{user}" ""\n' for user in users))
        # It logs to stderr: one file holds everything, including errors from before it is up.
        log_path = base / "pgbouncer.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                as_user([str(binary), str(config_path)], run_as),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=server_env(run_as),
                cwd=base,
            )
        bouncer = PgBouncer(
            process=process,
            port=port,
            directory=base,
            config_path=config_path,
            log_path=log_path,
            version=version,
            server=server,
        )
        try:

            def listening() -> bool:
                if process.poll() is not None:
                    raise RigError(f"pgbouncer exited with {process.returncode}:\n{bouncer.log()}")
                with socket.socket() as s:
                    return s.connect_ex(("127.0.0.1", port)) == 0

            try:
                wait_until(listening, timeout, f"pgbouncer to listen on 127.0.0.1:{port}")
            except RigError as e:
                raise RigError(f"{e}\n{bouncer.log()}") from None
            yield bouncer
        finally:
            bouncer.stop()
