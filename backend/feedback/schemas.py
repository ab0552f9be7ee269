"""What the feedback routes take and answer."""

from __future__ import annotations

import uuid
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from backend.conversations.schemas import (
    _STORABLE,
    _USAGE_TIME_FORMS,
    CURSOR_DESCRIPTION,
    CursorParameter,
    FeedbackPublic,
    FeedbackType,
    Name,
    UsageTime,
    _Input,
    check_text,
)

# A comment is a sentence or a paragraph from a person rating an answer, not a document.
MAX_COMMENT_CHARS = 10_000
# Feedback per page of the export; a page's rows are small (a comment is at most MAX_COMMENT_CHARS).
DEFAULT_EXPORT_PAGE = 100
MAX_EXPORT_PAGE = 500

Comment = Annotated[str, Field(max_length=MAX_COMMENT_CHARS), _STORABLE, AfterValidator(check_text)]


class FeedbackPut(_Input):
    """The whole feedback: a PUT replaces what the turn had (a field left out is null)."""

    feedback_type: FeedbackType
    comment: Comment | None = None
    trace_id: Name | None = Field(
        default=None, description="The tracing system's id of the answer's trace (1 to 255 characters)."
    )


class FeedbackExported(FeedbackPublic):
    id: uuid.UUID
    conversation_id: uuid.UUID
    turn_id: uuid.UUID
    turn_number: int


class FeedbackExportQuery(BaseModel):
    """Bounds on created_at, read by GET /usage's own type (``UsageTime``): one rule for both."""

    model_config = ConfigDict(extra="forbid")

    start: UsageTime | None = Field(
        default=None, alias="from", description=f"Inclusive, on created_at. {_USAGE_TIME_FORMS}"
    )
    end: UsageTime | None = Field(
        default=None, alias="to", description=f"Exclusive, on created_at. {_USAGE_TIME_FORMS}"
    )
    feedback_type: FeedbackType | None = None
    limit: Annotated[int, Field(ge=1, le=MAX_EXPORT_PAGE)] = DEFAULT_EXPORT_PAGE
    cursor: CursorParameter = Field(
        default=None, description=f"{CURSOR_DESCRIPTION} the export: the page holds the feedback after it."
    )


class FeedbackPage(BaseModel):
    items: list[FeedbackExported] = Field(description="Newest first: created_at, then id, descending.")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")
