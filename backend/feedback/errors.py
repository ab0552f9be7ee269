"""The feedback routes' refusals; ``backend/api/errors.py`` maps each to an HTTP status."""

from __future__ import annotations

from backend.conversations.errors import ConversationError


class TurnNotFound(ConversationError):
    def __init__(self) -> None:
        super().__init__("the conversation has no turn with this number")


class FeedbackNotFound(ConversationError):
    def __init__(self) -> None:
        super().__init__("this turn has no feedback")


class ExportOperatorOnly(ConversationError):
    """GET /feedback: every user's feedback, for the operator's evaluations."""

    def __init__(self) -> None:
        super().__init__("GET /feedback takes the operator's key (KRAKEN_API_KEY), not a user's")
