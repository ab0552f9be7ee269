"""What clients send (``XCreate``) and what they get back (``XPublic``).

Every limit a client can run into is enforced here, so a bad request fails validation with the
field named before any SQL runs, and the database never sees a value it would refuse:

- strings: no NUL character (PostgreSQL ``text`` and ``jsonb`` cannot hold ``\\u0000``; we
  reject rather than escape, so whatever is accepted round-trips exactly) and no unpaired
  UTF-16 surrogate (not Unicode, cannot be encoded for PostgreSQL); lengths capped;
- numbers: strict types (no ``"12"`` or ``true`` for a count; ``12.0`` is the integer 12, as in
  JSON Schema, where a number without a fractional part is an integer), finite, within ranges
  that keep every column and every conversation total inside its SQL type;
- JSON (tool arguments and results): any JSON value, at most ``MAX_JSON_DEPTH`` deep, no NaN or
  Infinity, the same string rules inside (keys included); arguments capped in size, results
  truncated by the service instead (their limit is a setting).

The OpenAPI document is generated from these types and must state each rule exactly: what a
JSON Schema keyword can say is said by one (lengths, ranges, patterns, formats), with the
pattern defined here once and used by the check too; the rest is in a description.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    WithJsonSchema,
)
from pydantic.config import JsonDict
from pydantic_core import PydanticCustomError
from typing_extensions import TypeAliasType

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
# Turns per page of the shared view: the default serves ordinary conversations whole in one answer
# (clients written before paging keep working for them); the maximum bounds one answer's size (a
# turn can carry up to MAX_TOOL_CALLS tool results of KRAKEN_TOOL_RESULT_MAX_BYTES each).
DEFAULT_VIEW_TURNS = 200
MAX_VIEW_TURNS = 1000

# --- the forms OpenAPI states as patterns (JSON Schema regexes; also read by Python's re) -----

# Text PostgreSQL can store: no NUL, said as "does not match \u0000" (a pattern that spells out the
# allowed characters, ^[^\u0000]*$, would say the same, but fuzzers fold maxLength into it, and a
# repetition of a million is more than common regex engines compile). Unpaired surrogates are
# refused too, but no pattern names them portably: the description does.
NUL_PATTERN = r"\u0000"
STORABLE_TEXT: JsonDict = {"not": {"pattern": NUL_PATTERN}}
STORABLE_TEXT_RULE = "No NUL character (U+0000) and no unpaired UTF-16 surrogate: PostgreSQL cannot store them."
# cost_usd as a string: plain decimal notation, 0 to 1000 (as a JSON number, a minimum and a maximum say it).
COST_STRING_PATTERN = r"^(?:[0-9]{1,3}(?:\.[0-9]+)?|1000(?:\.0+)?)$"
# A listing cursor: a conversation's started_at in microseconds since 0001-01-01T00:00:00Z and its id.
CURSOR_PATTERN = r"^[0-9]{1,18}-[0-9a-f]{32}$"
# Usage bounds, each form a pattern: a date-time with an offset (RFC 3339), one without (UTC), or
# a date (its midnight UTC). Patterns, not only formats: a date-time without an offset has no
# format, so its pattern must name the days that exist (leap years included), and the others say
# what formats cannot: years 0001 to 9999 (what datetime holds), seconds 00 to 59 (no leap
# second), no date-time with an offset on the first or last of those days (the offset could carry
# it out of range in UTC).
_DATE = (
    r"(?!0000)(?:[0-9]{4}-(?:(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])|(?:0[13-9]|1[0-2])-(?:29|30)"
    r"|(?:0[13578]|1[02])-31)|(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
    r"-02-29)"
)
_TIME = r"T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]+)?"
USAGE_DATE_TIME_PATTERN = rf"^(?!0001-01-01|9999-12-31){_DATE}{_TIME}(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])$"
USAGE_UTC_DATE_TIME_PATTERN = rf"^{_DATE}{_TIME}$"
USAGE_DATE_PATTERN = rf"^{_DATE}$"
USAGE_TIME_PATTERNS = (USAGE_DATE_TIME_PATTERN, USAGE_UTC_DATE_TIME_PATTERN, USAGE_DATE_PATTERN)

EndStatus = Literal["completed", "abandoned", "error"]
# models.FEEDBACK_TYPES, the table's CHECK (the API refuses anything else before any SQL runs).
FeedbackType = Literal["positive", "negative"]
UsageGrouping = Literal["model", "day", "user"]


# --- text and JSON checks ------------------------------------------------------------------


# One encoder for every call: json.dumps builds a new one each time it is given options.
_COMPACT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def dumps(value: Any) -> str:
    """Compact JSON, the form whose UTF-8 length is a tool result's size."""
    return _COMPACT.encode(value)


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
    problem is named as a path. A first pass keeps no positions (the common case: nothing to
    refuse); a value it has any doubt about is walked again, keeping them.
    """
    if _plainly_storable(value):
        return value
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


def _plain_text(value: str) -> bool:
    """What check_text accepts, as a yes or no."""
    if "\x00" in value:
        return False
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _plainly_storable(value: Any) -> bool:
    """True when check_json has nothing to refuse in ``value``; False when it may (a subclass of a
    JSON type, say, which it may accept): then check_json's own walk decides."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    pop, push = stack.pop, stack.append
    while stack:
        node, depth = pop()
        kind = type(node)
        if kind is str:
            # _plain_text's test inlined for ASCII, the common case: a call per string costs more.
            if "\x00" in node or not (node.isascii() or _plain_text(node)):
                return False
        elif node is None or kind is bool or kind is int:
            continue
        elif kind is float:
            if not math.isfinite(node):
                return False
        elif kind is dict:
            if depth >= MAX_JSON_DEPTH:
                return False
            for key, item in node.items():
                if type(key) is not str or "\x00" in key or not (key.isascii() or _plain_text(key)):
                    return False
                kind = type(item)
                # Scalars checked here rather than pushed: most of a JSON value's nodes are leaves.
                if kind is str:
                    if "\x00" in item or not (item.isascii() or _plain_text(item)):
                        return False
                elif item is None or kind is bool or kind is int:
                    continue
                else:
                    push((item, depth + 1))
        elif kind is list:
            if depth >= MAX_JSON_DEPTH:
                return False
            for item in node:
                push((item, depth + 1))
        else:
            return False
    return True


