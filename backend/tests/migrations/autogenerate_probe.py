"""What a developer adds to the models in the autogenerate probe (issue 19): a workspaces table, a
``workspace_id`` foreign key on conversations with its index, a ratings table with foreign keys to
turns and conversations, an index on an existing table and a new column.

Importing it changes ``backend.models.Base.metadata`` for the whole process, so no test imports
it: its source goes to a scratch copy of the migration package (``scratch_alembic(...,
models=PROBE_MODELS)``), whose env.py imports it in the alembic subprocess.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import CheckConstraint, Column, ForeignKey, Index, Table, Text, Uuid, func, text
from sqlalchemy.orm import Mapped, mapped_column

from backend.models import Base, Conversation, Turn


class Workspace(Base):
    __tablename__ = "kraken_workspaces"

    # Types from the annotations (Base.type_annotation_map): text, timestamptz, bigint.
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, server_default=func.gen_random_uuid())
    email: Mapped[str] = mapped_column(unique=True)
    name: Mapped[str]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class Rating(Base):
    __tablename__ = "kraken_ratings"
    __table_args__ = (CheckConstraint("rating BETWEEN 1 AND 5", name="rating"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, server_default=func.gen_random_uuid())
    conversation_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("kraken_conversations.id", ondelete="CASCADE"), index=True
    )
    turn_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("kraken_turns.id", ondelete="CASCADE"), index=True)
    rating: Mapped[int]
    comment: Mapped[str | None]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


# Existing tables gain a column with a foreign key and its index, a plain new column, and an index.
_conversations = Conversation.__table__
assert isinstance(_conversations, Table)
_conversations.append_column(Column("workspace_id", Uuid, ForeignKey("kraken_workspaces.id"), nullable=True))
_conversations.append_column(Column("title", Text, nullable=True))
Index("ix_kraken_conversations_workspace_id", _conversations.c.workspace_id)
_turns = Turn.__table__
assert isinstance(_turns, Table)
Index(
    "ix_kraken_turns_model_created_at",
    _turns.c.model,
    _turns.c.created_at,
    postgresql_include=["cost_usd"],
    postgresql_where=text("cost_usd > 0"),
)
