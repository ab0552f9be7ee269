"""Idempotency keys: a retried create or append returns what its first attempt stored.

Revision ID: 003
Revises: 002
Create Date: 2026-11-27

Lock-safe on large live tables (backend/migrations/ops.py):
- kraken_conversations and kraken_turns get two nullable columns, idempotency_key (the client's
  key) and idempotency_fingerprint (sha256 of the request it came with): a catalog change under a
  brief lock, no table rewrite, no scan;
- a unique index on each, over rows that have a key only, built concurrently: the key of a
  conversation is unique, the key of a turn is unique within its conversation.

Keys live as long as their conversation: they are columns of its rows and go with them.

Static on purpose: it never imports the application's models.
"""

from collections.abc import Sequence

from backend.migrations import ops

revision: str = "003"
down_revision: str | None = "002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CONVERSATIONS, TURNS = "kraken_conversations", "kraken_turns"
COLUMNS = {"idempotency_key": "text", "idempotency_fingerprint": "bytea"}
# (name, table, columns): unique among rows that carry a key.
INDEXES = (
    ("ix_kraken_conversations_idempotency_key", CONVERSATIONS, ("idempotency_key",)),
    ("ix_kraken_turns_conversation_id_idempotency_key", TURNS, ("conversation_id", "idempotency_key")),
)
WITH_A_KEY = "idempotency_key IS NOT NULL"


def upgrade() -> None:
    for table in (CONVERSATIONS, TURNS):
        ops.add_columns(table, COLUMNS)
    for name, table, columns in INDEXES:
        ops.create_index_concurrently(name, table, columns, unique=True, where=WITH_A_KEY)


def downgrade() -> None:
    # The keys are data: a retry after the downgrade would store its request again.
    ops.refuse_data_loss(revision, columns={table: ["idempotency_key"] for table in (CONVERSATIONS, TURNS)})
    for name, _, _ in INDEXES:
        ops.drop_index_concurrently(name)
    for table in (CONVERSATIONS, TURNS):
        ops.drop_columns(table, list(COLUMNS))
