"""DATABASE_URL's reading against libpq's own: ``psycopg.conninfo.conninfo_to_dict`` is libpq's
PQconninfoParse. Over a fixed corpus (the docs' examples, the cases of issue 17, percent-encoding,
IPv6, Unix sockets, host and port lists, empty values) and over generated URLs, every URL libpq
accepts is either read as libpq reads it or refused in one line (an option this service cannot
honour); no password is ever in the line.

libpq fills in at connect time what PQconninfoParse leaves out; ``libpq_meaning`` below writes out
those rules (libpq's "Parameter Key Words"), with the environment empty: no host or an empty host
entry is the local socket in DEFAULT_SOCKET_DIR, no port or an empty entry 5432, no user the
operating-system user, no database the user's name, an empty password none.
"""

import os
import pwd
import re
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg import ProgrammingError, pq
from psycopg.conninfo import conninfo_to_dict

from backend.db.url import DEFAULT_SOCKET_DIR, DatabaseUrlError, parse_database_url

# Checksums, URLs and revision files must read the same on every Python we support (.ci/run).
pytestmark = pytest.mark.every_python

PROJECT_ROOT = Path(__file__).resolve().parents[3]
# Options this service honours, and what it reads them into besides DatabaseTarget.options.
OWN = {"connect_timeout", "application_name"}
# URLs libpq refuses that this service accepts, on purpose (backend/db/url.py says why).
EXTRAS = re.compile(r"^(?!postgres(ql)?://)|[?&](ssl|timeout)=")

# libpq's default user: the effective uid's name (test_libpqs_environment... checks it is libpq's).
OS_USER = pwd.getpwuid(os.geteuid()).pw_name

Reading = tuple[tuple[tuple[str, int | None], ...], str, str, str | None, dict[str, str]]


def libpq_meaning(keywords: dict[str, str]) -> Reading | None:
    """Where libpq connects for these PQconninfoParse keywords: hosts with ports, user, database,
    password, and the other options (an empty one left out: libpq's default). None: libpq refuses
    to connect (a port that is no port, more ports than hosts)."""
    rest = dict(keywords)
    names = [name or DEFAULT_SOCKET_DIR for name in rest.pop("host", "").split(",")]
    entries = [entry.strip() for entry in rest.pop("port", "").split(",")]
    if any(entry and not (entry.lstrip("+").isascii() and entry.lstrip("+").isdigit()) for entry in entries):
        return None
    ports = [int(entry) if entry else None for entry in entries]
    if any(port is not None and not 0 < port < 65536 for port in ports):
        return None
    if len(ports) == 1:
        ports *= len(names)
    if len(ports) != len(names):
        return None
    user = rest.pop("user", "") or OS_USER
    database = rest.pop("dbname", "") or user
    password = rest.pop("password", "") or None
    return tuple(zip(names, ports, strict=True)), user, database, password, {k: v for k, v in rest.items() if v}


def project_reading(raw: str) -> Reading:
    target = parse_database_url(raw, environ={})
    options = dict(target.options)
    if target.connect_timeout is not None:
        options["connect_timeout"] = f"{target.connect_timeout:g}"
    if target.application_name is not None:
        options["application_name"] = target.application_name
    hosts = tuple((host.name, host.port) for host in target.hosts)
    return hosts, target.user or "", target.database, target.password, options


def assert_read_as_libpq(raw: str, *, refusal: str | None = None, may_refuse: bool = False) -> str | None:
    """The project reads ``raw`` as libpq does, or refuses it in one clean line (returned): a
    refusal must contain ``refusal`` when that is given; without either argument it fails the test."""
    try:
        # The project drops white space around the URL on purpose (a secret file's newline).
        keywords: dict[str, str] | None = {key: str(v) for key, v in conninfo_to_dict(raw.strip()).items()}
    except ProgrammingError:
        keywords = None
    except UnicodeDecodeError:  # libpq takes any bytes; the project refuses what is not UTF-8
        with pytest.raises(DatabaseUrlError) as refused:
            project_reading(raw)
        return str(refused.value)
    expected = None if keywords is None else libpq_meaning(keywords)
    try:
        mine = project_reading(raw)
    except DatabaseUrlError as exc:
        message = str(exc)
        assert message.startswith("DATABASE_URL"), message
        assert "\n" not in message, message
        if keywords is not None and len(keywords.get("password", "")) >= 4:
            assert keywords["password"] not in message
        if expected is not None and not may_refuse:
            assert refusal is not None, f"{raw!r} libpq reads as {keywords}; refused: {message}"
            assert refusal in message, message
        return message
    if keywords is None:
        assert EXTRAS.search(raw.strip()), f"{raw!r}: libpq refuses it, the project reads {mine}"
        return None
    assert refusal is None, f"{raw!r} was expected to be refused"
    assert expected is not None, f"{raw!r}: libpq would not connect (keywords {keywords}), the project reads {mine}"
    if "connect_timeout" in expected[4]:
        expected[4]["connect_timeout"] = f"{float(expected[4]['connect_timeout']):g}"
    assert mine == expected, f"{raw!r}: libpq reads {keywords}"
    return None


