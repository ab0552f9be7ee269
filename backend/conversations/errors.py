"""The conversation domain's refusals; ``backend/api/errors.py`` maps each to an HTTP status."""

from __future__ import annotations


class ConversationError(Exception):
    """A request this service refuses; the message is for the client."""


class ConversationNotFound(ConversationError):
    def __init__(self) -> None:
        super().__init__("no conversation with this id")


class ConversationEnded(ConversationError):
    def __init__(self, status: str) -> None:
        super().__init__(f"the conversation has ended (status {status}); it takes no more turns")


class TotalsFull(ConversationError):
    """Adding the turn would take a conversation total past what its column holds."""

    def __init__(self, total: str, limit: object) -> None:
        super().__init__(f"adding this turn would take the conversation's {total} past {limit}")
        self.total = total


class TurnRejected(ConversationError):
    """The database refused part of the turn (a constraint); nothing of it was stored."""

    def __init__(self, constraint: str | None) -> None:
        super().__init__(f"the database refused the turn (constraint {constraint or 'unknown'}); nothing was stored")
        self.constraint = constraint


class InvalidCursor(ConversationError):
    def __init__(self) -> None:
        super().__init__("not a cursor this service issued; pass next_cursor from the previous page")


class IdempotencyKeyReused(ConversationError):
    def __init__(self) -> None:
        super().__init__(
            "this Idempotency-Key was used with another request; send a new key for a new request, "
            "or the same request to get what the key stored"
        )


class InvalidKey(ConversationError):
    """A user's key that names no active user: never issued, rotated since, or its user deactivated."""

    def __init__(self) -> None:
        super().__init__("invalid API key")


class OperatorOnly(ConversationError):
    """What only the operator's key (KRAKEN_API_KEY) may ask."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} takes the operator's key (KRAKEN_API_KEY), not a user's")
