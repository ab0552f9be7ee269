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
from backend.conversations.keys import OPERATOR, Caller, is_user_key
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


_bearer = HTTPBearer(
    auto_error=False,
    description="The operator's key (KRAKEN_API_KEY, when it is set), or a user's key (`kraken_...`, from "
    "POST /users): a user's key sees only that user's conversations.",
)

# Why a key is refused (the 401's msg).
MISSING_KEY = "missing 'Authorization: Bearer <key>' header"
INVALID_KEY = "invalid API key"


def identify(settings: Settings, given: str | None) -> Caller | str:
    """Who ``given`` (the bearer credentials, None without any) names, or why it is refused.

    The operator's key is compared in constant time. A user's key (its prefix says so) is taken at
    its word here: the statement serving the request checks it against kraken_users, in the same
    round trip. Without KRAKEN_API_KEY (development) the operator's routes are open as before:
    any other credentials, or none, are the operator; a user's key is still that user's.
    """
    if given is not None and settings.api_key is not None and key_matches(settings.api_key, given):
        return OPERATOR
    if given is not None and is_user_key(given):
        return Caller.user(given)
    if settings.api_key is None:
        return OPERATOR
    return MISSING_KEY if given is None else INVALID_KEY


async def require_api_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Caller:
    """Writes, deletes, listing and usage: ``Authorization: Bearer <key>``, the operator's or a user's."""
    caller = identify(app_settings(request), None if credentials is None else credentials.credentials)
    if isinstance(caller, str):
        raise unauthorized(caller)
    return caller


async def require_operator(caller: Annotated[Caller, Depends(require_api_key)]) -> None:
    """The user routes: the operator's key only (a user's is refused without being looked up)."""
    if not caller.is_operator:
        raise unauthorized("this route takes the operator's key (KRAKEN_API_KEY), not a user's")


def key_matches(api_key: SecretStr, given: str) -> bool:
    """Whether ``given`` is the API key."""
    # Hashing first makes the comparison constant-time in the key's length too.
    expected = hashlib.sha256(api_key.get_secret_value().encode()).digest()
    return hmac.compare_digest(hashlib.sha256(given.encode()).digest(), expected)


def unauthorized(msg: str) -> Exception:
    return api_error(401, ("header", "Authorization"), msg, "unauthorized", headers={"WWW-Authenticate": "Bearer"})


CallerDep = Annotated[Caller, Depends(require_api_key)]
RequireOperator = [Depends(require_operator)]


def optional_caller(request: Request) -> Caller | None:
    """The shared view's: None without bearer credentials (anyone with the id reads it, as before,
    whatever other Authorization a proxy may add); with them, who they name, as for the other
    routes (a wrong key: 401)."""
    # How HTTPBearer reads the header (fastapi.security.http): "<scheme> <credentials>", any case.
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    caller = identify(app_settings(request), credentials.strip())
    if isinstance(caller, str):
        raise unauthorized(caller)
    return caller


def parse_id(value: str, name: str, what: str) -> uuid.UUID:
    """Ids are UUIDs; anything else names nothing, so 404 like an unknown one (not 422)."""
    try:
        return uuid.UUID(value)
    except ValueError:
        raise api_error(404, ("path", name), f"no {what} with this id", "not_found") from None


async def parse_conversation_id(
    conversation_id: Annotated[
        str, Path(description="The conversation's id, a UUID. Any other value names no conversation: 404.")
    ],
) -> uuid.UUID:
    return parse_id(conversation_id, "conversation_id", "conversation")


ConversationId = Annotated[uuid.UUID, Depends(parse_conversation_id)]


async def parse_user_id(
    user_id: Annotated[str, Path(description="The user's id, a UUID. Any other value names no user: 404.")],
) -> uuid.UUID:
    return parse_id(user_id, "user_id", "user")


UserId = Annotated[uuid.UUID, Depends(parse_user_id)]


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