def readme_urls() -> list[str]:
    docs = [
        PROJECT_ROOT / "README.md",
        *sorted((PROJECT_ROOT / "docs").glob("*.md")),
        PROJECT_ROOT / "backend/alembic/README.md",
    ]
    text = "".join(doc.read_text() for doc in docs)
    return sorted(set(re.findall(r"postgres(?:ql)?(?:\+asyncpg)?://[^\s`'\")|<>]*", text)))


@pytest.mark.parametrize("raw", readme_urls())
def test_every_readme_example_is_read_as_libpq_reads_it(raw: str) -> None:
    # A certificate file the example names need not exist on this machine: refused for that alone.
    assert_read_as_libpq(raw, refusal="does not exist or cannot be read" if "sslrootcert" in raw else None)


CORPUS = [
    # Issue 17: a query option wins over the URL's part; '+' is a '+'; no host; a trailing '&'.
    "postgresql://u@h/b?dbname=a",
    "postgresql://u@h/b?user=v",
    "postgresql://u:pw@h/b?password=other",
    "postgresql://u@h/b?password=a+b",
    "postgresql:///kraken",
    "postgresql://u@h/b?sslmode=require&",
    "postgresql://a:5433/db?host=b",
    # Percent-encoding, everywhere and of everything.
    "postgresql://us%40er:p%3Aw%2Fd%25@h/d%2Fb%3F",
    "postgresql://%75@%68/%64?%73slmode=%72equire",
    "postgresql://u:p%40ss@db/app",
    "postgresql://u@h/caf%C3%A9?application_name=a%2Bb+c%20d",
    "postgresql://u@h/db#not-a-fragment",
    # IPv6, bracketed in the authority, bare in host=, with a zone.
    "postgresql://u@[::1]:5433/app",
    "postgresql://u@[2001:db8::1],[::1]:6000/app",
    "postgresql://u@[fe80::1%25eth0]/app",
    "postgresql://u@/app?host=::1&port=5433",
    # Unix sockets: in host=, percent-encoded in the authority, mixed with TCP hosts.
    "postgresql://u@/app?host=/var/run/postgresql",
    "postgresql://u@%2Ftmp%2Fpg:5433/app",
    "postgresql://u@/app?host=/tmp,db&port=5433,5434",
    # Host and port lists: in the authority, in host=/port=, one port for all, empty entries.
    "postgresql://u@a:5432,b:5433/app",
    "postgresql://u@a,b:5433/app",
    "postgresql://u@a,,b:7/app",
    "postgresql://u@,/app",
    "postgresql://u@:5433/app",
    "postgresql://u@/app?host=a,b,c&port=6432",
    "postgresql://u@/app?host=a,b&port=5432,5433",
    "postgresql://u@/app?host=a,b&port=,5433",
    "postgresql://u@h/app?port=+5433",
    # Empty values: libpq's defaults.
    "postgresql://",
    "postgres://",
    "postgresql://:@h/",
    "postgresql://h/?dbname=&user=&password=&host=",
    "postgresql://u@h/db?port=",
    "postgresql://u@h/db?application_name=",
    "postgresql://u@h/db?sslrootcert=&sslcert=&sslkey=&sslcrl=&passfile=&sslpassword=",
    "postgresql://u@h/db?ssl_min_protocol_version=&ssl_max_protocol_version=TLSv1.3",
    # libpq's other spellings of sslmode.
    "postgresql://u@h/db?ssl=true",
    "postgresql://u@h/db?requiressl=1",
    "postgresql://u@h/db?requiressl=0",
    # Options passed on.
    "postgresql://u@a,b/db?target_session_attrs=read-write&sslmode=verify-full&connect_timeout=3",
    # What only looks like a query: '?' before the '@' is part of the user name.
    "postgresql://h?x=a@b/db",
]


