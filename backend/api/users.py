"""Users and their keys: the operator's routes (KRAKEN_API_KEY only; open without one, as every
operator route is in development)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response, status

from backend.api.deps import ConnectionDep, RequireOperator, UserId
from backend.api.errors import documented
from backend.api.openapi import link
from backend.users import service
from backend.users.schemas import UserCreate, UserList, UserPublic, UserWithKey

router = APIRouter(prefix="/users", tags=["users"], dependencies=RequireOperator)


def _about_users(*status_codes: int) -> dict[int | str, dict[str, Any]]:
    """``documented`` with a 404 and a 409 about users, not conversations."""
    responses = documented(*status_codes)
    if 404 in responses:
        responses[404] = responses[404] | {
            "description": 'No user with this id, also for an id that is not a UUID (`loc` `["path", "user_id"]`).'
        }
    if 409 in responses:
        responses[409] = responses[409] | {"description": "The user is deactivated (`user_deactivated`)."}
    return responses


_BY_ID = {"user_id": "$response.body#/id"}
_USER_LINKS = {
    "links": {
        "RotateKey": link("rotate_key", **_BY_ID),
        "DeactivateUser": link("deactivate_user", **_BY_ID),
    }
}


@router.post("", status_code=status.HTTP_201_CREATED, responses={**documented(400, 401, 413, 422), 201: _USER_LINKS})
async def create_user(body: UserCreate, conn: ConnectionDep, response: Response) -> UserWithKey:
    """A user with a key of their own: the answer holds the key, which is shown this once.

    The key authenticates the conversation routes as that user: what it creates is the user's, and
    it reads, appends to, ends, deletes, lists and sums only the user's conversations.
    """
    _not_stored(response)
    return await service.create_user(conn, body.name)


@router.get("", responses=documented(401))
async def list_users(conn: ConnectionDep) -> UserList:
    """Every user, oldest first (keys are never shown again)."""
    return UserList(items=await service.list_users(conn))


@router.post("/{user_id}/keys", responses={**_about_users(401, 404, 409), 200: _USER_LINKS})
async def rotate_key(user_id: UserId, conn: ConnectionDep, response: Response) -> UserWithKey:
    """A new key for the user, shown this once; the old key answers 401 to every request that
    starts from this answer on (one already running when it came may finish)."""
    _not_stored(response)
    return await service.rotate_key(conn, user_id)


def _not_stored(response: Response) -> None:
    """An answer that holds a key: no cache on the way (a proxy, the client's) may keep a copy."""
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"


@router.post("/{user_id}/deactivate", responses=_about_users(401, 404))
async def deactivate_user(user_id: UserId, conn: ConnectionDep) -> UserPublic:
    """The user's key answers 401 to every request that starts from this answer on (one already
    running when it came may finish); the user's conversations stay. Idempotent; there is no way
    back (create a new user)."""
    return await service.deactivate(conn, user_id)
