"""DATABASE_URL, read with libpq's rules and checked before anything connects.

A ``DatabaseTarget`` is what every connection of this service is made from: the engines and
the bare asyncpg connections alike (``backend.db.engine.connect_kwargs``). It holds libpq's
reading of the URL, defaults filled in: asyncpg is given its parts as explicit arguments, never
the URL, because asyncpg's own DSN parser reads some URLs differently (the path wins over
``?dbname=``, ``+`` in a query value becomes a space, no host means five places to try).

The reading is libpq's ``PQconninfoParse`` for URIs (fe-connect.c, ``conninfo_uri_parse_options``),
proven against libpq itself in backend/tests/db/test_url_libpq.py: user and password up to the
first ``@``, hosts and ports in the authority (``[v6]`` in brackets) or as ``?host=``/``?port=``
lists, a query option wins over the same part of the URL, percent-decoding everywhere and
``+`` kept as it is. What libpq takes from its surroundings when the URL is silent:

- no host: ``PGHOST``, else the local Unix socket in DEFAULT_SOCKET_DIR; an empty entry of a host
  list is that socket too. No port: ``PGPORT``, else 5432 (an empty entry of a port list: 5432).
- no user (or an empty one): ``PGUSER``, else the operating-system user; no database: ``PGDATABASE``,
  else the user name.
- no connect_timeout or application_name: ``PGCONNECT_TIMEOUT``, ``PGAPPNAME`` (else the service's name).
- the password, ``sslmode``, certificates and ``target_session_attrs`` left out are read by
  asyncpg from ``PGPASSWORD``, ``PGPASSFILE``/``~/.pgpass``, ``PGSSLMODE`` etc., as libpq would.
  Not read: ``PGSERVICE`` and service files (``?service=`` is refused), ``PGHOSTADDR``, ``PGOPTIONS``.

What stays ours: only options asyncpg implements are accepted (any other is refused in one line
naming it, rather than ignored or sent to the server as a setting), values are checked here so a
mistake is one line at start-up, and messages name ``user@host:port/database`` for every host,
never the password. Leading and trailing white space is dropped (a secret file's newline), and
``POSTGRESQL://``, ``postgresql+asyncpg://``, asyncpg's ``ssl=`` and ``timeout=`` are accepted too.

No I/O beyond the environment and checking that named certificate files can be read.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote, unquote_to_bytes

ACCEPTED_SCHEMES = ("postgresql", "postgres", "postgresql+asyncpg")
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
TARGET_SESSION_ATTRS = ("any", "primary", "standby", "prefer-standby", "read-write", "read-only")
# libpq options that asyncpg implements with libpq's meaning: given to it as they are.
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
# server setting (ours must not override the URL's).
# host, port, dbname, user and password are libpq's other spellings of the URL's own parts.
_OURS = ("connect_timeout", "application_name", "host", "port", "dbname", "user", "password")
_ALIASES = {"ssl": "sslmode", "timeout": "connect_timeout"}  # asyncpg's names, accepted too
# libpq's compiled-in DEFAULT_PGSOCKET_DIR: every Linux distribution's libpq (Debian, Ubuntu,
# Red Hat; /run/postgresql where /var/run links there) and upstream's /tmp elsewhere (macOS
# Homebrew and Postgres.app, the BSDs). PGHOST or ?host= names any other.
DEFAULT_SOCKET_DIR = "/var/run/postgresql" if sys.platform.startswith("linux") else "/tmp"
DEFAULT_PORT = 5432


class DatabaseUrlError(ValueError):
    """A DATABASE_URL that cannot be used; the message is one line and never holds the password."""


@dataclass(frozen=True)
class Host:
    """A TCP host name or address (port None: 5432), or a Unix socket directory."""

    name: str
    port: int | None = None

    @property
    def is_socket(self) -> bool:
        return self.name.startswith("/")

    def __str__(self) -> str:
        name = f"[{self.name}]" if ":" in self.name else self.name
        return f"{name}:{self.port}" if self.port else name

    @property
    def in_url(self) -> str:
        """This TCP host as it stands in a URL's authority, percent-encoded."""
        name = f"[{quote(self.name, safe=':')}]" if ":" in self.name else quote(self.name, safe="")
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

    def asyncpg_arguments(self) -> dict[str, Any]:
        """``asyncpg.connect()`` arguments for where, as whom and how: each part given explicitly,
        so that asyncpg's DSN parser, which reads some URLs otherwise than libpq, reads none."""
        options = dict(self.options)
        arguments: dict[str, Any] = {
            "host": [host.name for host in self.hosts],
            "port": [host.port or DEFAULT_PORT for host in self.hosts],
            "user": self.user,
            "password": self.password,  # None: asyncpg reads PGPASSWORD, then the password file, as libpq
            "database": self.database,
        }
        for option, argument in (("sslmode", "ssl"), ("target_session_attrs", "target_session_attrs")):
            if option in options:
                arguments[argument] = options.pop(option)
        if "passfile" in options:
            arguments["passfile"] = options.pop("passfile")
        if options:
            # Certificate files, the key's password and TLS versions have no argument of their own:
            # a DSN of just those, encoded so that asyncpg's decoding gives each value back exactly.
            arguments["dsn"] = "postgresql://?" + "&".join(
                f"{quote(key, safe='')}={quote(value, safe='')}" for key, value in options.items()
            )
        return arguments

    @property
    def dsn(self) -> str:
        """The libpq URL of this target, password included: for child processes and other clients."""
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
                query[1:1] = [("port", ",".join(str(h.port or "") for h in self.hosts))]
        else:
            netloc = userinfo + ",".join(host.in_url for host in self.hosts)
        if self.connect_timeout is not None:
            query.append(("connect_timeout", f"{self.connect_timeout:g}"))
        if self.application_name is not None:
            query.append(("application_name", self.application_name))
        encoded = "&".join(f"{quote(k, safe='')}={quote(v, safe='/,')}" for k, v in query)
        return f"postgresql://{netloc}/{quote(self.database, safe='')}" + (f"?{encoded}" if encoded else "")


