"""DATABASE_URL read with libpq's rules: table-driven over good and bad URLs (no database needed).

What asyncpg then does with each option is shown on real servers in backend/tests/topologies.
"""

from pathlib import Path
from urllib.parse import quote

import pytest

from backend.db.engine import connect_kwargs
from backend.db.url import DatabaseUrlError, Host, parse_database_url

# Checksums, URLs and revision files must read the same on every Python we support (.ci/run).
pytestmark = pytest.mark.every_python

PASSWORD = "s3cr3t-Pa55"


@pytest.mark.parametrize(
    ("raw", "dsn"),
    [
        ("postgresql://u:pw@db:5432/app", "postgresql://u:pw@db:5432/app"),
        ("postgres://u:pw@db/app", "postgresql://u:pw@db/app"),
        ("postgresql+asyncpg://u:pw@db:6543/app", "postgresql://u:pw@db:6543/app"),
        ("POSTGRESQL://u@db/app", "postgresql://u@db/app"),
        ("  postgresql://u@db/app\n", "postgresql://u@db/app"),
        ("postgresql://u@/app?host=/var/run/postgresql", "postgresql://u@/app?host=/var/run/postgresql"),
        ("postgresql://u:p%40ss@db/app", "postgresql://u:p%40ss@db/app"),
        ("postgresql://u@[::1]:5433/app", "postgresql://u@[::1]:5433/app"),
        # A query option wins over the URL's own part, as in libpq.
        ("postgresql://x@db/app?user=u&password=pw&dbname=other", "postgresql://u:pw@db/other"),
        ("postgresql://u@db/app?password=a+b", "postgresql://u:a%2Bb@db/app"),  # '+' is not a space
        ("postgresql://u@/app?host=/tmp/pg", "postgresql://u@/app?host=/tmp/pg"),
        ("postgresql://u@db/app?sslmode=require&", "postgresql://u@db/app?sslmode=require"),
        ("postgresql://u@db/app?ssl=require&timeout=4", "postgresql://u@db/app?sslmode=require&connect_timeout=4"),
    ],
)
def test_accepted_urls_are_kept_in_libpq_form(raw: str, dsn: str) -> None:
    assert parse_database_url(raw).dsn == dsn
    assert parse_database_url(dsn).dsn == dsn  # what a child process is given reads back the same


@pytest.mark.parametrize(
    "raw",
    [
        "postgresql://u:pw@a:5432,b:5433/app",  # libpq: hosts in the authority
        "postgresql://u:pw@/app?host=a,b&port=5432,5433",  # libpq: host and port lists
        "postgresql://u:pw@x:5432,y:5433/app?host=a,b",  # libpq: host= replaces the authority's hosts
    ],
)
def test_host_lists_in_every_form_keep_each_hosts_port(raw: str) -> None:
    target = parse_database_url(raw)
    assert target.hosts == (Host("a", 5432), Host("b", 5433))
    assert target.safe == "u@a:5432,b:5433/app"
    arguments = target.asyncpg_arguments()
    assert (arguments["host"], arguments["port"]) == (["a", "b"], [5432, 5433])
    assert target.dsn == "postgresql://u:pw@a:5432,b:5433/app"


def test_one_port_applies_to_every_host() -> None:
    target = parse_database_url("postgresql://u@/app?host=a,b,c&port=6432")
    assert target.hosts == (Host("a", 6432), Host("b", 6432), Host("c", 6432))


@pytest.mark.parametrize(
    "query",
    [
        "sslmode=disable",
        "sslmode=allow",
        "sslmode=prefer",
        "sslmode=require",
        "sslmode=verify-ca",
        "sslmode=verify-full",
        "target_session_attrs=any",
        "target_session_attrs=primary",
        "target_session_attrs=standby",
        "target_session_attrs=prefer-standby",
        "target_session_attrs=read-write",
        "target_session_attrs=read-only",
        "sslpassword=x",
        "ssl_min_protocol_version=TLSv1.2",
        "ssl_max_protocol_version=TLSv1.3",
    ],
)
def test_libpq_options_go_to_asyncpg_as_given(query: str) -> None:
    # asyncpg implements these with libpq's meaning: given as its arguments, or in a DSN of only them.
    target = parse_database_url(f"postgresql://u@db/app?{query}")
    name, value = query.split("=")
    assert target.dsn == f"postgresql://u@db/app?{query}"
    kwargs = connect_kwargs(target, "kraken-backend")
    given = {"sslmode": kwargs.get("ssl"), "target_session_attrs": kwargs.get("target_session_attrs")}
    assert given.get(name, kwargs.get("dsn")) == (value if name in given else f"postgresql://?{query}")


def test_certificate_and_password_files_go_to_asyncpg(tmp_path: Path) -> None:
    files = {name: tmp_path / name for name in ("sslrootcert", "sslcert", "sslkey", "sslcrl", "passfile")}
    for path in files.values():
        path.write_text("")
    query = "&".join(f"{name}={path}" for name, path in files.items())
    target = parse_database_url(f"postgresql://u@db/app?sslmode=verify-full&{query}")
    assert dict(target.options) == {"sslmode": "verify-full", **{name: str(path) for name, path in files.items()}}
    assert target.dsn == f"postgresql://u@db/app?sslmode=verify-full&{query}"
    arguments = target.asyncpg_arguments()
    assert (arguments["ssl"], arguments["passfile"]) == ("verify-full", str(files["passfile"]))
    assert arguments["dsn"] == "postgresql://?" + "&".join(
        f"{name}={quote(str(path), safe='')}" for name, path in files.items() if name != "passfile"
    )


