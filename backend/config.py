"""Service settings, read once from the environment.

Every variable is documented in docs/configuration.md. Errors become ``ConfigError`` with one line that
names the variable and the problem, never a value that could hold a password.
"""

from __future__ import annotations

import math
import os
import re
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from backend.db.embedded import embedded_database
from backend.db.url import DatabaseTarget, DatabaseUrlError, parse_database_url
from backend.logs import LogFormat

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# A web origin as browsers send it: scheme, host (a name, an IPv4 or a bracketed IPv6 address),
# and a port when not the scheme's default; no path, not even "/".
_ORIGIN = re.compile(
    r"^https?://(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*|\[[0-9a-f:.]+\])"
    r"(?::(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?$"
)


def usable_cpus() -> int:
    """The CPUs this process may run on (Python 3.13's ``os.process_cpu_count()``)."""
    # Linux only: macOS and the BSDs have no affinity call in `os`; there every CPU counts.
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # None: the platform cannot tell


class ConfigError(Exception):
    """A configuration mistake: reported as one line, never with a traceback."""


# PostgreSQL's lock_timeout and statement_timeout are int4 milliseconds; 0 is "no limit".
POSTGRES_MAX_MS = 2**31 - 1
POSTGRES_MAX_SECONDS = POSTGRES_MAX_MS / 1000


def postgres_ms(seconds: float) -> int:
    """Seconds as PostgreSQL's whole milliseconds, rounded up: any positive value is at least 1 ms,
    never the 0 that PostgreSQL reads as "no limit". 0 stays 0 (where a setting documents it)."""
    # Through the decimal as written, so 0.007 s is 7 ms, not 8 (0.007 * 1000 is 7.000000000000001).
    return math.ceil(Decimal(repr(seconds)) * 1000)