# --- libpq's URI grammar -------------------------------------------------------------------


def _decode(text: str, what: str, variable: str) -> str:
    """libpq's percent-decoding: %XX only (``+`` stays ``+``), no %00; since libpq 17, spaces around
    a part are dropped and one inside it is refused (an encoded one, %20, is kept)."""
    text = text.strip(" ")
    if " " in text:
        raise DatabaseUrlError(f"{variable} has a space in {what}: percent-encode it as %20")
    if re.search(r"%(?![0-9A-Fa-f]{2})", text):
        raise DatabaseUrlError(f"{variable} has a '%' in {what} that is not followed by two hex digits")
    raw = unquote_to_bytes(text)
    if b"\0" in raw:
        raise DatabaseUrlError(f"{variable} has %00 in {what}, which libpq forbids")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise DatabaseUrlError(f"{variable} has percent-encoded bytes in {what} that are not UTF-8") from None


def _scan(text: str, start: int, stops: str) -> int:
    """The index of the first character of ``stops`` at or after ``start`` (``len(text)`` if none)."""
    match = re.compile(f"[{re.escape(stops)}]").search(text, start)
    return match.start() if match else len(text)


def libpq_keywords(raw: str, *, variable: str = "DATABASE_URL") -> dict[str, str]:
    """The keywords libpq's PQconninfoParse finds in a ``postgresql://`` URL, decoded: what
    ``psycopg.conninfo.conninfo_to_dict`` returns for it. A repeated query option is refused."""
    text = raw.strip()
    if not text:
        raise DatabaseUrlError(f"{variable} is empty")
    scheme, sep, rest = text.partition("://")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        raise DatabaseUrlError(f"{variable} is not a URL (expected postgresql://user:password@host:port/database)")
    if scheme.lower() not in ACCEPTED_SCHEMES:
        raise DatabaseUrlError(
            f"{variable} uses unsupported scheme '{scheme.lower()}://'; use postgresql:// (PostgreSQL is the only "
            "supported database)"
        )
    found: dict[str, str] = {}

    def store(key: str, value: str, what: str) -> None:
        found[key] = _decode(value, what, variable)

    # User and password: up to the first '@' that comes before any '/'.
    pos = _scan(rest, 0, "@/")
    userinfo = rest[pos : pos + 1] == "@"
    if userinfo:
        user, colon, password = rest[:pos].partition(":")
        if user:
            store("user", user, "the user name")
        if colon and password:
            store("password", password, "the password")
        pos += 1
    else:
        pos = 0
    # Hosts, each with an optional port, separated by commas; an IPv6 address in brackets.
    hosts: list[str] = []
    ports: list[str] = []
    while True:
        if rest[pos : pos + 1] == "[":
            end = rest.find("]", pos + 1)
            if end < 0:
                raise DatabaseUrlError(f"{variable} has an IPv6 address without its closing ']'")
            if end == pos + 1:
                raise DatabaseUrlError(f"{variable} has an empty IPv6 address '[]'")
            hosts.append(rest[pos + 1 : end])
            pos = end + 1
            if pos < len(rest) and rest[pos] not in ":/?,":
                raise DatabaseUrlError(f"{variable} has '{rest[pos]}' after an IPv6 address (expected ':' or '/')")
        else:
            end = _scan(rest, pos, ":/?,")
            hosts.append(rest[pos:end])
            pos = end
        port = ""
        if rest[pos : pos + 1] == ":":
            end = _scan(rest, pos + 1, "/?,")
            port, pos = rest[pos + 1 : end], end
        ports.append(port)
        if rest[pos : pos + 1] != ",":
            break
        pos += 1
    if not userinfo and "@" in rest[pos:] and any(p and not re.fullmatch(_PORT, p) for p in ports):
        # user:password read as host:port (a port that is not a number: refused anyway), the
        # password cut at an unencoded '/' or '?': what follows it would reach a message below.
        raise DatabaseUrlError(
            f"{variable} could not be parsed: percent-encode '/', '?' and '@' in the password (%2F, %3F, %40)"
        )
    # libpq keeps a list whose entries are all empty (",") too: each entry is then the default.
    if any(hosts) or len(hosts) > 1:
        store("host", ",".join(hosts), "the host list")
    if any(ports) or len(ports) > 1:
        store("port", ",".join(ports), "the port list")
    # The database: after the '/', up to the query.
    if rest[pos : pos + 1] == "/":
        end = _scan(rest, pos + 1, "?")
        if "@" in rest[pos + 1 : end]:
            # libpq ends the user info at the first '/': a password holding an unencoded '/' leaves
            # the rest of it in the database name, which every message would print.
            raise DatabaseUrlError(
                f"{variable} has an '@' after the host: percent-encode '/' and '@' in the password "
                "(%2F, %40) and '@' in the database name (%40)"
            )
        if end > pos + 1:
            store("dbname", rest[pos + 1 : end], "the database name")
        pos = end
    if pos < len(rest):  # at the '?'
        _query(rest[pos + 1 :], found, variable)
    return found