def _json_integer(value: Any) -> Any:
    """JSON has one number type: 5.0 and 5e0 are the integer 5, as JSON Schema's ``integer`` reads them."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _check_cost_string(value: Any) -> Any:
    if isinstance(value, str) and not re.fullmatch(COST_STRING_PATTERN, value):
        raise PydanticCustomError(
            "decimal_string", "a decimal string from 0 to 1000 in plain notation (like 0.001234) is expected"
        )
    return value


def _check_usage_time(value: Any) -> Any:
    if isinstance(value, str) and any(re.fullmatch(pattern, value) for pattern in USAGE_TIME_PATTERNS):
        return value
    raise PydanticCustomError(
        "time_format", "a date-time (2025-03-01T12:00:00Z, UTC without an offset) or a date (2025-03-01) is expected"
    )


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

# check_text as OpenAPI states it.
_STORABLE = Field(json_schema_extra={**STORABLE_TEXT, "description": STORABLE_TEXT_RULE})
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS), _STORABLE, AfterValidator(check_text)]
LongText = Annotated[str, Field(max_length=MAX_TEXT_CHARS), _STORABLE, AfterValidator(check_text)]
Tokens = Annotated[int, Field(ge=0, le=MAX_TOKENS), BeforeValidator(_json_integer)]
# JSON numbers (or decimal strings) in, JSON numbers out: <= 10 significant digits, so a float
# carries them exactly.
Money = Annotated[Decimal, PlainSerializer(float, return_type=float, when_used="json")]
CostIn = Annotated[
    Decimal,
    Field(strict=False, ge=0, le=MAX_TURN_COST_USD, allow_inf_nan=False),
    BeforeValidator(_check_cost_string),
    AfterValidator(_to_microdollars),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0, "maximum": int(MAX_TURN_COST_USD)},
                {"type": "string", "pattern": COST_STRING_PATTERN},
            ],
            "description": "US dollars, rounded half-even to the microdollar (6 places) as stored.",
        },
        mode="validation",
    ),
]

# What check_json accepts, as JSON Schema. Its depth and size limits are not expressible there:
# the fields' descriptions give them.
_StorableKey = Annotated[str, Field(json_schema_extra=STORABLE_TEXT)]
StorableJson = TypeAliasType(  # type: ignore[misc]
    "StorableJson",
    None
    | bool
    | float
    | _StorableKey
    | list["StorableJson"]  # type: ignore[misc]
    | Annotated[
        dict[str, "StorableJson"],  # type: ignore[misc]
        Field(json_schema_extra={"propertyNames": STORABLE_TEXT}),
    ],
)


def as_utc(value: datetime) -> datetime:
    """``value`` as an aware UTC datetime: the one place times become what the code holds.

    A naive value is UTC wall-clock time: what a `timestamp without time zone` column holds
    (asyncpg reads those naive, `timestamptz` ones aware), and a usage bound without an offset or
    a date (its midnight). An aware one is converted.
    """
    # USAGE_DATE_TIME_PATTERN keeps the conversion of a usage bound inside the years datetime holds.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _utc_iso(value: datetime) -> str:
    # isoformat, not strftime: %Y does not zero-pad years before 1000, which RFC 3339 requires.
    return as_utc(value).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


# A stored time, `timestamp` (UTC wall-clock) or `timestamptz` alike, held as an aware UTC
# datetime; always shown with microseconds and a Z, the same text the shared view's SQL produces
# (TIMESTAMP_FORMAT in the service).
UtcTimestamp = Annotated[
    datetime,
    AfterValidator(as_utc),
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
    system_prompt_hash: Annotated[
        str, Field(min_length=1, max_length=MAX_HASH_CHARS), _STORABLE, AfterValidator(check_text)
    ]
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


# The ``cursor`` query parameter of a keyset page: ``next_cursor`` of the previous one, documented
# with its form; each query's field says what it is a position in.
CursorParameter = Annotated[str | None, WithJsonSchema({"type": "string", "pattern": CURSOR_PATTERN})]
CURSOR_DESCRIPTION = "`next_cursor` of the previous page. Any value of this form is a position in"


class ConversationListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    session_id: Name
    limit: Annotated[int, Field(ge=1, le=100)] = 20
    cursor: CursorParameter = Field(
        default=None,
        description=f"{CURSOR_DESCRIPTION} the listing: the page holds the conversations after it.",
    )


class ConversationPage(BaseModel):
    items: list[ConversationPublic]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


# --- turns and tool calls ------------------------------------------------------------------


_JSON_LIMITS = f"At most {MAX_JSON_DEPTH} levels of arrays and objects; numbers finite."


class ToolCallCreate(_Input):
    tool_name: Name
    tool_args: Annotated[Any, PlainValidator(_check_tool_args, json_schema_input_type=StorableJson)] = Field(
        description=f"Any JSON value. {_JSON_LIMITS} At most {MAX_TOOL_ARGS_BYTES} bytes as compact JSON."
    )
    tool_result: Annotated[Any, PlainValidator(check_json, json_schema_input_type=StorableJson)] = Field(
        description=f"Any JSON value. {_JSON_LIMITS} Stored truncated when its compact JSON is over "
        "KRAKEN_TOOL_RESULT_MAX_BYTES (see ToolCallPublic.tool_result)."
    )


class TurnCreate(_Input):
    user_query: LongText
    assistant_response: LongText
    model: Name
    input_tokens: Tokens
    output_tokens: Tokens
    cache_creation_tokens: Tokens = 0
    cache_read_tokens: Tokens = 0
    cost_usd: CostIn
    duration_ms: Annotated[int, Field(ge=0, le=MAX_DURATION_MS), BeforeValidator(_json_integer)]
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


class FeedbackPublic(BaseModel):
    """A turn's feedback (PUT /conversations/{id}/turns/{turn_number}/feedback)."""

    feedback_type: FeedbackType
    comment: str | None
    trace_id: str | None
    created_at: UtcTimestamp = Field(description="When the turn's feedback was first given; a replace keeps it.")
    updated_at: UtcTimestamp = Field(
        description="When it last changed: a PUT that changes nothing leaves it (created_at until a change)."
    )


