"""What routes depend on: the request's database session, settings, the API key check, conversation ids.

All ``async def``, also those that do not await: FastAPI runs plain ``def`` dependencies in a
worker thread, a hand-off that costs more than any of them.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Header, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import WithJsonSchema
from pydantic.config import JsonDict
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.api.errors import FaultLog, api_error
from backend.config import Settings


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One session per request: committed if the handler succeeds, rolled back if it raises.

    The conversation service sends single statements straight through the session's asyncpg
    connection (no BEGIN): each commits on its own, and joins the transaction when one is open.
    """
    factory: async_sessionmaker[AsyncSession] = request.app.state.session_factory
    async with factory() as session:
        try:
            yield session
            await session.commit()
        except BaseException:
            await session.rollback()
            raise
    faults: FaultLog = request.app.state.fault_log
    faults.cleared()


# scope="function": commit before the response is sent. With FastAPI's default ("request") the
# client could get 201 for a write that is not committed yet (or never will be), and a next
# request could miss it.
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]


async def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]

_bearer = HTTPBearer(auto_error=False, description="The value of KRAKEN_API_KEY (when it is set).")


async def require_api_key(
    settings: SettingsDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """Writes, deletes, listing and usage: ``Authorization: Bearer <KRAKEN_API_KEY>`` when a key is set."""
    if settings.api_key is None:
        return
    if credentials is None:
        raise _unauthorized("missing 'Authorization: Bearer <key>' header")
    # Hashing first makes the comparison constant-time in the key's length too.
    given = hashlib.sha256(credentials.credentials.encode()).digest()
    expected = hashlib.sha256(settings.api_key.get_secret_value().encode()).digest()
    if not hmac.compare_digest(given, expected):
        raise _unauthorized("invalid API key")


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
