"""DATABASE_URL, read with libpq's rules and checked before anything connects.

A ``DatabaseTarget`` is what every connection of this service is made from: the engines and
the bare asyncpg connections alike (``backend.db.engine.connect``). Connecting is asyncpg's
own DSN handling, which implements libpq's: host lists, ``target_session_attrs``, the six
``sslmode`` values and the certificate files, ``passfile`` and ``PGPASSFILE``. What stays ours:
only options asyncpg implements are accepted (asyncpg would send any other as a server setting,
and the server would refuse it at the first connection), each is checked here so a mistake is
one line at start-up, and messages name ``user@host:port/database`` for every host, never the
password.

Pure functions, no I/O beyond checking that named certificate files can be read.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from urllib.parse import parse_qsl, quote, unquote, urlsplit

ACCEPTED_SCHEMES = ("postgresql", "postgres", "postgresql+asyncpg")
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
TARGET_SESSION_ATTRS = ("any", "primary", "standby", "prefer-standby", "read-write", "read-only")
# libpq options that asyncpg's DSN parser implements with libpq's meaning; passed to it as given.
PASSED_TO_ASYNCPG = (
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslcrl",
    "sslpassword",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "passfile",
    "target_session_attrs",
)
_FILES = ("sslrootcert", "sslcert", "sslkey", "sslcrl", "passfile")
_TLS_VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
# Taken by this module: connect_timeout becomes asyncpg's connect timeout, application_name a
# server setting (asyncpg would take it as one too, but ours must not override the URL's).
# host, port, dbname, user and password are libpq's other spellings of the URL's own parts.
_OURS = ("connect_timeout", "application_name", "host", "port", "dbname", "user", "password")
_ALIASES = {"ssl": "sslmode", "timeout": "connect_timeout"}  # asyncpg's names, accepted too


class DatabaseUrlError(ValueError):
    """A DATABASE_URL that cannot be used; the message is one line and never holds the password."""


@dataclass(frozen=True)
class Host:
    """A TCP host name or address (port None: libpq's default, 5432), or a Unix socket directory."""

    name: str
    port: int | None = None

    @property
    def is_socket(self) -> bool:
        return self.name.startswith("/")

    def __str__(self) -> str:
        name = f"[{self.name}]" if ":" in self.name else self.name
        return f"{name}:{self.port}" if self.port else name


@dataclass(frozen=True)
class DatabaseTarget:
    """Where and how to connect: hosts in order, the database, the role, and libpq options."""

    hosts: tuple[Host, ...]
    database: str
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    # (name, value) of the PASSED_TO_ASYNCPG options the URL gave.
    options: tuple[tuple[str, str], ...] = ()
    connect_timeout: float | None = None
    application_name: str | None = None

    @property
    def safe(self) -> str:
        """user@host:port,host:port/database, for logs and error messages: no password, not even masked."""
        user = f"{self.user}@" if self.user else ""
        return f"{user}{','.join(str(host) for host in self.hosts)}/{self.database}"

    def option(self, name: str) -> str | None:
        return dict(self.options).get(name)

    def with_database(self, name: str) -> DatabaseTarget:
        return replace(self, database=name)

    def with_options(self, **values: str) -> DatabaseTarget:
        """The same target with libpq options set (``target_session_attrs="read-write"``)."""
        return replace(self, options=tuple({**dict(self.options), **values}.items()))

    @property
    def dsn(self) -> str:
        """The libpq URL of this target, password included: for asyncpg and for child processes."""
        return self._url(own=True)

    def asyncpg_dsn(self) -> str:
        """The URL for ``asyncpg.connect()``: without the options this module turns into arguments."""
        return self._url(own=False)

    def _url(self, *, own: bool) -> str:
        userinfo = ""
        if self.user:
            userinfo = quote(self.user, safe="")
            if self.password is not None:
                userinfo += ":" + quote(self.password, safe="")
            userinfo += "@"
        query = list(self.options)
        if any(host.is_socket for host in self.hosts):
            # A socket directory cannot stand in the authority: libpq's host=/port= lists instead.
            netloc = userinfo
            query[:0] = [("host", ",".join(h.name for h in self.hosts))]
            if any(h.port for h in self.hosts):
                query[1:1] = [("port", ",".join(str(h.port or 5432) for h in self.hosts))]
        else:
            netloc = userinfo + ",".join(str(host) for host in self.hosts)
        if own:
            if self.connect_timeout is not None:
                query.append(("connect_timeout", f"{self.connect_timeout:g}"))
            if self.application_name is not None:
                query.append(("application_name", self.application_name))
        encoded = "&".join(f"{quote(k, safe='')}={quote(v, safe='/,')}" for k, v in query)
        return f"postgresql://{netloc}/{quote(self.database, safe='')}" + (f"?{encoded}" if encoded else "")


_HOSTSPEC = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<name>[^:\[\]]*))(?::(?P<port>[^:]*))?$")


def _port(value: str, variable: str) -> int | None:
    if value == "":
        return None
    if not value.isdigit():
        raise DatabaseUrlError(f"{variable} has a port that is not a number")
    port = int(value)
    if not 0 < port < 65536:
        raise DatabaseUrlError(f"{variable} has port {port}, outside 1-65535")
    return port


def _host(spec: str, variable: str) -> Host:
    """One entry of a host list: ``name[:port]``, ``[v6 address][:port]``, a bare v6 address, or
    a socket directory."""
    spec = unquote(spec)
    if spec.startswith("/") or spec.count(":") > 1 and not spec.startswith("["):
        return Host(spec)
    match = _HOSTSPEC.match(spec)
    if match is None:
        raise DatabaseUrlError(f"{variable} has a host list that cannot be parsed")
    return Host(match["v6"] or match["name"] or "", _port(match["port"] or "", variable))


