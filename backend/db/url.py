"""Turn a user-supplied DATABASE_URL into what SQLAlchemy's asyncpg dialect can connect with.

Pure functions, no I/O: the service, env.py and the tests share them, so a URL that works for
one works for all. Every error message names the problem without the password.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

ASYNC_DRIVER = "postgresql+asyncpg"
_ACCEPTED_SCHEMES = {"postgresql", "postgres", "postgresql+asyncpg"}
_SSLMODES = {"disable", "allow", "prefer", "require", "verify-ca", "verify-full"}
# Query options SQLAlchemy's asyncpg dialect passes straight to asyncpg.connect() or reads itself.
_PASSTHROUGH = {
    "host",
    "port",
    "prepared_statement_cache_size",
    "command_timeout",
}
# libpq options turned into asyncpg connect() arguments below.
_SSL_FILES = ("sslrootcert", "sslcert", "sslkey")
_TRANSLATED = {"sslmode", "connect_timeout", "application_name", *_SSL_FILES, "ssl", "timeout"}


class DatabaseUrlError(ValueError):
    """A DATABASE_URL that cannot be used; the message is one line and never holds the password."""


@dataclass(frozen=True)
class DatabaseTarget:
    """Where to connect: an asyncpg URL plus the connect() arguments a URL cannot carry."""

    url: URL
    connect_args: dict[str, Any] = field(default_factory=dict)

    @property
    def safe(self) -> str:
        """user@host:port/database, for logs and error messages: no password, not even masked."""
        return _where(self.url)

    @property
    def database(self) -> str:
        return self.url.database or ""

    def with_database(self, name: str) -> DatabaseTarget:
        return DatabaseTarget(self.url.set(database=name), dict(self.connect_args))

    def asyncpg_connect_kwargs(self) -> dict[str, Any]:
        """Arguments for a bare ``asyncpg.connect()``, bypassing SQLAlchemy (used on hot paths)."""
        url = self.url
        kwargs: dict[str, Any] = {
            "user": url.username,
            "password": url.password,
            "database": url.database,
        }
        query_host = url.query.get("host")
        if url.host:
            kwargs["host"] = url.host
        elif query_host:
            kwargs["host"] = query_host if isinstance(query_host, str) else list(query_host)
        if url.port:
            kwargs["port"] = url.port
        elif "port" in url.query:
            kwargs["port"] = int(str(url.query["port"]))
        kwargs.update(self.connect_args)
        return {k: v for k, v in kwargs.items() if v is not None}


def _where(url: URL) -> str:
    host = url.host or url.query.get("host") or ""
    if not isinstance(host, str):
        host = ",".join(host)
    port = f":{url.port}" if url.port else ""
    user = f"{url.username}@" if url.username else ""
    return f"{user}{host}{port}/{url.database or ''}"


def parse_database_url(raw: str, *, variable: str = "DATABASE_URL") -> DatabaseTarget:
    """Validate ``raw`` and rewrite it to ``postgresql+asyncpg://``.

    Accepts postgresql://, postgres:// and postgresql+asyncpg://. libpq query options that
    asyncpg does not take are translated (``sslmode`` -> ``ssl``, ``connect_timeout`` ->
    ``timeout``, ``application_name`` -> a server setting, ``sslrootcert``/``sslcert``/``sslkey``
    -> an SSL context); unknown options are refused rather than silently ignored.
    """
    text = raw.strip()
    if not text:
        raise DatabaseUrlError(f"{variable} is empty")
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if not scheme:
        raise DatabaseUrlError(f"{variable} is not a URL (expected postgresql://user:password@host:port/database)")
    if scheme not in _ACCEPTED_SCHEMES:
        raise DatabaseUrlError(
            f"{variable} uses unsupported scheme '{scheme}://'; use postgresql:// (PostgreSQL is the only "
            "supported database)"
        )
    try:
        url = make_url(text)
    except ArgumentError:
        raise DatabaseUrlError(f"{variable} could not be parsed as a URL") from None
    except ValueError:
        # make_url raises ValueError for a non-numeric port; its message would echo the URL.
        raise DatabaseUrlError(f"{variable} has a port that is not a number") from None
    if url.host and "@" in url.host:
        # The password held an unencoded '@': the rest of it would be taken for the host, and
        # printed as such in every error.
        raise DatabaseUrlError(f"{variable} could not be parsed: percent-encode '@' in the password as %40")
    if url.port is not None and not 0 < url.port < 65536:
        raise DatabaseUrlError(f"{variable} has port {url.port}, outside 1-65535")
    if not url.database:
        raise DatabaseUrlError(f"{variable} names no database ({_where(url)}): add /<database> after the host")
    if not url.host and "host" not in url.query:
        raise DatabaseUrlError(f"{variable} names no host ({_where(url)})")

    query = dict(url.query)
    unknown = sorted(set(query) - _PASSTHROUGH - _TRANSLATED)
    if unknown:
        raise DatabaseUrlError(
            f"{variable} has query option(s) {', '.join(unknown)} that asyncpg does not support ({_where(url)})"
        )
    connect_args = _translate_options(query, variable)
    kept = {k: v for k, v in query.items() if k in _PASSTHROUGH}
    if "port" in kept:
        try:
            int(str(kept["port"]))
        except ValueError:
            raise DatabaseUrlError(f"{variable} has a port that is not a number") from None
    return DatabaseTarget(url.set(drivername=ASYNC_DRIVER, query=kept), connect_args)


def _single(query: dict[str, Any], key: str, variable: str) -> str | None:
    value = query.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise DatabaseUrlError(f"{variable} repeats the query option {key}")
    return value


def _translate_options(query: dict[str, Any], variable: str) -> dict[str, Any]:
    connect_args: dict[str, Any] = {}
    sslmode = _single(query, "sslmode", variable) or _single(query, "ssl", variable)
    if sslmode is not None and sslmode not in _SSLMODES:
        raise DatabaseUrlError(f"{variable} has sslmode={sslmode}; expected one of {', '.join(sorted(_SSLMODES))}")
    files = {key: _single(query, key, variable) for key in _SSL_FILES}
    if any(files.values()):
        connect_args["ssl"] = _ssl_context(sslmode or "verify-full", files, variable)
    elif sslmode is not None:
        # asyncpg accepts libpq's sslmode names as the value of its ``ssl`` argument.
        connect_args["ssl"] = sslmode

    timeout = _single(query, "connect_timeout", variable) or _single(query, "timeout", variable)
    if timeout is not None:
        try:
            seconds = float(timeout)
        except ValueError:
            raise DatabaseUrlError(f"{variable} has connect_timeout={timeout}, not a number") from None
        if seconds <= 0:
            raise DatabaseUrlError(f"{variable} has connect_timeout={timeout}; it must be positive")
        connect_args["timeout"] = seconds

    application_name = _single(query, "application_name", variable)
    if application_name is not None:
        connect_args["server_settings"] = {"application_name": application_name}
    return connect_args


def _ssl_context(sslmode: str, files: dict[str, str | None], variable: str) -> ssl.SSLContext | str:
    if sslmode in {"disable", "allow", "prefer"}:
        return sslmode
    try:
        context = ssl.create_default_context(cafile=files["sslrootcert"])
        if files["sslcert"]:
            context.load_cert_chain(files["sslcert"], files["sslkey"])
    except (OSError, ssl.SSLError) as exc:
        raise DatabaseUrlError(f"{variable}: cannot load SSL files: {exc.strerror or exc}") from None
    if sslmode in {"require", "verify-ca"}:
        # libpq: 'require' with a root certificate behaves like 'verify-ca'; neither checks the host name.
        context.check_hostname = False
    return context