def test_connect_timeout_and_application_name_become_connect_arguments() -> None:
    target = parse_database_url("postgresql://u@db/app?connect_timeout=7&application_name=worker")
    kwargs = connect_kwargs(target, "kraken-backend")
    where = {"host": ["db"], "port": [5432], "user": "u", "password": None, "database": "app"}
    assert kwargs == {**where, "timeout": 7.0, "server_settings": {"application_name": "worker"}}
    # Without one in the URL, connections carry the service's own name.
    plain = connect_kwargs(parse_database_url("postgresql://u@db/app"), "kraken-backend", statement_cache=False)
    assert plain == {**where, "server_settings": {"application_name": "kraken-backend"}, "statement_cache_size": 0}


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (f"mysql://root:{PASSWORD}@db/app", "unsupported scheme 'mysql://'"),
        (f"sqlite:///{PASSWORD}.db", "unsupported scheme 'sqlite://'"),
        ("garbage", "not a URL"),
        ("", "is empty"),
        (f"postgresql://u:{PASSWORD}@db:notaport/app", "port that is not a number"),
        (f"postgresql://u:{PASSWORD}@db:70000/app", "port 70000, outside 1-65535"),
        (f"postgresql://u:{PASSWORD}@a:5432,b:0/app", "port 0, outside 1-65535"),
        (f"postgresql://u:{PASSWORD}@db/app?sslmode=sometimes", "sslmode=sometimes; expected one of disable, allow"),
        (f"postgresql://u:{PASSWORD}@db/app?target_session_attrs=rw", "target_session_attrs=rw; expected one of any"),
        (f"postgresql://u:{PASSWORD}@db/app?connect_timeout=soon", "connect_timeout=soon"),
        (f"postgresql://u:{PASSWORD}@db/app?connect_timeout=0", "connect_timeout=0; it must be positive"),
        (f"postgresql://u:{PASSWORD}@db/app?frobnicate=1", "frobnicate that this service does not support"),
        (f"postgresql://u:{PASSWORD}@db/app?options=-c%20x%3Dy", "options that this service does not support"),
        (f"postgresql://u:{PASSWORD}@db/app?sslmode=require&sslmode=disable", "repeats the query option sslmode"),
        (f"postgresql://u:{PASSWORD}@db/app?sslrootcert=/nonexistent/ca.pem", "sslrootcert=/nonexistent/ca.pem"),
        (f"postgresql://u:{PASSWORD}@/app?host=a,b&port=1,2,3", "lists 2 host(s) but 3 port(s)"),
        (f"postgresql://u:{PASSWORD}@/app?host=a:5432&host=b:5433", "repeats the query option host"),
        (f"postgresql://u:{PASSWORD}@/app?host=a:1&port=2", "host a:1, which is neither a host name nor an IPv6"),
        (f"postgresql://u:{PASSWORD}@db/app?hostaddr=10.0.0.1", "hostaddr that this service does not support"),
        (f"postgresql://u:{PASSWORD}@db/app?&sslmode=require", "a parameter has no '='"),
        (f"postgresql://u:{PASSWORD}@db/app?sslmode=a=b", "more than one '='"),
        (f"postgresql://u:{PASSWORD}@db/app%zz", "'%' in the database name that is not followed by two hex"),
        (f"postgresql://u:{PASSWORD}@db/app%00", "%00 in the database name"),
        (f"postgresql://u:{PASSWORD}@db/app%A0", "percent-encoded bytes in the database name that are not UTF-8"),
        (f"postgresql://u:{PASSWORD}@db/my app", "a space in the database name: percent-encode it as %20"),
        (f"postgresql://u:{PASSWORD}@[::1/app", "without its closing ']'"),
        (f"postgresql://u:{PASSWORD}@[::1]x/app", "'x' after an IPv6 address"),
        (f"postgresql://u:{PASSWORD}@@abstract/app", "abstract Unix socket"),
        (f"postgresql://u:{PASSWORD}@x@db.example.com/app", "percent-encode '@' in the password"),
    ],
)
def test_bad_urls_are_refused_with_one_line_without_the_password(raw: str, fragment: str) -> None:
    with pytest.raises(DatabaseUrlError) as caught:
        parse_database_url(raw)
    message = str(caught.value)
    assert fragment in message
    assert "\n" not in message
    assert PASSWORD not in message
    assert message.startswith("DATABASE_URL")


@pytest.mark.parametrize(
    "password",
    ["front/back?x=back2", "front?back=x@back2", "front/b?back@@back2", "front@@back2", "front@?back=1"],
)
def test_a_password_with_unencoded_separators_stays_out_of_the_refusal(password: str) -> None:
    # libpq cuts such a password at a '/', '?' or '@'; the rest lands in the port, the query or the
    # host, whose messages would print it.
    with pytest.raises(DatabaseUrlError) as caught:
        parse_database_url(f"postgresql://u:{password}@db.example.com/app?sslmode=require")
    message = str(caught.value)
    assert "percent-encode" in message
    assert "back" not in message


def test_safe_form_never_shows_the_password() -> None:
    target = parse_database_url(f"postgresql://kraken:{PASSWORD}@db.internal:5433,db2.internal/app")
    assert target.safe == "kraken@db.internal:5433,db2.internal/app"
    assert PASSWORD not in target.safe
    assert PASSWORD not in repr(target)


def test_socket_urls_connect_through_the_socket_directory() -> None:
    target = parse_database_url("postgresql://postgres@/kraken?host=/tmp/pg")
    assert target.hosts == (Host("/tmp/pg"),)
    assert target.dsn == "postgresql://postgres@/kraken?host=/tmp/pg"
    assert target.asyncpg_arguments()["host"] == ["/tmp/pg"]
    assert target.safe == "postgres@/tmp/pg/kraken"
