"""The user routes' refusals; ``backend/api/errors.py`` maps each to an HTTP status."""

from __future__ import annotations

from backend.conversations.errors import ConversationError


class UserNotFound(ConversationError):
    def __init__(self) -> None:
        super().__init__("no user with this id")


class UserDeactivated(ConversationError):
    def __init__(self) -> None:
        super().__init__("the user is deactivated; a deactivated user gets no key")
