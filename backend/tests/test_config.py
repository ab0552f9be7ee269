"""Settings: what is refused, and how it is reported (no database needed)."""

import os
import subprocess
import sys

import pytest

from backend.config import ConfigError, check_serving, load_settings, postgres_ms
from backend.tests.helpers import child_env

PASSWORD = "hunter2-very-secret"


def test_production_refuses_a_missing_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("KRAKEN_ENV", "production")
    with pytest.raises(ConfigError, match="DATABASE_URL is not set; KRAKEN_ENV=production"):
        load_settings()


def test_production_service_refuses_a_missing_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://app@db:5432/kraken")
    monkeypatch.setenv("KRAKEN_ENV", "production")
    monkeypatch.delenv("KRAKEN_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="KRAKEN_API_KEY is not set; KRAKEN_ENV=production"):
        check_serving(load_settings())
    monkeypatch.setenv("KRAKEN_API_KEY", "   ")  # blank is not a key
    with pytest.raises(ConfigError, match="KRAKEN_API_KEY is not set"):
        check_serving(load_settings())
    monkeypatch.setenv("KRAKEN_API_KEY", PASSWORD)
    check_serving(load_settings())
    key = load_settings().api_key
    assert key is not None
    assert key.get_secret_value() == PASSWORD


def test_an_api_key_that_cannot_be_sent_in_a_header_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KRAKEN_API_KEY", f"{PASSWORD} with spaces")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "KRAKEN_API_KEY" in str(caught.value)
    assert PASSWORD not in str(caught.value)


def test_development_without_database_url_means_embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("KRAKEN_ENV", raising=False)
    settings = load_settings()
    assert settings.database_target() is None
    assert settings.embedded_pgdata.parts[-2:] == (".kraken", "pgdata")


def test_migrations_url_falls_back_to_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://app@pgbouncer:6432/kraken")
    monkeypatch.delenv("MIGRATIONS_DATABASE_URL", raising=False)
    settings = load_settings()
    assert settings.migrations_target() == settings.database_target()
    monkeypatch.setenv("MIGRATIONS_DATABASE_URL", "postgresql://owner@primary:5432/kraken")
    target = load_settings().migrations_target()
    assert target is not None
    assert target.safe == "owner@primary:5432/kraken"


@pytest.mark.parametrize(
    ("variable", "value", "fragment"),
    [
        ("KRAKEN_PORT", "eighty", "KRAKEN_PORT"),
        ("KRAKEN_MIGRATE_ON_STARTUP", "sometimes", "KRAKEN_MIGRATE_ON_STARTUP"),
        ("KRAKEN_MIGRATION_VALIDATE", "strict", "KRAKEN_MIGRATION_VALIDATE"),
        ("KRAKEN_METRICS", "sometimes", "KRAKEN_METRICS"),
        ("KRAKEN_WORKERS", "0", "KRAKEN_WORKERS"),
        ("KRAKEN_WORKERS", "two", "KRAKEN_WORKERS"),
        ("KRAKEN_SHUTDOWN_GRACE", "-1", "KRAKEN_SHUTDOWN_GRACE"),
        # Timeouts that would mean "no limit" (only KRAKEN_DDL_STATEMENT_TIMEOUT and KRAKEN_INDEX_BUILD_TIMEOUT
        # document 0 for that), or that PostgreSQL's int4 milliseconds cannot hold.
        ("KRAKEN_DDL_LOCK_TIMEOUT", "0", "KRAKEN_DDL_LOCK_TIMEOUT"),
        ("KRAKEN_DDL_LOCK_TIMEOUT", "inf", "KRAKEN_DDL_LOCK_TIMEOUT"),
        ("KRAKEN_DDL_LOCK_TIMEOUT", "nan", "KRAKEN_DDL_LOCK_TIMEOUT"),
        ("KRAKEN_DDL_STATEMENT_TIMEOUT", "inf", "KRAKEN_DDL_STATEMENT_TIMEOUT"),
        ("KRAKEN_DDL_STATEMENT_TIMEOUT", "2147484", "KRAKEN_DDL_STATEMENT_TIMEOUT"),
        ("KRAKEN_MIGRATION_LOCK_TIMEOUT", "inf", "KRAKEN_MIGRATION_LOCK_TIMEOUT"),
        ("KRAKEN_INDEX_BUILD_TIMEOUT", "-1", "KRAKEN_INDEX_BUILD_TIMEOUT"),
        ("KRAKEN_INDEX_BUILD_TIMEOUT", "inf", "KRAKEN_INDEX_BUILD_TIMEOUT"),
        ("KRAKEN_INDEX_BUILD_TIMEOUT", "2147484", "KRAKEN_INDEX_BUILD_TIMEOUT"),
        ("DATABASE_URL", f"mysql://root:{PASSWORD}@db/app", "unsupported scheme"),
        ("MIGRATIONS_DATABASE_URL", f"postgresql://u:{PASSWORD}@db:99999/app", "MIGRATIONS_DATABASE_URL"),
    ],
)
def test_bad_settings_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, fragment: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert fragment in str(caught.value)
    assert PASSWORD not in str(caught.value)


@pytest.mark.parametrize(
    ("seconds", "ms"),
    [(0, 0), (0.0004, 1), (1e-10, 1), (0.0015, 2), (0.007, 7), (5, 5000), (1800, 1_800_000), (2147483.647, 2**31 - 1)],
)
def test_postgres_timeouts_round_up_to_whole_milliseconds(seconds: float, ms: int) -> None:
    # Any positive value is at least 1 ms: PostgreSQL reads 0 as "no limit".
    assert postgres_ms(seconds) == ms


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"KRAKEN_ENV": "production"}, "DATABASE_URL is not set"),
        ({"KRAKEN_ENV": "production", "DATABASE_URL": "postgresql://app@db:5432/kraken"}, "KRAKEN_API_KEY is not set"),
        ({"DATABASE_URL": f"mysql://root:{PASSWORD}@db/app"}, "unsupported scheme"),
        ({"KRAKEN_PORT": "-1"}, "KRAKEN_PORT"),
        ({"KRAKEN_CORS_ORIGINS": "https://share.example.com/"}, "KRAKEN_CORS_ORIGINS"),
    ],
)
def test_service_refuses_bad_configuration_with_one_line(env: dict[str, str], fragment: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", "from backend.serve import main; main()"],
        env=child_env(None, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    output = (result.stdout + result.stderr).strip()
    assert len(output.splitlines()) == 1, output
    assert fragment in output
    assert "Traceback" not in output
    assert PASSWORD not in output


@pytest.mark.parametrize(
    ("value", "origins"),
    [
        ("", ()),
        ("*", ("*",)),
        ("https://share.example.com", ("https://share.example.com",)),
        # Spaces around commas are ignored; browsers send scheme and host in lower case.
        (" https://Share.Example.com , http://127.0.0.1:8080,", ("https://share.example.com", "http://127.0.0.1:8080")),
        ("http://[::1]:3000", ("http://[::1]:3000",)),
    ],
)
def test_cors_origins_are_a_comma_separated_list(
    monkeypatch: pytest.MonkeyPatch, value: str, origins: tuple[str, ...]
) -> None:
    monkeypatch.setenv("KRAKEN_CORS_ORIGINS", value)
    assert load_settings().cors_origins == origins


def test_cors_origins_default_to_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KRAKEN_CORS_ORIGINS", raising=False)
    assert load_settings().cors_origins == ()


@pytest.mark.parametrize(
    "value",
    [
        "share.example.com",  # no scheme
        "https://share.example.com/",  # a path, even "/"
        "https://share.example.com/view",
        "ftp://share.example.com",
        "https://share.example.com:70000",
        "https://user@share.example.com",
        "*, https://share.example.com",  # any origin, and some: which?
    ],
)
def test_a_malformed_cors_origin_is_one_line_naming_the_setting(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("KRAKEN_CORS_ORIGINS", value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith("KRAKEN_CORS_ORIGINS: ")
    assert "\n" not in message


def test_migrations_url_alone_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # The service would serve the embedded database while migrations went to another one.
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("MIGRATIONS_DATABASE_URL", "postgresql://owner@primary:5432/kraken")
    with pytest.raises(ConfigError, match="MIGRATIONS_DATABASE_URL is set but DATABASE_URL is not"):
        load_settings()


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux only")
def test_workers_default_to_the_cpus_this_process_may_run_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KRAKEN_WORKERS", raising=False)
    assert load_settings().workers == len(os.sched_getaffinity(0))


def test_without_cpu_affinity_as_on_macos_workers_default_to_every_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KRAKEN_WORKERS", raising=False)
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    assert load_settings().workers == os.cpu_count()
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # a platform that cannot tell
    assert load_settings().workers == 1