def _with_ports(hosts: list[Host], ports: list[str], variable: str) -> list[Host]:
    """libpq's ``port=5432,5433``: one port for every host, or one per host in order."""
    if any(host.port for host in hosts):
        raise DatabaseUrlError(f"{variable} gives ports both in its host list and as port=")
    if len(ports) == 1:
        ports *= len(hosts)
    if len(ports) != len(hosts):
        raise DatabaseUrlError(f"{variable} lists {len(hosts)} host(s) but {len(ports)} port(s)")
    return [Host(host.name, _port(port, variable)) for host, port in zip(hosts, ports, strict=True)]


def parse_database_url(raw: str, *, variable: str = "DATABASE_URL") -> DatabaseTarget:
    """Read ``raw`` with libpq's rules; refuse, in one line naming ``variable``, what cannot work.

    Accepts postgresql://, postgres:// and postgresql+asyncpg://; hosts in the authority
    (``u@a:5432,b:5433/db``) or as ``?host=``; the options in PASSED_TO_ASYNCPG plus
    ``connect_timeout`` and ``application_name``. Unknown options are refused rather than
    passed on.
    """
    text = raw.strip()
    if not text:
        raise DatabaseUrlError(f"{variable} is empty")
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if not scheme:
        raise DatabaseUrlError(f"{variable} is not a URL (expected postgresql://user:password@host:port/database)")
    if scheme not in ACCEPTED_SCHEMES:
        raise DatabaseUrlError(
            f"{variable} uses unsupported scheme '{scheme}://'; use postgresql:// (PostgreSQL is the only "
            "supported database)"
        )
    try:
        parts = urlsplit(text)
    except ValueError:
        raise DatabaseUrlError(f"{variable} could not be parsed as a URL") from None
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    if not at:
        userinfo, hostlist = "", parts.netloc
    if "@" in userinfo:
        # The password held an unencoded '@': where the host starts is ambiguous, and a guess
        # would print part of the password as a host name in every error.
        raise DatabaseUrlError(f"{variable} could not be parsed: percent-encode '@' in the password as %40")
    user, colon, password = userinfo.partition(":")
    query: dict[str, list[str]] = {}
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise DatabaseUrlError(f"{variable} has a query string that cannot be parsed") from None
    for key, value in pairs:
        query.setdefault(_ALIASES.get(key, key), []).append(value)

    unknown = sorted(set(query) - set(PASSED_TO_ASYNCPG) - set(_OURS))
    if unknown:
        raise DatabaseUrlError(
            f"{variable} has query option(s) {', '.join(unknown)} that this service does not support "
            f"(supported: {', '.join(sorted((*PASSED_TO_ASYNCPG, 'connect_timeout', 'application_name')))})"
        )
    # Hosts stand in the authority (libpq: a:5432,b:5433), or in host= (libpq: host=a,b&port=5432,5433;
    # SQLAlchemy: host=a:5432&host=b:5433).
    if hostlist and "host" in query:
        raise DatabaseUrlError(f"{variable} names hosts both before the database and as host=")
    specs = hostlist.split(",") if hostlist else [spec for value in query.pop("host", []) for spec in value.split(",")]
    hosts = [_host(spec, variable) for spec in specs]
    if "port" in query:
        hosts = _with_ports(hosts, [port for value in query.pop("port") for port in value.split(",")], variable)
    database = unquote(parts.path.lstrip("/")) or (_single(query, "dbname", variable) or "")
    query.pop("dbname", None)
    target = DatabaseTarget(
        hosts=tuple(hosts),
        database=database,
        user=unquote(user) or _single(query, "user", variable),
        password=unquote(password) if colon else _single(query, "password", variable),
    )
    if not database:
        raise DatabaseUrlError(f"{variable} names no database ({target.safe}): add /<database> after the host")
    if not hosts or any(not h.name for h in hosts):
        raise DatabaseUrlError(f"{variable} names no host ({target.safe})")
    return replace(
        target,
        options=_checked_options(query, variable),
        connect_timeout=_connect_timeout(_single(query, "connect_timeout", variable), variable),
        application_name=_single(query, "application_name", variable),
    )


def _single(query: dict[str, list[str]], key: str, variable: str) -> str | None:
    values = query.get(key)
    if not values:
        return None
    if len(values) > 1:
        raise DatabaseUrlError(f"{variable} repeats the query option {key}")
    return values[0]


def _checked_options(query: dict[str, list[str]], variable: str) -> tuple[tuple[str, str], ...]:
    options = {key: value for key in PASSED_TO_ASYNCPG if (value := _single(query, key, variable)) is not None}
    allowed: dict[str, tuple[str, ...]] = {
        "sslmode": SSLMODES,
        "target_session_attrs": TARGET_SESSION_ATTRS,
        "ssl_min_protocol_version": _TLS_VERSIONS,
        "ssl_max_protocol_version": _TLS_VERSIONS,
    }
    for key, values in allowed.items():
        if key in options and options[key] not in values:
            raise DatabaseUrlError(f"{variable} has {key}={options[key]}; expected one of {', '.join(values)}")
    for key in _FILES:
        path = options.get(key)
        if path is not None and not os.access(os.path.expanduser(path), os.R_OK):
            # asyncpg would fail at the first connection, with a traceback through the pool.
            raise DatabaseUrlError(f"{variable} has {key}={path}, which does not exist or cannot be read")
    return tuple(options.items())


def _connect_timeout(value: str | None, variable: str) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise DatabaseUrlError(f"{variable} has connect_timeout={value}, not a number") from None
    if seconds <= 0:
        raise DatabaseUrlError(f"{variable} has connect_timeout={value}; it must be positive")
    return seconds