class TurnView(TurnPublic):
    """A turn as the shared view shows it: with its feedback."""

    feedback: FeedbackPublic | None = Field(description="The turn's feedback; null when it has none.")


class ConversationViewQuery(BaseModel):
    """Which turns of the shared view: ``limit`` turns after turn number ``after_turn``."""

    model_config = ConfigDict(extra="forbid")

    after_turn: Annotated[
        int,
        Field(
            ge=0,
            le=MAX_TOTAL_TURNS,
            description="Turns numbered after this one: 0 (the default) for the first page, "
            "`next_after_turn` of the previous page for the next.",
        ),
    ] = 0
    limit: Annotated[
        int, Field(ge=1, le=MAX_VIEW_TURNS, description=f"At most this many turns (default {DEFAULT_VIEW_TURNS}).")
    ] = DEFAULT_VIEW_TURNS


class ConversationDetail(ConversationPublic):
    turns: list[TurnView] = Field(description="A page of the turns, in turn order (see `next_after_turn`).")
    next_after_turn: int | None = Field(
        description="Pass as `after_turn` for the next page of turns: the last turn number of this page when "
        "more turns follow; null when this page ends the conversation."
    )


# --- usage ---------------------------------------------------------------------------------


UsageTime = Annotated[
    datetime,
    BeforeValidator(_check_usage_time),
    AfterValidator(as_utc),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "format": "date-time", "pattern": USAGE_DATE_TIME_PATTERN},
                {"type": "string", "pattern": USAGE_UTC_DATE_TIME_PATTERN},
                {"type": "string", "format": "date", "pattern": USAGE_DATE_PATTERN},
            ]
        },
        mode="validation",
    ),
]
_USAGE_TIME_FORMS = (
    "An RFC 3339 date-time (2025-03-01T12:00:00Z, 2025-03-01T14:00:00+02:00), a date-time without an "
    "offset, read as UTC (2025-03-01T12:00:00), or a date, read as its midnight UTC (2025-03-01). Precision is "
    "a microsecond (further digits are dropped). Years 0001 to 9999; a date-time with an offset not on the "
    "first or last day of that range."
)


class UsageQuery(BaseModel):
    """An interval whose end is at or before its start is empty: it holds no turns."""

    model_config = ConfigDict(extra="forbid")

    start: UsageTime = Field(alias="from", description=f"Inclusive. {_USAGE_TIME_FORMS}")
    end: UsageTime = Field(alias="to", description=f"Exclusive. {_USAGE_TIME_FORMS}")
    group_by: UsageGrouping = "model"


class UsageGroup(BaseModel):
    key: str = Field(
        description="The model, the UTC day as YYYY-MM-DD, or the user's id (`shared`: the conversations of the "
        "operator's key)."
    )
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