def _query(params: str, found: dict[str, str], variable: str) -> None:
    """libpq's ``key=value&...`` (a trailing '&' is allowed); a query option wins over the URL's part."""
    seen: set[str] = set()
    pairs = params.split("&")
    if pairs[-1] == "":
        pairs.pop()
    for pair in pairs:
        if pair.count("=") != 1:
            problem = "has no '='" if "=" not in pair else "has more than one '=' (percent-encode it as %3D)"
            raise DatabaseUrlError(f"{variable} has a query string that cannot be parsed: a parameter {problem}")
        key, value = pair.split("=")
        key = _decode(key, "a query option's name", variable)
        value = _decode(value, f"the query option {key}", variable)
        if key == "ssl" and value == "true":  # libpq's JDBC spelling
            value = "require"
        key = _ALIASES.get(key, key)
        if key == "requiressl":  # libpq's old spelling
            key, value = "sslmode", "require" if value.startswith("1") else "prefer"
        if key in seen:
            # libpq takes the last one; two values for one option are a mistake more likely than not.
            raise DatabaseUrlError(f"{variable} repeats the query option {key}")
        seen.add(key)
        found[key] = value


# --- what the keywords mean ---------------------------------------------------------------


_PORT = r"\s*\+?[0-9]+\s*"  # what libpq reads as a port number


def _port(value: str, variable: str) -> int | None:
    if value == "":
        return None
    if not re.fullmatch(_PORT, value):
        raise DatabaseUrlError(f"{variable} has a port that is not a number")
    port = int(value)
    if not 0 < port < 65536:
        raise DatabaseUrlError(f"{variable} has port {port}, outside 1-65535")
    return port


def _host(name: str, variable: str) -> str:
    """One entry of a host list: a socket directory, a host name or an address (IPv6 without brackets)."""
    if name == "":
        return DEFAULT_SOCKET_DIR
    if name.startswith("/"):
        return name
    if "@" in name[1:]:
        # The password held an unencoded '@' (libpq ends it at the first one): printing this
        # host name would print the rest of the password (so before the abstract socket's line).
        raise DatabaseUrlError(f"{variable} could not be parsed: percent-encode '@' in the password as %40")
    if name.startswith("@"):
        raise DatabaseUrlError(f"{variable} names an abstract Unix socket ({name}), which this service cannot use")
    if ":" in name:
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            raise DatabaseUrlError(
                f"{variable} has host {name}, which is neither a host name nor an IPv6 address "
                "(a port goes after the host as :port in the URL, or in port=)"
            ) from None
    return name


