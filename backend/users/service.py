"""The users' SQL (kraken_users). One statement per operation; the key is made here and only its
hash goes to the database (``backend.conversations.keys``)."""

from __future__ import annotations

import uuid

import asyncpg

from backend.conversations.keys import key_hash, new_key
from backend.db.statements import Statement, fetch_all, fetch_one
from backend.users.errors import UserDeactivated, UserNotFound
from backend.users.schemas import UserPublic, UserWithKey

USER_COLUMNS = "id, name, created_at, last_active, is_active"

CREATE = Statement.of(f"""
INSERT INTO kraken_users (api_key_hash, name, created_at) VALUES (:api_key_hash, :name, clock_timestamp())
RETURNING {USER_COLUMNS}
""")
LIST = Statement.of(f"SELECT {USER_COLUMNS} FROM kraken_users ORDER BY created_at, id")
# The old hash is replaced in the same row: from this statement's commit on, the old key names no
# user, and every statement that checks a key reads the table afresh (no cache).
ROTATE = Statement.of(f"""
UPDATE kraken_users SET api_key_hash = :api_key_hash WHERE id = :id AND is_active
RETURNING {USER_COLUMNS}
""")
DEACTIVATE = Statement.of(f"UPDATE kraken_users SET is_active = false WHERE id = :id RETURNING {USER_COLUMNS}")
EXISTS = Statement.of("SELECT is_active FROM kraken_users WHERE id = :id")


async def create_user(conn: asyncpg.Connection, name: str) -> UserWithKey:
    key = new_key()
    row = await fetch_one(conn, CREATE, api_key_hash=key_hash(key), name=name)
    assert row is not None  # INSERT ... RETURNING
    return UserWithKey(**dict(row), api_key=key)


async def list_users(conn: asyncpg.Connection) -> list[UserPublic]:
    return [UserPublic.model_validate(dict(row)) for row in await fetch_all(conn, LIST)]


async def rotate_key(conn: asyncpg.Connection, user_id: uuid.UUID) -> UserWithKey:
    key = new_key()
    row = await fetch_one(conn, ROTATE, id=user_id, api_key_hash=key_hash(key))
    if row is None:
        if await fetch_one(conn, EXISTS, id=user_id) is None:
            raise UserNotFound()
        raise UserDeactivated()
    return UserWithKey(**dict(row), api_key=key)


async def deactivate(conn: asyncpg.Connection, user_id: uuid.UUID) -> UserPublic:
    """Idempotent: a deactivated user stays so (there is no way back: make a new user)."""
    row = await fetch_one(conn, DEACTIVATE, id=user_id)
    if row is None:
        raise UserNotFound()
    return UserPublic.model_validate(dict(row))
