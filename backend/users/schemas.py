"""What the user routes take and answer."""

from __future__ import annotations

import uuid

from pydantic import BaseModel, Field

from backend.conversations.schemas import Name, UtcTimestamp, _Input


class UserCreate(_Input):
    name: Name


class UserPublic(BaseModel):
    id: uuid.UUID
    name: str
    created_at: UtcTimestamp
    last_active: UtcTimestamp | None = Field(
        description="When the user's key last served a request, to the minute: written at most once a minute "
        "per user (null: never)."
    )
    is_active: bool = Field(description="false once deactivated: the key answers 401 from then on.")


class UserWithKey(UserPublic):
    api_key: str = Field(
        description="The user's key, for `Authorization: Bearer <key>`. Shown only in this answer: it is stored "
        "as its SHA-256 and cannot be read back; a lost key is replaced by rotating it."
    )


class UserList(BaseModel):
    items: list[UserPublic] = Field(description="Every user, oldest first.")