class Settings(BaseSettings):
    # No "inf" or "nan": an infinite timeout would mean "no limit", which only a documented 0 may say.
    model_config = SettingsConfigDict(env_prefix="KRAKEN_", extra="ignore", frozen=True, allow_inf_nan=False)

    env: Literal["development", "production"] = "development"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    log_format: LogFormat = "text"
    # Processes serving requests under `kraken-backend`: one per CPU this process may run on.
    workers: int = Field(default_factory=usable_cpus, ge=1, le=512)
    # Seconds requests in flight get to finish after SIGTERM before they are cut off.
    shutdown_grace: int = Field(default=20, ge=0, le=3600)

    # Unprefixed names: these are the conventional variables deployments already set.
    database_url: SecretStr | None = Field(default=None, validation_alias="DATABASE_URL")
    migrations_database_url: SecretStr | None = Field(default=None, validation_alias="MIGRATIONS_DATABASE_URL")
    embedded_pgdata: Path = PROJECT_ROOT / ".kraken" / "pgdata"

    # Boot-time migrations.
    migrate_on_startup: Literal["upgrade", "check", "off"] = "upgrade"
    schema_ahead: Literal["serve", "refuse"] = "serve"
    db_connect_timeout: float = Field(default=30.0, ge=0)
    migration_lock_timeout: float = Field(default=60.0, ge=0)
    # PostgreSQL timeouts (postgres_ms()): lock_timeout has no "no limit"; statement_timeout's is 0.
    ddl_lock_timeout: float = Field(default=5.0, gt=0, le=POSTGRES_MAX_SECONDS)
    ddl_statement_timeout: float = Field(default=1800.0, ge=0, le=POSTGRES_MAX_SECONDS)
    ddl_lock_retries: int = Field(default=4, ge=0)
    # Seconds each wait of a concurrent index build (or drop, or a constraint's validation) may last:
    # their locks block no read or write, so they wait for older transactions instead of failing
    # within ddl_lock_timeout. 0: no limit.
    index_build_timeout: float = Field(default=1800.0, ge=0, le=POSTGRES_MAX_SECONDS)
    # Applied revisions whose files changed since: stop the run, warn, or do not check.
    migration_validate: Literal["error", "warn", "off"] = "error"

    # Service engine.
    db_pool_size: int = Field(default=10, ge=1)
    db_max_overflow: int = Field(default=10, ge=0)
    # Seconds a request waits for a pooled connection before it answers 503 (the pool is busy).
    db_pool_timeout: float = Field(default=5.0, gt=0)
    # Seconds one request statement may run before it is cancelled and the request answers 504;
    # 0: no limit. Turns are written in milliseconds; a chat client gives up after seconds.
    db_statement_timeout: float = Field(default=10.0, ge=0)
    # Off behind transaction-pooling proxies (PgBouncer), where prepared statements break.
    db_statement_cache: bool = True

    # The conversation API.
    api_key: SecretStr | None = None
    # A tool result whose compact JSON is longer than this many bytes is stored truncated.
    tool_result_max_bytes: int = Field(default=10240, ge=256, le=16 * 1024 * 1024)
    # Request bodies over this many bytes are refused with 413 before they are parsed.
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)

    # Browser pages on these origins may read the shared view (GET) across origins; "*": any origin.
    # Comma-separated in the environment; none (the default): no CORS headers at all.
    cors_origins: Annotated[tuple[str, ...], NoDecode] = ()

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        origins = tuple(part.strip() for part in value.split(",") if part.strip())
        if "*" in origins and len(origins) > 1:
            raise ValueError("* (any origin) stands alone, without other origins")
        for origin in origins:
            if origin != "*" and not _ORIGIN.match(origin.lower()):
                raise ValueError(
                    f"{origin!r} is not an origin: scheme://host[:port] without a path, "
                    "like https://share.example.com, or * for any"
                )
        # Browsers send scheme and host in lower case; the comparison is exact.
        return tuple(origin.lower() for origin in origins)

    # GET /metrics and the instrumentation behind it (on|off; pydantic also takes true/false).
    metrics: bool = True

    @field_validator("database_url", "migrations_database_url", "api_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("api_key")
    @classmethod
    def _header_safe(cls, value: SecretStr | None) -> SecretStr | None:
        # A key a client cannot send verbatim in an Authorization header would lock everyone out.
        if value is not None and not all("!" <= ch <= "~" for ch in value.get_secret_value()):
            raise ValueError("must be printable ASCII without spaces")
        return value

    def database_target(self) -> DatabaseTarget | None:
        """The service's database, or None when the embedded server should be used."""
        return _parse(self.database_url, "DATABASE_URL")

    def migrations_target(self) -> DatabaseTarget | None:
        """Where migrations run: MIGRATIONS_DATABASE_URL, falling back to DATABASE_URL."""
        if self.migrations_database_url is not None:
            return _parse(self.migrations_database_url, "MIGRATIONS_DATABASE_URL")
        return self.database_target()


def _parse(secret: SecretStr | None, variable: str) -> DatabaseTarget | None:
    if secret is None:
        return None
    try:
        return parse_database_url(secret.get_secret_value(), variable=variable)
    except DatabaseUrlError as exc:
        raise ConfigError(str(exc)) from None


def _describe(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        name = str(item["loc"][0]) if item["loc"] else "?"
        variable = name.upper() if name.isupper() else f"KRAKEN_{name.upper()}"
        problems.append(f"{variable}: {item['msg']}")
    return "; ".join(problems)


def load_settings() -> Settings:
    """Read and validate the environment; raise ConfigError with one line on a mistake."""
    try:
        settings = Settings()
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    # Parse the URLs now so a bad one fails at start, not at first use.
    settings.database_target()
    settings.migrations_target()
    if settings.migrations_database_url is not None and settings.database_url is None:
        # The service would serve the embedded database while migrations went elsewhere.
        raise ConfigError("MIGRATIONS_DATABASE_URL is set but DATABASE_URL is not; set both or neither")
    if settings.env == "production" and settings.database_url is None:
        raise ConfigError("DATABASE_URL is not set; KRAKEN_ENV=production requires a database URL")
    return settings


def check_serving(settings: Settings) -> None:
    """What only the HTTP service needs; the alembic CLI on a deploy host does without it."""
    if settings.env == "production" and settings.api_key is None:
        raise ConfigError("KRAKEN_API_KEY is not set; KRAKEN_ENV=production requires an API key for writes")


@cache
def get_settings() -> Settings:
    return load_settings()


async def resolve_target(settings: Settings, *, migrations: bool = False) -> DatabaseTarget:
    """The configured database (the migrations' one with ``migrations``), or the embedded one when
    DATABASE_URL is unset."""
    target = settings.migrations_target() if migrations else settings.database_target()
    if target is not None:
        return target
    try:
        return await embedded_database(settings.embedded_pgdata)
    except DatabaseUrlError as exc:  # the embedded server is not installed
        raise ConfigError(str(exc)) from None