def _hosts(host: str, port: str | None, variable: str) -> tuple[Host, ...]:
    """libpq's host and port lists: one port for every host, or one per host in order."""
    names = [_host(name, variable) for name in host.split(",")]
    ports: list[int | None] = [None] * len(names)
    if port:
        given = [_port(value, variable) for value in port.split(",")]
        if len(given) == 1:
            given *= len(names)
        if len(given) != len(names):
            raise DatabaseUrlError(f"{variable} lists {len(names)} host(s) but {len(given)} port(s)")
        ports = given
    return tuple(Host(name, value) for name, value in zip(names, ports, strict=True))


_ENVIRONMENT = (
    ("host", "PGHOST"),
    ("port", "PGPORT"),
    ("user", "PGUSER"),
    ("dbname", "PGDATABASE"),
    ("connect_timeout", "PGCONNECT_TIMEOUT"),
    ("application_name", "PGAPPNAME"),
)


def _os_user(variable: str) -> str:
    """libpq's default user: the name of the effective uid (not $USER, which getpass would read first)."""
    import pwd  # POSIX only, as libpq's lookup here; imported where used

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # no passwd entry for this uid (a container's arbitrary user)
        raise DatabaseUrlError(
            f"{variable} names no user, PGUSER is not set and the operating-system user has no name"
        ) from None


def parse_database_url(
    raw: str, *, variable: str = "DATABASE_URL", environ: Mapping[str, str] | None = None
) -> DatabaseTarget:
    """Read ``raw`` with libpq's rules, libpq's defaults filled in from ``environ`` (os.environ);
    refuse, in one line naming ``variable``, what cannot work here."""
    env = os.environ if environ is None else environ
    keywords = libpq_keywords(raw, variable=variable)
    unknown = sorted(set(keywords) - set(PASSED_TO_ASYNCPG) - set(_OURS))
    if any(not re.fullmatch(r"\w+", name) for name in unknown):
        # No option's name: a password's unencoded '?' started the query early, so the name
        # holds the rest of the password.
        raise DatabaseUrlError(
            f"{variable} has a query option whose name is not a word: percent-encode '/', '?' and '@' in the "
            "password (%2F, %3F, %40)"
        )
    if unknown:
        raise DatabaseUrlError(
            f"{variable} has query option(s) {', '.join(unknown)} that this service does not support "
            f"(supported: {', '.join(sorted((*PASSED_TO_ASYNCPG, 'connect_timeout', 'application_name')))})"
        )
    # libpq's environment stands in for an option only when the URL does not give it at all; a
    # mistake in one is told as the URL's, with the variables read.
    read = [name for keyword, name in _ENVIRONMENT if keyword not in keywords and name in env]
    told = f"{variable} (with {', '.join(read)})" if read else variable
    host = keywords.get("host", env.get("PGHOST", ""))
    port = keywords.get("port", env.get("PGPORT"))
    user = keywords.get("user", env.get("PGUSER")) or _os_user(variable)
    # An empty password is none: libpq then looks in the password file.
    password = keywords.get("password") or None
    return DatabaseTarget(
        hosts=_hosts(host, port, told),
        database=keywords.get("dbname", env.get("PGDATABASE")) or user,
        user=user,
        password=password,
        options=_checked_options(keywords, variable),
        connect_timeout=_connect_timeout(keywords.get("connect_timeout", env.get("PGCONNECT_TIMEOUT")), told),
        # Empty: libpq sends its fallback name, as this service sends its own.
        application_name=keywords.get("application_name", env.get("PGAPPNAME")) or None,
    )


# libpq reads an empty value of these as not given (its default); an empty sslmode or
# target_session_attrs it refuses, and so does _checked_options.
_EMPTY_IS_DEFAULT = (*_FILES, "sslpassword", "ssl_min_protocol_version", "ssl_max_protocol_version")


def _checked_options(keywords: dict[str, str], variable: str) -> tuple[tuple[str, str], ...]:
    options = {
        key: value
        for key in PASSED_TO_ASYNCPG
        if (value := keywords.get(key)) is not None and (value or key not in _EMPTY_IS_DEFAULT)
    }
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
