"""What clients send (``XCreate``) and what they get back (``XPublic``).

Every limit a client can run into is enforced here, so a bad request fails validation with the
field named before any SQL runs, and the database never sees a value it would refuse:

- strings: no NUL character (PostgreSQL ``text`` and ``jsonb`` cannot hold ``\\u0000``; we
  reject rather than escape, so whatever is accepted round-trips exactly) and no unpaired
  UTF-16 surrogate (not Unicode, cannot be encoded for PostgreSQL); lengths capped;
- numbers: strict types (no ``"12"`` or ``true`` for a count), finite, within ranges that keep
  every column and every conversation total inside its SQL type;
- JSON (tool arguments and results): any JSON value, at most ``MAX_JSON_DEPTH`` deep, no NaN or
  Infinity, the same string rules inside (keys included); arguments capped in size, results
  truncated by the service instead (their limit is a setting).
"""

from __future__ import annotations

import json
import math
import uuid
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)
from pydantic_core import PydanticCustomError

# --- limits --------------------------------------------------------------------------------

MAX_NAME_CHARS = 255  # session_id, model, agent_version, tool_name
MAX_HASH_CHARS = 16  # kraken_conversations.system_prompt_hash is varchar(16)
MAX_TEXT_CHARS = 1_000_000  # user_query, assistant_response
MAX_TOKENS = 10_000_000  # per count, per turn: far above any model's context window
MAX_DURATION_MS = 86_400_000  # one day
MAX_TURN_COST_USD = Decimal(1000)
MAX_TOOL_CALLS = 256
MAX_JSON_DEPTH = 64
MAX_TOOL_ARGS_BYTES = 256 * 1024
# What the conversation totals' SQL types can hold (integer, numeric(10,6)).
MAX_TOTAL_TOKENS = 2**31 - 1
MAX_TOTAL_TURNS = 2**31 - 1
MAX_TOTAL_COST_USD = Decimal("9999.999999")
MICRODOLLAR = Decimal("0.000001")

EndStatus = Literal["completed", "abandoned", "error"]
UsageGrouping = Literal["model", "day"]


# --- text and JSON checks ------------------------------------------------------------------