@pytest.mark.parametrize("raw", CORPUS)
def test_the_corpus_is_read_as_libpq_reads_it(raw: str) -> None:
    assert_read_as_libpq(raw)


@pytest.mark.parametrize(
    ("raw", "refusal"),
    [
        ("postgresql://u@h/db?hostaddr=10.0.0.1", "hostaddr that this service does not support"),
        ("postgresql://u@h/db?options=-c%20x%3Dy", "options that this service does not support"),
        ("postgresql://u@h/db?gssencmode=require", "gssencmode that this service does not support"),
        ("postgresql://u@/db?host=@abstract", "abstract Unix socket"),
        ("postgresql://u@/db?host=a:5432", "neither a host name nor an IPv6 address"),
        ("postgresql://u:s3cr3t@x@h/db", "percent-encode '@' in the password as %40"),
        ("postgresql://u:1234/s3cr3t@h/db", "percent-encode '/' and '@' in the password"),
        ("postgresql://u@h/db?host=a&host=b", "repeats the query option host"),
        ("postgresql://u@h/db?sslmode=", "sslmode=; expected one of"),
        ("postgresql://u@h/db?sslmode=sometimes", "sslmode=sometimes; expected one of"),
        ("postgresql://u@h/db?connect_timeout=0", "it must be positive"),
        ("postgresql://u@h:0/db", "port 0, outside 1-65535"),
        ("postgresql://u@h:x/db", "port that is not a number"),
        ("postgresql://u@a,b/db?port=1,2,3", "lists 2 host(s) but 3 port(s)"),
        ("postgresql://u@h/db?sslrootcert=/nonexistent/ca.pem", "does not exist or cannot be read"),
    ],
)
def test_what_libpq_accepts_but_this_service_cannot_honour_is_refused_saying_why(raw: str, refusal: str) -> None:
    assert conninfo_to_dict(raw) is not None  # libpq accepts it
    assert assert_read_as_libpq(raw, refusal=refusal)


@pytest.mark.parametrize(
    "raw",
    [
        "postgresql://u@h/db?x",
        "postgresql://u@h/db?&a=b",
        "postgresql://u@h/db?a=b&&c=d",
        "postgresql://u@h/db?sslmode=a=b",
        "postgresql://u@h/d%zz",
        "postgresql://u@h/d%00",
        "postgresql://u@[::1/db",
        "postgresql://u@[]/db",
        "postgresql://u@[::1]x/db",
        "postgresql://u@h/db?frobnicate=1",
    ],
)
def test_what_libpq_refuses_is_refused(raw: str) -> None:
    with pytest.raises(ProgrammingError):
        conninfo_to_dict(raw)
    assert assert_read_as_libpq(raw)


VARIABLES = {
    "host": "PGHOST",
    "port": "PGPORT",
    "user": "PGUSER",
    "dbname": "PGDATABASE",
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "application_name": "PGAPPNAME",
}


def test_libpqs_environment_fills_in_what_the_url_leaves_out(monkeypatch: pytest.MonkeyPatch) -> None:
    environ = {
        "host": "/tmp/sockets,db",
        "port": "6001,6002",
        "user": "alice",
        "dbname": "books",
        "connect_timeout": "7",
        "application_name": "nightly",
    }
    for keyword, value in environ.items():
        monkeypatch.setenv(VARIABLES[keyword], value)
    # libpq's own defaults come from the same variables (PQconndefaults).
    assert {keyword: libpq_default(keyword) for keyword in environ} == environ
    target = parse_database_url("postgresql://")
    assert [(h.name, h.port) for h in target.hosts] == [("/tmp/sockets", 6001), ("db", 6002)]
    assert (target.user, target.database) == ("alice", "books")
    assert (target.connect_timeout, target.application_name) == (7, "nightly")
    # The URL's own parts win over the environment.
    given = parse_database_url("postgresql://bob@h:5433/shop")
    assert ([(h.name, h.port) for h in given.hosts], given.user, given.database) == ([("h", 5433)], "bob", "shop")
    # Only an option missing altogether is taken from the environment: an empty one is libpq's
    # default, for the user the operating-system user (libpq's default user without PGUSER).
    empty = parse_database_url("postgresql:///?host=&port=&user=&dbname=")
    monkeypatch.delenv("PGUSER")
    assert [(h.name, h.port) for h in empty.hosts] == [(DEFAULT_SOCKET_DIR, None)]
    assert (empty.user, empty.database) == (libpq_default("user"),) * 2
    # A mistake in a variable read is told as the URL's, naming the variables.
    monkeypatch.setenv("PGPORT", "x")
    with pytest.raises(DatabaseUrlError, match=r"^DATABASE_URL \(with PGHOST, PGPORT, .*\) has a port that"):
        parse_database_url("postgresql://")


