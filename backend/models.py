"""SQLAlchemy models of the KRAKEN tables.

They mirror the migrations exactly (``alembic check`` must find nothing to generate); the
migrations, not ``create_all``, are what build the schema.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any, ClassVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# PostgreSQL's own default names, which the baseline (and so production) already uses.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "%(table_name)s_%(column_0_N_name)s_key",
    "ck": "%(table_name)s_%(constraint_name)s_check",
    "fk": "%(table_name)s_%(column_0_name)s_fkey",
    "pk": "%(table_name)s_pkey",
}

_ZERO = text("0")


# Column.info flag: the column holds a count or an amount, so the table checks it is >= 0.
NON_NEGATIVE = "non_negative"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    # A column typed by its annotation alone gets the type squawk prefers for a new revision
    # (backend/alembic/README.md, "Writing a revision"). The tables of 001 give their types.
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        str: Text,
        int: BigInteger,
        datetime: DateTime(timezone=True),
    }

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)  # maps the class: its table exists from here on
        table = cls.__table__
        assert isinstance(table, Table)
        for column in table.columns:
            if column.info.get(NON_NEGATIVE):
                # Named "<column>", which the convention turns into PostgreSQL's own "<table>_<column>_check".
                table.append_constraint(CheckConstraint(f"{column.name} >= 0", name=column.name))


# Idempotency-Key columns (revision 003): the client's key, and the sha256 of the request it came
# with; unique among the rows that have one (a conversation's key overall, a turn's within its
# conversation), by partial unique indexes.
_WITH_A_KEY = text("idempotency_key IS NOT NULL")


def _idempotency_key() -> Mapped[str | None]:
    return mapped_column(Text, nullable=True)


def _idempotency_fingerprint() -> Mapped[bytes | None]:
    return mapped_column(LargeBinary, nullable=True)


def _uuid_pk() -> Mapped[uuid.UUID]:
    return mapped_column(Uuid, primary_key=True, server_default=func.gen_random_uuid())


def _counter() -> Mapped[int]:
    return mapped_column(Integer, nullable=False, server_default=_ZERO, info={NON_NEGATIVE: True})


def _money() -> Mapped[Decimal]:
    return mapped_column(Numeric(10, 6), nullable=False, server_default=_ZERO, info={NON_NEGATIVE: True})


class User(Base):
    """Who holds a key of their own (issue 20): the key itself is never stored, only its SHA-256."""

    __tablename__ = "kraken_users"

    id: Mapped[uuid.UUID] = _uuid_pk()
    api_key_hash: Mapped[bytes] = mapped_column(LargeBinary, unique=True)
    name: Mapped[str]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    # Written at most once a minute per user (backend/conversations/service.py, CALLER).
    last_active: Mapped[datetime | None]
    is_active: Mapped[bool] = mapped_column(server_default=text("true"))


class Conversation(Base):
    __tablename__ = "kraken_conversations"

    id: Mapped[uuid.UUID] = _uuid_pk()
    session_id: Mapped[str] = mapped_column(String, nullable=False, index=True)
    model: Mapped[str] = mapped_column(String, nullable=False)
    system_prompt_hash: Mapped[str] = mapped_column(String(16), nullable=False)
    agent_version: Mapped[str] = mapped_column(String, nullable=False)
    status: Mapped[str] = mapped_column(String, nullable=False, server_default=text("'active'"))
    # Indexed for recent-first listings (a b-tree serves ORDER BY started_at DESC too).
    started_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now(), index=True
    )
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    total_turns: Mapped[int] = _counter()
    total_tokens: Mapped[int] = _counter()
    total_cost_usd: Mapped[Decimal] = _money()
    idempotency_key: Mapped[str | None] = _idempotency_key()
    idempotency_fingerprint: Mapped[bytes | None] = _idempotency_fingerprint()
    # The user whose key created it; NULL: the operator's key (KRAKEN_API_KEY), as every row before issue 20.
    user_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("kraken_users.id"), nullable=True, index=True)

    __table_args__ = (
        Index("ix_kraken_conversations_idempotency_key", "idempotency_key", unique=True, postgresql_where=_WITH_A_KEY),
    )


class Turn(Base):
    __tablename__ = "kraken_turns"
    __table_args__ = (
        UniqueConstraint("conversation_id", "turn_number"),
        Index(
            "ix_kraken_turns_conversation_id_idempotency_key",
            "conversation_id",
            "idempotency_key",
            unique=True,
            postgresql_where=_WITH_A_KEY,
        ),
        # Revision 004: GET /usage reads a time range of these columns only, from the index alone.
        Index(
            "ix_kraken_turns_created_at",
            "created_at",
            postgresql_include=[
                "model",
                "input_tokens",
                "output_tokens",
                "cache_creation_tokens",
                "cache_read_tokens",
                "cost_usd",
            ],
        ),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    # No index of its own (dropped by 004): the unique (conversation_id, turn_number) one leads with it.
    conversation_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("kraken_conversations.id", ondelete="CASCADE"), nullable=False
    )
    turn_number: Mapped[int] = mapped_column(Integer, nullable=False)
    user_query: Mapped[str] = mapped_column(Text, nullable=False)
    assistant_response: Mapped[str] = mapped_column(Text, nullable=False)
    input_tokens: Mapped[int] = _counter()
    output_tokens: Mapped[int] = _counter()
    cost_usd: Mapped[Decimal] = _money()
    duration_ms: Mapped[int] = _counter()
    tool_calls_count: Mapped[int] = _counter()
    cache_creation_tokens: Mapped[int] = _counter()
    cache_read_tokens: Mapped[int] = _counter()
    model: Mapped[str] = mapped_column(String, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
    idempotency_key: Mapped[str | None] = _idempotency_key()
    idempotency_fingerprint: Mapped[bytes | None] = _idempotency_fingerprint()


class ToolCall(Base):
    __tablename__ = "kraken_tool_calls"
    __table_args__ = (UniqueConstraint("turn_id", "sequence_order"),)

    id: Mapped[uuid.UUID] = _uuid_pk()
    # No index of its own (dropped by 004): the unique (turn_id, sequence_order) one leads with it.
    turn_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("kraken_turns.id", ondelete="CASCADE"), nullable=False)
    tool_name: Mapped[str] = mapped_column(String, nullable=False)
    tool_args: Mapped[Any] = mapped_column(JSONB, nullable=False)
    tool_result: Mapped[Any] = mapped_column(JSONB, nullable=False)
    result_truncated: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("false"))
    sequence_order: Mapped[int] = mapped_column(Integer, nullable=False)


# The verdicts a turn's feedback can carry. A CHECK, not a PostgreSQL enum: a value is added to a
# CHECK by a new NOT VALID check validated beside live writes; an enum's type change locks every
# table using it.
FEEDBACK_TYPES = ("positive", "negative")


class Feedback(Base):
    """A thumbs up or down on a turn (issue 20): one per turn, replaced by the next one sent."""

    __tablename__ = "kraken_feedback"
    __table_args__ = (
        CheckConstraint(
            f"feedback_type IN ({', '.join(repr(value) for value in FEEDBACK_TYPES)})", name="feedback_type"
        ),
        # GET /feedback pages newest first, (created_at, id) DESC: a backward scan of this index,
        # its from/to bounds a range of it.
        Index("ix_kraken_feedback_created_at_id", "created_at", "id"),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    # Unique: one row per turn (PUT replaces it, by ON CONFLICT on this index); it serves the
    # turn's lookup and the cascade from kraken_turns too.
    turn_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("kraken_turns.id", ondelete="CASCADE"), nullable=False, unique=True
    )
    # Indexed: the cascade from a conversation's delete and the per-conversation read find its rows by it.
    conversation_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("kraken_conversations.id", ondelete="CASCADE"), nullable=False, index=True
    )
    feedback_type: Mapped[str] = mapped_column(String, nullable=False)
    # Lengths bounded by the API (backend/conversations/schemas.py), as every text column's are.
    comment: Mapped[str | None]
    trace_id: Mapped[str | None] = mapped_column(String, nullable=True)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now())