def dumps(value: Any) -> str:
    """Compact JSON, the form whose UTF-8 length is a tool result's size."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def check_text(value: str, at: str = "") -> str:
    if "\x00" in value:
        raise PydanticCustomError(
            "nul_character",
            "NUL characters (\\u0000) cannot be stored{at}; remove or replace them",
            {"at": at},
        )
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise PydanticCustomError(
                "invalid_unicode", "unpaired UTF-16 surrogate{at}: not valid Unicode", {"at": at}
            ) from None
    return value


def _render_path(trail: tuple[Any, ...] | None) -> str:
    """``$["key"][3]`` for a position inside a JSON value, keys shortened."""
    parts: list[str] = []
    while trail is not None:
        trail, step = trail
        if isinstance(step, int):
            parts.append(f"[{step}]")
        else:
            parts.append(f"[{json.dumps(step[:40] + ('...' if len(step) > 40 else ''))}]")
    return "$" + "".join(reversed(parts))


def check_json(value: Any) -> Any:
    """Refuse what jsonb cannot store or we will not: NaN/Infinity, NUL, bad Unicode, deep nesting.

    Iterative, so a deeply nested value cannot exhaust the stack; the position of the first
    problem is named as a path. Paths are built only on error: results can have many nodes.
    """
    # (node, depth of its container, trail) where trail is (parent trail, key or index).
    stack: list[tuple[Any, int, tuple[Any, ...] | None]] = [(value, 0, None)]
    while stack:
        node, depth, trail = stack.pop()
        if isinstance(node, str):
            if "\x00" in node or not node.isascii():
                check_text(node, f" at {_render_path(trail)}")
        elif node is None or isinstance(node, bool | int):
            continue
        elif isinstance(node, float):
            if not math.isfinite(node):
                raise PydanticCustomError(
                    "finite_number",
                    "non-finite number at {at}: JSON has no NaN or Infinity",
                    {"at": _render_path(trail)},
                )
        elif isinstance(node, list | dict):
            if depth >= MAX_JSON_DEPTH:
                raise PydanticCustomError(
                    "json_too_deep",
                    "JSON nested deeper than {limit} levels at {at}",
                    {"limit": MAX_JSON_DEPTH, "at": _render_path(trail)},
                )
            if isinstance(node, list):
                stack.extend((item, depth + 1, (trail, i)) for i, item in enumerate(node))
            else:
                for key, item in node.items():
                    if not isinstance(key, str):
                        raise PydanticCustomError("json_type", "JSON object keys must be strings")
                    if "\x00" in key or not key.isascii():
                        check_text(key, f" in a key at {_render_path(trail)}")
                    stack.append((item, depth + 1, (trail, key)))
        else:
            raise PydanticCustomError("json_type", "not a JSON value at {at}", {"at": _render_path(trail)})
    return value


def _check_tool_args(value: Any) -> Any:
    size = len(dumps(check_json(value)).encode())
    if size > MAX_TOOL_ARGS_BYTES:
        raise PydanticCustomError(
            "json_too_large",
            "tool_args is {size} bytes as compact JSON; the limit is {limit}",
            {"size": size, "limit": MAX_TOOL_ARGS_BYTES},
        )
    return value


def _to_microdollars(value: Decimal) -> Decimal:
    # The columns are numeric(10,6): round here, so the response shows what is stored.
    return value.quantize(MICRODOLLAR, rounding=ROUND_HALF_EVEN)


# --- field types ---------------------------------------------------------------------------

Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS), AfterValidator(check_text)]
LongText = Annotated[str, Field(max_length=MAX_TEXT_CHARS), AfterValidator(check_text)]
Tokens = Annotated[int, Field(ge=0, le=MAX_TOKENS)]
# JSON numbers (or decimal strings) in, JSON numbers out: <= 10 significant digits, so a float
# carries them exactly.
Money = Annotated[Decimal, PlainSerializer(float, return_type=float, when_used="json")]
CostIn = Annotated[
    Decimal,
    Field(strict=False, ge=0, le=MAX_TURN_COST_USD, allow_inf_nan=False),
    AfterValidator(_to_microdollars),
]


def _utc_iso(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# Stored as UTC wall-clock time (timestamp without time zone); always shown with microseconds
# and a Z, the same text the shared view's SQL produces (TIMESTAMP_FORMAT in the service).
UtcTimestamp = Annotated[
    datetime,
    PlainSerializer(_utc_iso, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "format": "date-time"}, mode="serialization"),
]


class _Input(BaseModel):
    # strict: a count is a JSON integer, a string a JSON string; nothing is coerced.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# --- conversations -------------------------------------------------------------------------


class ConversationCreate(_Input):
    session_id: Name
    model: Name
    system_prompt_hash: Annotated[str, Field(min_length=1, max_length=MAX_HASH_CHARS), AfterValidator(check_text)]
    agent_version: Name


class ConversationEnd(_Input):
    status: EndStatus


class ConversationPublic(BaseModel):
    id: uuid.UUID
    session_id: str
    model: str
    system_prompt_hash: str
    agent_version: str
    # Not a Literal: rows that predate this service may hold other values, and reading them must not fail.
    status: str = Field(description="active, completed, abandoned or error.")
    started_at: UtcTimestamp
    ended_at: UtcTimestamp | None
    total_turns: int
    total_tokens: int
    total_cost_usd: Money


class ConversationListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    session_id: Name
    limit: Annotated[int, Field(ge=1, le=100)] = 20
    cursor: Annotated[str | None, Field(max_length=200, description="`next_cursor` of the previous page.")] = None


class ConversationPage(BaseModel):
    items: list[ConversationPublic]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


# --- turns and tool calls ------------------------------------------------------------------


class ToolCallCreate(_Input):
    tool_name: Name
    tool_args: Annotated[Any, AfterValidator(_check_tool_args)]
    tool_result: Annotated[Any, AfterValidator(check_json)]


class TurnCreate(_Input):
    user_query: LongText
    assistant_response: LongText
    model: Name
    input_tokens: Tokens
    output_tokens: Tokens
    cache_creation_tokens: Tokens = 0
    cache_read_tokens: Tokens = 0
    cost_usd: CostIn
    duration_ms: Annotated[int, Field(ge=0, le=MAX_DURATION_MS)]
    tool_calls: Annotated[list[ToolCallCreate], Field(max_length=MAX_TOOL_CALLS)] = []


class ToolCallPublic(BaseModel):
    id: uuid.UUID
    sequence_order: int = Field(description="1 for the turn's first tool call.")
    tool_name: str
    tool_args: Any
    tool_result: Any = Field(
        description="As sent, or when result_truncated: {original_size_bytes, preview} where preview is "
        "the start of the result's compact JSON text."
    )
    result_truncated: bool


class TurnPublic(BaseModel):
    id: uuid.UUID
    conversation_id: uuid.UUID
    turn_number: int = Field(description="1 for the conversation's first turn; assigned by the server.")
    user_query: str
    assistant_response: str
    model: str
    input_tokens: int
    output_tokens: int
    cache_creation_tokens: int
    cache_read_tokens: int
    cost_usd: Money
    duration_ms: int
    tool_calls_count: int
    created_at: UtcTimestamp
    tool_calls: list[ToolCallPublic]


class ConversationDetail(ConversationPublic):
    turns: list[TurnPublic]


# --- usage ---------------------------------------------------------------------------------


def _as_utc(value: datetime) -> datetime:
    """Naive times are taken as UTC; aware ones converted. Stored times are naive UTC."""
    if value.tzinfo is None:
        return value
    try:
        return value.astimezone(UTC).replace(tzinfo=None)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00
        raise PydanticCustomError("datetime_range", "time is out of range once converted to UTC") from None


class UsageQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    start: Annotated[datetime, AfterValidator(_as_utc)] = Field(
        alias="from", description="Inclusive; ISO 8601. Without an offset, UTC."
    )
    end: Annotated[datetime, AfterValidator(_as_utc)] = Field(
        alias="to", description="Exclusive; ISO 8601. Without an offset, UTC."
    )
    group_by: UsageGrouping = "model"

    @field_validator("end")
    @classmethod
    def _after_start(cls, end: datetime, info: ValidationInfo) -> datetime:
        start = info.data.get("start")
        if start is not None and end <= start:
            raise PydanticCustomError("time_range", "`to` must be later than `from`")
        return end


class UsageGroup(BaseModel):
    key: str = Field(description="The model, or the UTC day as YYYY-MM-DD.")
    turns: int
    input_tokens: int
    output_tokens: int
    cache_creation_tokens: int
    cache_read_tokens: int
    total_tokens: int = Field(description="input_tokens + output_tokens, as in the conversation totals.")
    cost_usd: Money


class UsageReport(BaseModel):
    start: UtcTimestamp = Field(serialization_alias="from")
    end: UtcTimestamp = Field(serialization_alias="to")
    group_by: UsageGrouping
    groups: list[UsageGroup]
