"""DATABASE_URL rewriting: table-driven over good and bad URLs (no database needed)."""

import ssl

import pytest

from backend.db.url import DatabaseUrlError, parse_database_url

PASSWORD = "s3cr3t-Pa55"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("postgresql://u:pw@db:5432/app", "postgresql+asyncpg://u:pw@db:5432/app"),
        ("postgres://u:pw@db/app", "postgresql+asyncpg://u:pw@db/app"),
        ("postgresql+asyncpg://u:pw@db:6543/app", "postgresql+asyncpg://u:pw@db:6543/app"),
        ("POSTGRESQL://u@db/app", "postgresql+asyncpg://u@db/app"),
        ("  postgresql://u@db/app\n", "postgresql+asyncpg://u@db/app"),
        (
            "postgresql://u@/app?host=/var/run/postgresql",
            "postgresql+asyncpg://u@/app?host=%2Fvar%2Frun%2Fpostgresql",
        ),
        ("postgresql://u:p%40ss@db/app", "postgresql+asyncpg://u:p%40ss@db/app"),
        ("postgresql://u@db/app?command_timeout=5", "postgresql+asyncpg://u@db/app?command_timeout=5"),
    ],
)
def test_accepted_urls_are_rewritten_to_asyncpg(raw: str, expected: str) -> None:
    target = parse_database_url(raw)
    assert target.url.render_as_string(hide_password=False) == expected


@pytest.mark.parametrize(
    ("query", "connect_args"),
    [
        ("sslmode=require", {"ssl": "require"}),
        ("sslmode=disable", {"ssl": "disable"}),
        ("sslmode=verify-full", {"ssl": "verify-full"}),
        ("connect_timeout=7", {"timeout": 7.0}),
        ("application_name=worker", {"server_settings": {"application_name": "worker"}}),
        (
            "sslmode=prefer&connect_timeout=2&application_name=x",
            {"ssl": "prefer", "timeout": 2.0, "server_settings": {"application_name": "x"}},
        ),
    ],
)
def test_libpq_options_are_translated_for_asyncpg(query: str, connect_args: dict[str, object]) -> None:
    target = parse_database_url(f"postgresql://u@db/app?{query}")
    assert target.connect_args == connect_args
    # asyncpg would reject the libpq names as unexpected keyword arguments.
    assert not set(target.url.query) & {"sslmode", "connect_timeout", "application_name"}


def test_ssl_root_certificate_builds_a_verifying_context(tmp_path: object) -> None:
    cafile = ssl.get_default_verify_paths().cafile or ssl.get_default_verify_paths().openssl_cafile
    target = parse_database_url(f"postgresql://u@db/app?sslmode=verify-full&sslrootcert={cafile}")
    context = target.connect_args["ssl"]
    assert isinstance(context, ssl.SSLContext)
    assert context.check_hostname is True
    assert context.verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (f"mysql://root:{PASSWORD}@db/app", "unsupported scheme 'mysql://'"),
        (f"sqlite:///{PASSWORD}.db", "unsupported scheme 'sqlite://'"),
        ("garbage", "not a URL"),
        ("", "is empty"),
        (f"postgresql://u:{PASSWORD}@db:notaport/app", "port that is not a number"),
        (f"postgresql://u:{PASSWORD}@db:70000/app", "port 70000, outside 1-65535"),
        (f"postgresql://u:{PASSWORD}@db:5432", "names no database"),
        (f"postgresql://u:{PASSWORD}@/app", "names no host"),
        (f"postgresql://u:{PASSWORD}@db/app?sslmode=sometimes", "sslmode=sometimes"),
        (f"postgresql://u:{PASSWORD}@db/app?connect_timeout=soon", "connect_timeout=soon"),
        (f"postgresql://u:{PASSWORD}@db/app?frobnicate=1", "frobnicate"),
        (f"postgresql://u:{PASSWORD}@db/app?sslmode=require&sslmode=disable", "repeats"),
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


def test_safe_form_never_shows_the_password() -> None:
    target = parse_database_url(f"postgresql://kraken:{PASSWORD}@db.internal:5433/app")
    assert target.safe == "kraken@db.internal:5433/app"
    assert PASSWORD not in repr(target.safe)


def test_socket_urls_connect_through_the_socket_directory() -> None:
    target = parse_database_url("postgresql://postgres@/kraken?host=/tmp/pg")
    kwargs = target.asyncpg_connect_kwargs()
    assert kwargs["host"] == "/tmp/pg"
    assert kwargs["database"] == "kraken"
    assert target.safe == "postgres@/tmp/pg/kraken"
