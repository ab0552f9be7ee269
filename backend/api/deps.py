"""What routes depend on: the request's database connection, settings, the API key check, conversation ids.

All ``async def``, also those that do not await: FastAPI runs plain ``def`` dependencies in a
worker thread, a hand-off that costs more than any of them.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from typing import Annotated

import asyncpg
from fastapi import Depends, Header, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr, WithJsonSchema
from pydantic.config import JsonDict

from backend.api.errors import api_error
from backend.config import Settings
from backend.db.leases import Lease

# Where RequestContext keeps the request's Lease in the ASGI scope.
LEASE_SCOPE_KEY = "kraken.lease"


async def get_connection(request: Request) -> asyncpg.Connection:
    """The request's database connection, lent from the pool on first use (``backend.db.leases``).

    Not a yield dependency: RequestContext gives it back after the response, which costs less than
    FastAPI's exit stack; and each statement commits on its own, so there is nothing to commit first.
    """
    lease: Lease = request.scope[LEASE_SCOPE_KEY]
    return await lease.connection()


ConnectionDep = Annotated[asyncpg.Connection, Depends(get_connection)]


def app_settings(request: Request) -> Settings:
    """The app's settings. Read from the request, not as a dependency: FastAPI solves every
    dependency of every request anew, which costs more on the write path than the check itself."""
    settings: Settings = request.app.state.settings
    return settings


_bearer = HTTPBearer(auto_error=False, description="The value of KRAKEN_API_KEY (when it is set).")


async def require_api_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """Writes, deletes, listing and usage: ``Authorization: Bearer <KRAKEN_API_KEY>`` when a key is set."""
    settings = app_settings(request)
    if settings.api_key is None:
        return
    if credentials is None:
        raise _unauthorized("missing 'Authorization: Bearer <key>' header")
    if not key_matches(settings.api_key, credentials.credentials):
        raise _unauthorized("invalid API key")


def key_matches(api_key: SecretStr, given: str) -> bool:
    """Whether ``given`` is the API key."""
    # Hashing first makes the comparison constant-time in the key's length too.
    expected = hashlib.sha256(api_key.get_secret_value().encode()).digest()
    return hmac.compare_digest(hashlib.sha256(given.encode()).digest(), expected)


def _unauthorized(msg: str) -> Exception:
    return api_error(401, ("header", "Authorization"), msg, "unauthorized", headers={"WWW-Authenticate": "Bearer"})


RequireApiKey = [Depends(require_api_key)]


async def parse_conversation_id(
    conversation_id: Annotated[
        str, Path(description="The conversation's id, a UUID. Any other value names no conversation: 404.")
    ],
) -> uuid.UUID:
    """Ids are UUIDs; anything else names no conversation, so 404 like an unknown one (not 422)."""
    try:
        return uuid.UUID(conversation_id)
    except ValueError:
        raise api_error(404, ("path", "conversation_id"), "no conversation with this id", "not_found") from None


ConversationId = Annotated[uuid.UUID, Depends(parse_conversation_id)]


# A client's key for retrying a create or an append safely (the IETF draft's Idempotency-Key):
# 1 to 255 printable ASCII characters, no spaces.
IDEMPOTENCY_KEY_PATTERN = r"^[!-~]{1,255}$"
_IDEMPOTENCY_KEY_SCHEMA: JsonDict = {
    "type": "string",
    "minLength": 1,
    "maxLength": 255,
    "pattern": IDEMPOTENCY_KEY_PATTERN,
}
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        pattern=IDEMPOTENCY_KEY_PATTERN,
        min_length=1,
        max_length=255,
        description="Makes a retry safe: a request with the key and body of an earlier one answers that "
        "one's 201 again and stores nothing; with another body it is a 409 of type `idempotency_key_reused` "
        '(`loc` `["header", "Idempotency-Key"]`). Keys live as long as their conversation.',
    ),
    # A header is absent or a string: not the `null` FastAPI would document for `| None`.
    WithJsonSchema(_IDEMPOTENCY_KEY_SCHEMA),
]