def libpq_default(keyword: str) -> str | None:
    value = next(option.val for option in pq.Conninfo.get_defaults() if option.keyword.decode() == keyword)
    return None if value is None else value.decode()


# --- generated URLs ---------------------------------------------------------------------------

# Characters that mean something in a URL, a space, a '+', non-ASCII: percent-encoded (or not) below.
TEXT = st.text(st.sampled_from("aZ9 +%/:@?&=,[]#é€"), max_size=6)
NAME = st.text(st.sampled_from("abz09-"), min_size=1, max_size=6).map(lambda name: f"{name}.example")
HOST = st.one_of(
    NAME,
    st.just(""),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda ip: f"[{ip}]"),
    st.sampled_from(["/tmp", "/var/run/postgresql", "/run/user/1000"]).map(lambda path: quote(path, safe="")),
)
PORT = st.one_of(st.just(""), st.integers(1, 65535).map(lambda port: f":{port}"))


def encoded(text: str, keep: str) -> str:
    return quote(text, safe=keep)


QUERY_VALUES: dict[str, st.SearchStrategy[str]] = {
    "sslmode": st.sampled_from(["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]),
    "target_session_attrs": st.sampled_from(["any", "primary", "standby", "prefer-standby", "read-write"]),
    "application_name": TEXT,
    "connect_timeout": st.integers(1, 60).map(str),
    "sslpassword": TEXT,
    "dbname": TEXT,
    "user": TEXT,
    "password": TEXT.map(lambda text: "Pw9" + text),
    "host": st.lists(st.one_of(NAME, st.just("/tmp"), st.just("::1")), min_size=1, max_size=2).map(",".join),
}


@st.composite
def supported_urls(draw: st.DrawFn) -> str:
    """URLs whose every part this service honours: each must be read exactly as libpq reads it."""
    keep = draw(st.sampled_from(["", "+", "+!$'()*;~"]))  # characters some clients leave unencoded
    url = draw(st.sampled_from(["postgresql://", "postgres://"]))
    user, password = draw(TEXT), draw(TEXT)
    if user or password or draw(st.booleans()):
        url += encoded(user, keep) + (":" + encoded("Pw9" + password, keep) if draw(st.booleans()) else "") + "@"
    hosts = draw(st.lists(st.tuples(HOST, PORT), min_size=1, max_size=3))
    url += ",".join(host + port for host, port in hosts)
    if draw(st.booleans()):
        url += "/" + encoded(draw(TEXT), keep)
    query = {key: draw(values) for key, values in QUERY_VALUES.items() if draw(st.integers(0, 4)) == 0}
    if "host" in query and draw(st.booleans()):
        query["port"] = ",".join(str(draw(st.integers(1, 65535))) for _ in query["host"].split(","))
    elif "host" not in query and len(hosts) == 1 and draw(st.integers(0, 4)) == 0:
        query["port"] = str(draw(st.integers(1, 65535)))
    if len(query) > 0 or draw(st.booleans()):
        url += "/" if "/" not in url.removeprefix("postgresql://").removeprefix("postgres://") else ""
        url += "?" + "&".join(f"{encoded(k, keep)}={encoded(v, keep)}" for k, v in query.items())
        url += "&" if len(query) > 0 and draw(st.booleans()) else ""
    return url


@settings(max_examples=200, deadline=None, derandomize=True)
@given(supported_urls())
def test_generated_urls_are_read_as_libpq_reads_them(raw: str) -> None:
    refused = assert_read_as_libpq(raw)  # only where libpq would not connect either (1 host, 2 ports)
    if refused is None:
        # What a child process is given (DatabaseTarget.dsn) reads back the same.
        target = parse_database_url(raw, environ={})
        assert parse_database_url(target.dsn, environ={}) == target


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text(st.sampled_from("ab1:@/?&=,[]%+2F0 é"), max_size=24))
def test_arbitrary_text_after_the_scheme_is_read_as_libpq_reads_it_or_refused(tail: str) -> None:
    # Refusals are allowed here (a port "a", a host "b:1"); a reading other than libpq's is not.
    assert_read_as_libpq("postgresql://" + tail, may_refuse=True)
